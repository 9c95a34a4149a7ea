"""Limits for an aiohttp low-level server facing untrusted clients (the gateway's listeners).

aiohttp bounds the size of one header line and the number of header lines, but a connection may
take as long as it likes to send them, an idle connection is kept for an hour, and the number of
connections is bounded only by the open-file limit. `GuardedServer` (a drop-in for
``aiohttp.web.Server``) wraps each connection's protocol in `_Conn`, which enforces

- ``header_timeout_s``: a request head must be complete this long after its first byte
  (else ``408`` and close);
- ``max_header_b``: the request line and headers together (else ``431`` and close);
- a request line must end in ``HTTP/1.1`` or ``HTTP/1.0`` (else ``505`` and close: aiohttp
  would answer another version in kind, ``HTTP/2.0 200``, which no client can read);
- ``keepalive_timeout_s``: a connection with no request in progress (new, or after a response)
  is closed after this long without a request;
- ``max_connections``: at the limit, a new connection takes the place of the oldest one that
  has no request in progress and has had its chance (open for at least ``grace_s``): one still
  sending a head, else one that never sent anything; only when every connection has served a
  request, the oldest idle keep-alive one. When there is none, the newcomer gets ``503`` with
  ``Retry-After`` and is closed. The grace keeps a burst of newcomers from evicting one another
  before they could send a request; clients that sent whole requests are never evicted for
  connections that have not.

The request handler marks a connection busy / idle with `mark_busy` / `mark_idle`; body limits
are the handler's (`ByteBudget` bounds the bytes all request bodies hold together).
`RateLimitedLog` keeps a flood of alike failures to one log line per interval with a count.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["ByteBudget", "ConnectionLimits", "GuardedServer", "RateLimitedLog", "ServerLog",
           "fd_bound_connections", "mark_busy", "mark_idle"]

_IDLE, _HEAD, _BUSY, _CLOSED = 0, 1, 2, 3
_HEAD_END = b"\r\n\r\n"
_LINGER_S = 1.0          # a refused connection is read (and discarded) this long before closing


def _reply(status: int, reason: str, *, retry_after_s: int | None = None) -> bytes:
    body = b'{"error": {"message": "%s", "type": "gateway_limit"}}' % reason.encode()
    extra = b"Retry-After: %d\r\n" % retry_after_s if retry_after_s is not None else b""
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"%sConnection: close\r\n\r\n%s" % (status, reason.encode(), len(body), extra, body))


_408 = _reply(408, "Request Timeout")
_505 = _reply(505, "HTTP Version Not Supported")
_431 = _reply(431, "Request Header Fields Too Large")
_503 = _reply(503, "Service Unavailable", retry_after_s=1)


class RateLimitedLog:
    """Logs the first event of a kind at once; while more of that kind keep coming, one line per
    ``interval_s`` with how many there were and the latest one's message.

    ``log(key, msg, *args)`` is the logger call (``key`` groups alike events); `flush` writes the
    counts of windows that have ended (call it periodically, and with ``force=True`` on shutdown).
    ``clock`` is injectable for tests (seconds, monotonic).
    """

    def __init__(self, logger: logging.Logger, *, interval_s: float = 10.0,
                 level: int = logging.WARNING, clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self.interval_s, self.level, self._clock = logger, interval_s, level, clock
        # key -> [window start (s), events suppressed since, (msg, args) of the latest]
        self._windows: dict[str, list[Any]] = {}
        self.events = 0
        self.lines = 0

    def log(self, key: str, msg: str, *args: Any, exc_info: Any = None) -> None:
        """Log ``msg % args`` now, or count it into the current window of ``key``;
        ``exc_info`` (a traceback) goes with a line logged at once, never into a count."""
        self.events += 1
        now = self._clock()
        w = self._windows.get(key)
        if w is None or (now - w[0] >= self.interval_s and not w[1]):
            self._windows[key] = [now, 0, None]
            self._emit(msg, args, exc_info)
            return
        w[1] += 1
        w[2] = (msg, args)
        if now - w[0] >= self.interval_s:
            self._summary(w, now)

    def flush(self, *, force: bool = False) -> None:
        """Write the pending count of each window that has ended (every window: ``force``)."""
        now = self._clock()
        for w in self._windows.values():
            if w[1] and (force or now - w[0] >= self.interval_s):
                self._summary(w, now)

    def _summary(self, w: list[Any], now: float) -> None:
        msg, args = w[2]
        self._emit(msg + " (%d such in the last %.0f s)", (*args, w[1], now - w[0]))
        w[0], w[1], w[2] = now, 0, None

    def _emit(self, msg: str, args: tuple, exc_info: Any = None) -> None:
        self.lines += 1
        self._log.log(self.level, msg, *args, exc_info=exc_info)


class ServerLog:
    """Stands in for aiohttp's server logger: a malformed request from a client is one
    rate-limited line (no traceback); anything else is logged with its traceback, rate-limited."""

    def __init__(self, logger: logging.Logger, limiter: RateLimitedLog) -> None:
        self._log, self._limiter = logger, limiter

    def exception(self, msg: str, *args: Any, exc_info: Any = True, **_: Any) -> None:
        """Log a handler exception: a client's malformed HTTP as one rate-limited line."""
        from aiohttp.http_exceptions import HttpProcessingError
        if isinstance(exc_info, HttpProcessingError):
            text = str(exc_info).strip().splitlines()
            self._limiter.log("bad-request", "bad request from a client: %s",
                              text[0][:200] if text else type(exc_info).__name__)
        else:
            self._limiter.log("server-error", msg, *args, exc_info=exc_info)

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        """Log an error, rate-limited."""
        self._limiter.log("server-error", msg, *args)

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        """Log a warning, rate-limited."""
        self._limiter.log("server-warning", msg, *args)

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        """Log at debug level."""
        self._log.debug(msg, *args)

    def info(self, msg: str, *args: Any, **kw: Any) -> None:
        """Log at info level."""
        self._log.info(msg, *args)


class ByteBudget:
    """Bytes that request bodies may hold in memory at once, shared by all requests.

    ``await take(n, timeout_s)`` waits (FIFO; a small request that fits passes the queue) until
    ``n`` bytes are free, or gives up (False) after ``timeout_s``; ``try_take(n)`` never waits;
    ``give(n)`` returns bytes. ``used_b`` and ``peak_b`` show what is and was held.
    Small takes (at most 1/64 of the limit) may use all of it; larger ones only up to
    `large_limit_b` (7/8), so that large uploads cannot keep small requests out.
    """

    def __init__(self, limit_b: int) -> None:
        self.limit_b = int(limit_b)
        self.large_limit_b = self.limit_b - self.limit_b // 8
        self.used_b = 0
        self.peak_b = 0
        self._small_b = max(1, self.limit_b // 64)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, n: int) -> bool:
        return self.used_b + n <= (self.limit_b if n <= self._small_b else self.large_limit_b)

    def _hold(self, n: int) -> None:
        self.used_b += n
        if self.used_b > self.peak_b:
            self.peak_b = self.used_b

    def try_take(self, n: int) -> bool:
        """Reserve n bytes if they fit now; whether they were reserved."""
        if self._fits(n):
            self._hold(n)
            return True
        return False

    def take_nowait(self, n: int) -> bool:
        """`take` without waiting: True if ``n`` bytes were taken now (queue order kept)."""
        if self._fits(n) and (not self._waiters or n <= self._small_b):
            self._hold(n)
            return True
        return False

    async def take(self, n: int, timeout_s: float) -> bool:
        """Reserve n bytes, waiting at most timeout_s (s) for room; whether they were."""
        if n > (self.limit_b if n <= self._small_b else self.large_limit_b):
            return False
        if self.take_nowait(n):
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout_s):
                await fut
            return True
        except (asyncio.CancelledError, TimeoutError):
            if fut.done() and not fut.cancelled():   # granted, then cancelled: give it back
                self.give(n)
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
                self._wake()
            task = asyncio.current_task()
            if task is not None and task.cancelling():   # a real cancellation, not our timeout
                raise
            return False

    def give(self, n: int) -> None:
        """Return n reserved bytes (wakes the waiters that now fit)."""
        self.used_b -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._hold(n)
            fut.set_result(None)


class ConnectionLimits:
    """The per-listener limits `GuardedServer` enforces (see the module docstring)."""

    def __init__(self, *, max_connections: int, max_header_b: int, header_timeout_s: float,
                 keepalive_timeout_s: float, grace_s: float | None = None) -> None:
        self.max_connections = int(max_connections)
        self.max_header_b = int(max_header_b)
        self.header_timeout_s = float(header_timeout_s)
        self.keepalive_timeout_s = float(keepalive_timeout_s)
        self.grace_s = min(1.0, self.header_timeout_s / 2) if grace_s is None else float(grace_s)
        # refused connections lingering at once (each holds a descriptor); beyond, reset
        self.max_lingering = max(8, self.max_connections // 16)


def fd_bound_connections(requested: int, *, reserve: int = 64) -> tuple[int, int | None]:
    """The connection limit the open-file limit allows: each client connection may need one
    upstream connection too, so at most half of the descriptors left after ``reserve``.
    Returns (limit, soft open-file limit or None where unknown)."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        return requested, None
    if soft == resource.RLIM_INFINITY:
        return requested, None
    return min(requested, max(8, (soft - reserve) // 2)), soft


class _Conn(asyncio.Protocol):
    """One client connection: the limits around aiohttp's protocol. aiohttp's protocol is made
    only once a first request head is complete (kept in ``pending`` until then): a connection
    that never sends one costs little."""

    __slots__ = ("server", "inner", "transport", "state", "since_s", "head_b", "tail", "pending",
                 "opened_s", "line", "line_ok", "waiting")

    def __init__(self, server: "GuardedServer") -> None:
        self.server = server
        self.opened_s = server.loop.time()
        self.inner: Any = None
        self.transport: Any = None
        self.state = _IDLE
        self.since_s = 0.0         # when the current idle or head state began (loop time)
        self.waiting: dict | None = None   # the server's list of waiting connections it is in
        self.head_b = 0
        self.tail = b""
        self.pending: list[bytes] = []
        self.line = b""            # the request line so far, until its end is seen
        self.line_ok = False

    # ------------------------------------------------------------ transport callbacks
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if not self.server._admit(self):
            self.state = _CLOSED
            self.server._refuse(transport)
            return
        self._to_idle()

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _CLOSED:               # refused or being closed: discard
            return
        if state == _IDLE:
            self._to_head()
            state = _HEAD
        if state == _HEAD:
            if not self.line_ok and not self._check_line(data):
                return
            tail = self.tail
            end = (tail + data[:3]).find(_HEAD_END) if tail else -1
            if end >= 0:
                end -= len(tail)
            else:
                end = data.find(_HEAD_END)
            if end >= 0:
                head_b = self.head_b + end + 4
            else:
                head_b = self.head_b = self.head_b + len(data)
                self.tail = data[-3:] if len(data) >= 3 else (tail + data)[-3:]
            if head_b > self.server.limits.max_header_b:
                self.server.counters["header_too_large"] += 1
                self._close_with(_431)
                return
            if end < 0:
                if self.inner is None:     # no aiohttp protocol before a first whole head
                    self.pending.append(data)
                    return
            else:                          # the head is complete: the handler takes over
                self._to_busy()
                if self.inner is None:
                    if self.pending:
                        data = b"".join(self.pending) + data
                        self.pending = []
                    self.inner = self.server.web_server()
                    self.inner.connection_made(self.transport)
        self.inner.data_received(data)

    def _check_line(self, data: bytes) -> bool:
        """Watch for the end of the request line; False when it names an HTTP version other
        than 1.0 / 1.1 (answered 505, closed)."""
        buf = self.line + data if self.line else data
        if buf[:1] in (b"\r", b"\n"):          # empty lines before a request are allowed
            buf = buf.lstrip(b"\r\n")
        nl = buf.find(b"\n")
        if nl < 0:
            self.line = buf[:self.server.limits.max_header_b + 1]
            return True
        self.line, self.line_ok = b"", True
        if buf[:nl].rstrip(b"\r").endswith((b" HTTP/1.1", b" HTTP/1.0")):
            return True
        self.server.counters["bad_version"] += 1
        self._close_with(_505)
        return False

    def eof_received(self) -> bool | None:
        if self.inner is None:
            return None                    # the transport closes
        return self.inner.eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.server._forget(self)
        self.state = _CLOSED
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # ------------------------------------------------------------ states (the server's sweep
    # enforces the timeouts: no timer is made per request)
    def _to_idle(self) -> None:
        self.state = _IDLE
        self.head_b, self.tail = 0, b""
        self.since_s = self.server.loop.time()
        self.server._set_waiting(self, idle=True)

    def _to_head(self) -> None:
        self.state = _HEAD
        self.line, self.line_ok = b"", False
        self.since_s = self.server.loop.time()
        self.server._set_waiting(self, idle=False)

    def _to_busy(self) -> None:
        if self.state == _BUSY or self.state == _CLOSED:
            return
        self.state = _BUSY
        self.server._set_busy(self)

    def _idle_expired(self, now_s: float) -> None:
        if self.transport.get_write_buffer_size():    # a response is still being written
            self.since_s = now_s
            self.server._set_waiting(self, idle=True)
            return
        self.server.counters["idle_closed"] += 1
        self.state = _CLOSED
        self.server._forget(self)
        self.transport.close()

    def _head_expired(self, now_s: float) -> None:
        self.server.counters["header_timeouts"] += 1
        self._close_with(_408)

    def _close_with(self, reply: bytes) -> None:
        self.state = _CLOSED
        self.server._forget(self)
        tr = self.transport
        if tr is not None and not tr.is_closing():
            tr.write(reply)
            tr.close()

    def evict(self) -> None:
        """Close to make room for a new connection (no request in progress here)."""
        self._close_with(_408 if self.state == _HEAD else b"")


def mark_busy(request: Any) -> Any:
    """A request handler starts: the connection's idle and head timeouts stop. Returns a token
    for `mark_idle` (None where the connection is not guarded or already gone)."""
    tr = request.transport
    conn = tr.get_protocol() if tr is not None else None
    if isinstance(conn, _Conn):
        conn._to_busy()
        return conn
    return None


def mark_idle(conn: Any, request: Any) -> None:
    """The handler returned: the connection waits for its next request (keep-alive timeout).
    While an unread request body is still arriving it stays busy: aiohttp reads and discards
    the rest for a bounded time, or closes the connection."""
    if conn is not None and conn.state == _BUSY and request.content.is_eof():
        conn._to_idle()


class GuardedServer:
    """Mixin-free wrapper: ``GuardedServer(web_server, limits, counters)`` is the protocol factory
    to hand to ``loop.create_server`` in place of the ``aiohttp.web.Server`` itself (the runner
    keeps the original for shutdown). ``counters`` (a dict) receives the events by name."""

    def __init__(self, web_server: Any, limits: ConnectionLimits,
                 counters: dict[str, float]) -> None:
        self.web_server = web_server
        self.limits = limits
        self.counters = counters
        for k in ("connections_refused", "connections_evicted", "header_timeouts",
                  "header_too_large", "idle_closed", "bad_version"):
            counters.setdefault(k, 0.0)
        self.loop = asyncio.get_running_loop()
        self.open: set[_Conn] = set()
        # connections with no request in progress, oldest first, in the order they make room:
        # those sending a head, those that never sent a whole one, idle keep-alive ones
        self._heads: dict[_Conn, None] = {}
        self._fresh: dict[_Conn, None] = {}
        self._idles: dict[_Conn, None] = {}
        self._lingering = 0
        lim = limits
        self.sweep_period_s = max(0.005, min(0.25, lim.header_timeout_s / 8,
                                             lim.keepalive_timeout_s / 8))
        self._sweeper = self.loop.create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_period_s)
            self.sweep(self.loop.time())

    def sweep(self, now_s: float) -> None:
        """Close the connections whose head or idle time ran out (at loop time ``now_s``).
        Each waiting list is in the order its states began, so a pass stops at the first
        connection with time left."""
        lim = self.limits
        for waiting, timeout_s, expire in (
                (self._heads, lim.header_timeout_s, _Conn._head_expired),
                (self._fresh, lim.keepalive_timeout_s, _Conn._idle_expired),
                (self._idles, lim.keepalive_timeout_s, _Conn._idle_expired)):
            while waiting:
                conn = next(iter(waiting))
                if now_s - conn.since_s < timeout_s:
                    break
                expire(conn, now_s)      # leaves the list, or goes to its end

    def close(self) -> None:
        """Stop the sweep (the listener is closed by its owner)."""
        self._sweeper.cancel()

    def __call__(self) -> _Conn:
        """A protocol for one new client connection (asyncio's protocol factory)."""
        return _Conn(self)

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return len(self.open)

    def _admit(self, conn: _Conn) -> bool:
        if len(self.open) >= self.limits.max_connections:
            old_s = conn.opened_s - self.limits.grace_s
            victim = None
            for waiting in (self._heads, self._fresh):
                first = next(iter(waiting), None)     # the oldest of its kind
                if first is not None and first.opened_s <= old_s:
                    victim = first
                    break
            if victim is None and not self._heads and not self._fresh:
                victim = next(iter(self._idles), None)     # all proven clients: the oldest
            if victim is None:
                return False
            self.counters["connections_evicted"] += 1
            victim.evict()
        self.open.add(conn)
        return True

    def _forget(self, conn: _Conn) -> None:
        self.open.discard(conn)
        self._set_busy(conn)

    def _set_waiting(self, conn: _Conn, *, idle: bool) -> None:
        if conn.waiting is not None:
            del conn.waiting[conn]
        waiting = self._heads if not idle else self._fresh if conn.inner is None else self._idles
        waiting[conn] = None
        conn.waiting = waiting

    def _set_busy(self, conn: _Conn) -> None:
        if conn.waiting is not None:
            del conn.waiting[conn]
            conn.waiting = None

    def close_unserved(self) -> None:
        """Close the connections that never completed a request head (aiohttp's shutdown does
        not know them)."""
        for conn in list(self.open):
            if conn.inner is None:
                self._forget(conn)
                conn.state = _CLOSED
                conn.transport.close()

    def _refuse(self, transport: Any) -> None:
        """503 + Retry-After; the client's request is read and discarded for a moment so that
        closing does not reset the connection before the client has read the answer."""
        self.counters["connections_refused"] += 1
        transport.write(_503)
        if self._lingering >= self.limits.max_lingering or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._lingering += 1

        def done() -> None:
            self._lingering -= 1
            transport.close()

        self.loop.call_later(_LINGER_S, done)
