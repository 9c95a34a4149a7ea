"""A lean HTTP/1.1 client for the gateway's upstream: persistent connections, bytes in and out.

The gateway spends most of its CPU in HTTP machinery, and on a loaded host that CPU time is
what a token waits for. aiohttp's general-purpose client costs about 0.25 ms per request and
tens of microseconds per streamed chunk; this one does only what a reverse proxy needs — write
the request head and body, parse the response with ``httptools`` (llhttp, the parser of Node.js
and uvicorn) and hand the de-chunked body to the caller as it arrives — at a fraction of that.

`UpstreamPool.request` sends the request body (bytes, or a list of chunks written one after
another with the transport's flow control, so a large body is never copied whole into a send
buffer) and returns an `UpstreamResponse` once the status line and headers are in;
``await resp.read_any()`` yields body bytes (all that has arrived, joined) until ``b""`` at the
end of the message; ``resp.release()`` returns the connection to the pool when the message
ended cleanly and the server keeps it alive, and aborts it otherwise (a client that went away
mid-stream stops the upstream's generation). Bodies pass through undecoded
(``Content-Encoding`` is the caller's business). Timeouts: connect, and "no byte from the
upstream for ``read_timeout_s`` while a response is awaited", enforced by one watchdog task;
idle connections are closed after ``idle_timeout_s`` (below common servers' keep-alive).
"""
from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Any
from urllib.parse import urlsplit

# headers a proxy must not forward (RFC 9110 §7.6.1), the ones it sets itself, and Expect
# (the gateway answers 100-continue itself and sends the whole body)
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "trailers", "transfer-encoding", "upgrade",
                         "content-length", "host", "expect"})
HOP_HEADERS_B = frozenset(h.encode() for h in HOP_HEADERS)
READ_HIGH_WATER_B = 256 * 1024   # pause reading the upstream when this much is unread
ONE_WRITE_B = 256 * 1024         # a body up to this size goes out with the head in one write


class UpstreamError(ConnectionError):
    """The upstream could not be reached, broke the connection, sent bad HTTP or timed out."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to the upstream, one request at a time."""

    def __init__(self, pool: "UpstreamPool") -> None:
        import httptools
        self._pool = pool
        self._loop = pool.loop
        self._parser = httptools.HttpResponseParser(self)
        self._parser_error = httptools.HttpParserError
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.last_io_s = self._loop.time()
        self.busy = False
        self.reused = False
        self.write_paused = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.exc: BaseException | None = None
        self.body_cut = False         # the upstream answered before taking the whole body
        self._framed = False          # Content-Length or chunked: the end is in the stream
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        self.last_io_s = self._loop.time()
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except self._parser_error as exc:
            self._fail(UpstreamError(f"bad HTTP from the upstream: {exc}"))
            assert self.transport is not None  # set by connection_made
            self.transport.abort()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_io_s = self._loop.time()
        self._wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.busy and not self.complete:
            if self.headers_done and not self._framed and exc is None:
                self.complete = True           # body delimited by the connection's close
            else:
                self._fail(UpstreamError("the upstream closed the connection"
                                         + (f": {exc}" if exc else "")))
        self._wake()

    # ---------------------------------------------------------------- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        low = name.lower()
        if low == b"content-length" or (low == b"transfer-encoding"
                                        and b"chunked" in value.lower()):
            self._framed = True

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_WATER_B and not self._paused:
            self._paused = True
            assert self.transport is not None  # set by connection_made
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    # ---------------------------------------------------------------- waiting
    def _fail(self, exc: BaseException) -> None:
        if self.exc is None:
            self.exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def wait(self) -> None:
        self._waiter = self._loop.create_future()
        await self._waiter

    def take(self) -> bytes:
        """All body bytes received and not yet taken (b"" if none)."""
        body = self._body
        if not body:
            return b""
        data = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused and not self.closed:
            self._paused = False
            assert self.transport is not None  # set by connection_made
            self.transport.resume_reading()
        return data


class UpstreamResponse:
    """Status and headers of an upstream response; the body through `read_any`/`read`."""

    __slots__ = ("_conn", "_pool", "status", "headers", "_released")

    def __init__(self, pool: "UpstreamPool", conn: _Connection) -> None:
        self._pool, self._conn = pool, conn
        self.status = conn.status
        self.headers = conn.headers          # [(name bytes, value bytes)], as sent
        self._released = False

    def header(self, name: bytes, default: bytes = b"") -> bytes:
        """The value of a response header (case-insensitive name), or default."""
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    async def read_any(self) -> bytes:
        """Body bytes as they arrive (everything buffered, joined); ``b""`` at the end."""
        c = self._conn
        while True:
            data = c.take()
            if data:
                return data
            if c.exc is not None:
                raise c.exc
            if c.complete:
                return b""
            await c.wait()

    async def read(self) -> bytes:
        """Read the whole response body."""
        parts = []
        while chunk := await self.read_any():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Back to the pool when the message ended cleanly and may be reused; else abort."""
        if not self._released:
            self._released = True
            self._pool._release(self._conn)


class UpstreamPool:
    """Keep-alive connections to one upstream base URL (``http://host:port[/prefix]``)."""

    def __init__(self, base_url: str, *, connect_timeout_s: float, read_timeout_s: float,
                 idle_timeout_s: float = 2.0) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"upstream must be an http(s) URL, got {base_url!r}")
        self.loop = asyncio.get_running_loop()
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.prefix = u.path.rstrip("/")
        self._ssl = None
        if u.scheme == "https":
            import ssl
            self._ssl = ssl.create_default_context()
        default_port = 443 if u.scheme == "https" else 80
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = (netloc if self.port == default_port
                             else f"{netloc}:{self.port}").encode("idna")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._closed = False
        self._watchdog = self.loop.create_task(self._watch())

    async def _connect(self) -> _Connection:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Connection(self), self.host, self.port,
                                            ssl=self._ssl),
                self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise UpstreamError(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        return conn

    def _get_idle(self) -> _Connection | None:
        # a connection idle for longer than idle_timeout_s is closed, not reused: servers drop
        # idle keep-alive connections (uvicorn, so vLLM, after 5 s), and a request written as
        # the server closes would be lost on the wire
        now = self.loop.time()
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            if now - conn.last_io_s > self.idle_timeout_s:
                assert conn.transport is not None  # set by connection_made
                conn.transport.close()
                continue
            return conn
        return None

    def head(self, method: str, path_qs: str, raw_headers: Any, body_len: int | None) -> bytes:
        """The request head: the client's headers less hop-by-hop ones, our Host and length."""
        parts = [b"%s %s%s HTTP/1.1\r\nHost: %s\r\n" % (
            method.encode(), self.prefix.encode(), path_qs.encode("utf-8", "surrogateescape"),
            self._host_header)]
        for k, v in raw_headers:
            if k.lower() not in HOP_HEADERS_B:
                parts.append(b"%s: %s\r\n" % (k, v))
        if body_len is not None:
            parts.append(b"Content-Length: %d\r\n" % body_len)
        parts.append(b"\r\n")
        return b"".join(parts)

    async def request(self, method: str, path_qs: str, raw_headers: Any,
                      body: bytes | list[bytes] | None) -> UpstreamResponse:
        """Send one request (``body``: None, bytes, or a list of chunks); return once the
        response's headers have arrived."""
        if body is None:
            chunks: list[bytes] = []
            body_len = None
        elif isinstance(body, (bytes, bytearray, memoryview)):
            chunks = [body] if body else []
            body_len = len(body)
        else:
            chunks = [c for c in body if c]
            body_len = sum(len(c) for c in chunks)
        head = self.head(method, path_qs, raw_headers, body_len)
        if len(chunks) == 1 and len(chunks[0]) <= ONE_WRITE_B:
            head, chunks = head + chunks[0], []
        for attempt in (0, 1):
            conn = self._get_idle()
            if conn is None:
                conn = await self._connect()
                reused = False
            else:
                reused = True
            conn.busy = True
            conn.last_io_s = self.loop.time()
            self._busy.add(conn)
            try:
                assert conn.transport is not None  # set by connection_made
                conn.transport.write(head)
                for chunk in chunks:     # each after the last has drained below the high water
                    while conn.write_paused and conn.exc is None and not conn.closed \
                            and not conn.headers_done:
                        await conn.wait()
                    if conn.exc is not None:
                        raise conn.exc
                    if conn.headers_done:     # answered early (an error): the rest is not sent
                        conn.body_cut = True
                        break
                    if conn.closed:
                        raise UpstreamError("the upstream closed the connection")
                    assert conn.transport is not None  # set by connection_made
                    conn.transport.write(chunk)
                while not conn.headers_done:
                    if conn.exc is not None:
                        raise conn.exc
                    await conn.wait()
                if method == "HEAD":    # no body follows, whatever Content-Length says
                    conn.complete, conn.keep_alive = True, False
            except UpstreamError:
                self._discard(conn)
                # a kept-alive connection the upstream closed before reading our request:
                # nothing was processed, so one retry on a fresh connection is safe
                if reused and not conn.got_bytes and attempt == 0:
                    continue
                raise
            except BaseException:
                self._discard(conn)
                raise
            return UpstreamResponse(self, conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def _discard(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        conn.busy = False
        if not conn.closed and conn.transport is not None:
            conn.transport.abort()

    def _release(self, conn: _Connection) -> None:
        if (conn.complete and conn.keep_alive and conn.exc is None and not conn.closed
                and not conn._body and not conn.body_cut and not self._closed):
            self._busy.discard(conn)
            conn.busy = False
            conn._reset()
            self._idle.append(conn)
        else:
            self._discard(conn)

    async def _watch(self) -> None:
        """Abort busy connections silent for ``read_timeout_s``; close idle ones after
        ``idle_timeout_s``."""
        period_s = max(0.05, min(1.0, self.read_timeout_s / 4, self.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period_s)
            self.sweep(self.loop.time())

    def sweep(self, now: float) -> None:
        """One pass of the watchdog at loop time ``now``."""
        for conn in list(self._busy):
            if now - conn.last_io_s > self.read_timeout_s and not conn.complete:
                conn._fail(UpstreamError(
                    f"no data from the upstream for {self.read_timeout_s:g} s"))
                self._discard(conn)
        keep = []
        for conn in self._idle:
            if conn.closed:
                continue
            if now - conn.last_io_s > self.idle_timeout_s:
                assert conn.transport is not None  # set by connection_made
                conn.transport.close()
            else:
                keep.append(conn)
        self._idle = keep

    async def close(self) -> None:
        """Close every pooled connection and stop the idle watchdog."""
        self._closed = True
        self._watchdog.cancel()
        try:
            await self._watchdog
        except asyncio.CancelledError:
            pass
        for conn in self._idle + list(self._busy):
            if conn.transport is not None and not conn.closed:
                conn.transport.close()
        self._idle.clear()
        self._busy.clear()
