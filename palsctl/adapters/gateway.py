"""Admission-control gateway: batch actuation in front of any OpenAI-compatible server.

vLLM cannot change ``max_num_seqs`` at run time; the gateway bounds the number of requests in
flight at the server instead. ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streaming
or not) pass through an `AdmissionGate` whose limit can be resized at run time; requests over
the limit wait in FIFO order; shrinking the limit never drops, cancels or duplicates a request
(in-flight ones finish, new ones wait until the count is below the new limit). Other ``GET
/v1/...`` routes (``/v1/models``) and ``/health`` are passed through without admission. The
gateway exports its own gauges at ``/metrics`` (Prometheus text).

The control endpoint lives on a separate listener, bound to loopback by default, and needs the
token (``Authorization: Bearer TOKEN``):

- ``GET  /control``                      → ``{"max_concurrency", "in_flight", "waiting", ...}``
- ``POST /control/max_concurrency``      ``{"max_concurrency": N}`` → the same state

Binding the control endpoint to a non-loopback address is refused unless
``insecure_control`` (``palsctl gateway --insecure``) says so: the token travels in plain HTTP.
`read_token_file` reads a token file and refuses one that others may read or write (not mode
0600-like, or owned by another user).

`GatewayControl` is a small synchronous client for it; `GatewayBatchActuator` turns it into
palsctl's batch knob.

The proxy listener is aiohttp's server; the upstream side is `palsctl.adapters.upstream`'s lean
keep-alive client (httptools), which forwards streamed bodies as they arrive, chunk for chunk,
without parsing them.

Clients are not trusted (`GatewayConfig` lists the limits): connections are bounded in number,
in the time and size of a request head and in idle time (`palsctl.adapters.httplimits`); a
request body is bounded in size and read time, and is read into memory only within a byte
budget shared by all requests — before admission, so that a slow upload never holds a place in
the batch; over a limit the client gets 408, 413, 431 or 503 with ``Retry-After``. Alike
failures (an upstream that is down, malformed requests) are logged once, then once per interval
with a count.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import stat
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from palsctl.adapters.httplimits import (
    ByteBudget,
    ConnectionLimits,
    GuardedServer,
    RateLimitedLog,
    ServerLog,
    fd_bound_connections,
    mark_busy,
    mark_idle,
)
from palsctl.adapters.upstream import HOP_HEADERS_B, UpstreamError, UpstreamPool
from palsctl.errors import ConfigError, PalsctlError

__all__ = ["ADMITTED_PATHS", "AdmissionGate", "Gateway", "GatewayBatchActuator",
           "GatewayConfig", "GatewayControl", "GatewayError", "MAX_BUFFERED_B",
           "MAX_REQUEST_BODY_B", "read_token_file", "run_gateway"]

log = logging.getLogger(__name__)

ADMITTED_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_REQUEST_BODY_B = 64 * 1024 * 1024      # one request body
MAX_BUFFERED_B = 128 * 1024 * 1024         # all request bodies held in memory together


class GatewayError(PalsctlError):
    """The gateway's control endpoint could not be reached or refused a request."""


class AdmissionGate:
    """An asyncio concurrency limit that can be resized at run time, FIFO among waiters.

    ``acquire()`` waits until fewer than ``limit`` holders exist *and* it is first in line;
    ``release()`` hands the slot to the oldest waiter. Lowering the limit affects only future
    admissions. A waiter cancelled before it is admitted leaves the line; one cancelled just
    after being admitted gives its slot back — so a slot is never lost or double-counted.
    """

    def __init__(self, limit: int) -> None:
        self._check(limit)
        self._limit = int(limit)
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.admitted_total = 0
        self.completed_total = 0
        self.wait_s_total = 0.0
        self.max_in_flight_seen = 0

    @staticmethod
    def _check(limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"concurrency limit must be an integer >= 1, got {limit!r}")

    @property
    def limit(self) -> int:
        """Requests admitted at once at most (the batch limit the gateway enforces)."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet released."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Requests waiting for admission."""
        return sum(1 for f in self._waiters if not f.done())

    def set_limit(self, limit: int) -> int:
        """Set the limit (>= 1); a raise admits waiters at once. Returns the limit in force."""
        self._check(limit)
        self._limit = int(limit)
        self._wake()
        return self._limit

    async def acquire(self) -> None:
        """Wait (first in, first out) until a slot is free, then take it."""
        t0 = time.perf_counter()
        if self._in_flight < self._limit and not self._waiters:
            self._admit()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():   # admitted, then cancelled: give it back
                self.release(completed=False)
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
                self._wake()
            raise
        self.wait_s_total += time.perf_counter() - t0

    def _admit(self) -> None:
        self._in_flight += 1
        self.admitted_total += 1
        if self._in_flight > self.max_in_flight_seen:
            self.max_in_flight_seen = self._in_flight

    def release(self, *, completed: bool = True) -> None:
        """Give a slot back (completed: the request finished rather than failed)."""
        if self._in_flight <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._in_flight -= 1
        if completed:
            self.completed_total += 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._in_flight < self._limit:
            fut = self._waiters.popleft()
            if fut.done():          # cancelled while waiting
                continue
            self._admit()
            fut.set_result(None)

    def state(self) -> dict[str, int | float]:
        """The gate's limit, occupancy and counters (the control endpoint's JSON)."""
        return {"max_concurrency": self._limit, "in_flight": self._in_flight,
                "waiting": self.waiting, "admitted_total": self.admitted_total,
                "completed_total": self.completed_total, "wait_s_total": self.wait_s_total}


class _GateCollector:
    """prometheus_client collector reading the gateway's state at scrape time."""

    def __init__(self, gateway: "Gateway") -> None:
        self.gw = gateway

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        g, counters = self.gw.gate, self.gw._counters
        yield GaugeMetricFamily("palsctl_gateway_in_flight",
                                "Requests admitted and not finished", value=g.in_flight)
        yield GaugeMetricFamily("palsctl_gateway_waiting",
                                "Requests waiting for admission (FIFO)", value=g.waiting)
        yield GaugeMetricFamily("palsctl_gateway_max_concurrency",
                                "Admission limit in force", value=g.limit)
        yield CounterMetricFamily("palsctl_gateway_admitted", "Requests admitted",
                                  value=g.admitted_total)
        yield CounterMetricFamily("palsctl_gateway_completed", "Admitted requests finished",
                                  value=g.completed_total)
        yield CounterMetricFamily("palsctl_gateway_queue_wait_seconds",
                                  "Total time requests waited for admission",
                                  value=g.wait_s_total)
        yield CounterMetricFamily("palsctl_gateway_upstream_errors",
                                  "Requests answered 502 because the upstream failed",
                                  value=counters["upstream_errors"])
        yield GaugeMetricFamily("palsctl_gateway_connections", "Client connections open",
                                value=self.gw.connections)
        yield GaugeMetricFamily("palsctl_gateway_buffered_bytes",
                                "Bytes of request bodies held in memory",
                                value=self.gw.budget.used_b)
        refused = CounterMetricFamily("palsctl_gateway_refused",
                                      "Connections or requests refused or closed by a limit",
                                      labels=["reason"])
        for reason in ("connections_refused", "connections_evicted", "header_timeouts",
                       "header_too_large", "bad_version", "idle_closed", "body_too_large",
                       "body_timeouts", "buffer_full", "bad_body"):
            refused.add_metric([reason], counters.get(reason, 0.0))
        yield refused


def _is_loopback(host: str) -> bool:
    """True for a loopback address or ``localhost`` (no name resolution)."""
    h = host.strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _check_upstream(url: str) -> None:
    key = "upstream"
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError("upstream must be an http(s) URL", key=key, value=url)
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as exc:
        raise ConfigError(f"upstream URL is invalid: {exc}", key=key, value=url) from None
    if not u.hostname:
        raise ConfigError("upstream URL has no host", key=key, value=url)
    if port == 0:
        raise ConfigError("upstream port must be in 1..65535", key=key, value=url)
    if u.username is not None or u.password is not None:
        raise ConfigError("credentials in the upstream URL are not supported", key=key,
                          value=url.replace(u.password or "\0", "***"))
    if u.query or u.fragment:
        raise ConfigError("the upstream URL may not have a query or fragment", key=key, value=url)


def _check_token(token: Any) -> None:
    if not isinstance(token, str) or len(token) < 8:
        raise ConfigError("control token must be at least 8 characters", key="token")
    if len(token) > 1024 or not (token.isascii() and token.isprintable()) or " " in token:
        raise ConfigError("control token must be at most 1024 printable ASCII characters "
                          "without spaces", key="token")


@dataclass(frozen=True, kw_only=True, slots=True)
class GatewayConfig:
    """The gateway's settings (limits on clients: the status answered beyond them in brackets).

    Parameters
    ----------
    upstream : str
        Base URL of the OpenAI-compatible server (``http://127.0.0.1:8000``).
    token : str
        The control endpoint's bearer token.
    max_concurrency : int, default 64
        The initial concurrency (batch) limit.
    listen_host, control_host : str, default "127.0.0.1"
        Addresses of the proxy and of the control endpoint.
    listen_port, control_port : int, default 0
        Their ports (0: a free one).
    upstream_timeout_s : float, default 600.0
        Connect and read timeout towards the upstream, s.
    max_body_b : int, default 64 MiB
        One request body, bytes [413].
    max_buffered_b : int, default 128 MiB
        Request bodies held in memory together, bytes: a body waits for room [503 after
        ``body_timeout_s``]; bodies over 1/64 of it share 7/8 of it, so small requests always
        find room (``max_body_b`` must fit in those 7/8).
    max_header_b : int, default 64 KiB
        Request line and headers, bytes [431].
    header_timeout_s : float, default 10.0
        To complete a request head after its first byte, s [408].
    body_idle_timeout_s : float, default 30.0
        Between two pieces of a body, s.
    body_timeout_s : float, default 120.0
        For a whole body, s [408].
    keepalive_timeout_s : float, default 30.0
        A connection may wait this long for its next request, s.
    max_connections : int, default 4096
        Client connections, lowered to what the open-file limit allows; over it the oldest
        connection without a request in progress is closed [else 503 + Retry-After].
    insecure_control : bool, default False
        Allow a control endpoint on a non-loopback address (its bearer token then crosses the
        network in plain HTTP); refused otherwise.
    error_log_interval_s : float, default 10.0
        Alike failures (upstream down, bad requests) are logged once, then at most once per
        interval with a count, s.
    """

    upstream: str
    token: str
    max_concurrency: int = 64
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    control_host: str = "127.0.0.1"
    control_port: int = 0
    upstream_timeout_s: float = 600.0
    max_body_b: int = MAX_REQUEST_BODY_B
    max_buffered_b: int = MAX_BUFFERED_B
    max_header_b: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_idle_timeout_s: float = 30.0
    body_timeout_s: float = 120.0
    keepalive_timeout_s: float = 30.0
    max_connections: int = 4096
    insecure_control: bool = False
    error_log_interval_s: float = 10.0

    def __post_init__(self) -> None:
        _check_upstream(self.upstream)
        _check_token(self.token)
        for key in ("max_concurrency", "max_body_b", "max_buffered_b", "max_header_b",
                    "max_connections"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError("must be an integer >= 1", key=key, value=v)
        if self.max_header_b < 1024:
            raise ConfigError("must be at least 1024 bytes", key="max_header_b",
                              value=self.max_header_b)
        if self.max_body_b > ByteBudget(self.max_buffered_b).large_limit_b:
            raise ConfigError(f"must be at least 8/7 of max_body_b ({self.max_body_b}): the "
                              f"last eighth is kept for small requests", key="max_buffered_b",
                              value=self.max_buffered_b)
        for key in ("listen_port", "control_port"):
            port = getattr(self, key)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ConfigError("port must be an integer in 0..65535", key=key, value=port)
        for key in ("upstream_timeout_s", "header_timeout_s", "body_idle_timeout_s",
                    "body_timeout_s", "keepalive_timeout_s", "error_log_interval_s"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v <= 0:
                raise ConfigError("must be a finite number of seconds > 0", key=key, value=v)
        if not self.insecure_control and not _is_loopback(self.control_host):
            raise ConfigError("the control endpoint takes a bearer token over plain HTTP: bind "
                              "it to a loopback address, or allow this explicitly (--insecure)",
                              key="control_host", value=self.control_host)


class _Body:
    """A request body read into memory (a list of chunks) and its share of the byte budget."""

    __slots__ = ("chunks", "size_b", "held_b", "_budget")

    def __init__(self, budget: ByteBudget) -> None:
        self.chunks: list[bytes] = []
        self.size_b = 0
        self.held_b = 0
        self._budget = budget

    def release(self) -> None:
        """Drop the bytes and give their budget back (idempotent)."""
        self.chunks = []
        if self.held_b:
            self._budget.give(self.held_b)
            self.held_b = 0


class Gateway:
    """The running gateway: ``await gw.start()``, then ``gw.url`` / ``gw.control_url``.

    Stop it with ``await gw.stop()``.

    Parameters
    ----------
    config : GatewayConfig
        Its settings.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.gate = AdmissionGate(config.max_concurrency)
        self.budget = ByteBudget(config.max_buffered_b)
        self._counters: dict[str, float] = {
            "upstream_errors": 0.0, "body_too_large": 0.0, "body_timeouts": 0.0,
            "buffer_full": 0.0, "bad_body": 0.0}
        self._pool: UpstreamPool | None = None
        self._runners: list[Any] = []
        self._servers: list[Any] = []
        self._guarded: list[GuardedServer] = []
        self._housekeeping: asyncio.Task | None = None
        self.url = ""
        self.control_url = ""
        self.max_connections = config.max_connections
        self._upstream = config.upstream.rstrip("/")
        self._token = config.token.encode()
        self.errors = RateLimitedLog(log, interval_s=config.error_log_interval_s)

    @property
    def connections(self) -> int:
        """Client connections open on the proxy listener."""
        return self._guarded[0].connections if self._guarded else 0

    # --------------------------------------------------------------- lifecycle
    async def start(self) -> "Gateway":
        """Bind the proxy and control listeners and start serving; returns the gateway."""
        from aiohttp import web
        from aiohttp.http_exceptions import HttpProcessingError
        from multidict import CIMultiDict
        from prometheus_client import CollectorRegistry

        c = self.config
        # kept for the per-request path (an import statement there costs a lookup each time)
        self._web, self._multidict = web, CIMultiDict
        self._body_errors = (OSError, web.RequestPayloadError, HttpProcessingError)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_GateCollector(self))
        self.max_connections, soft = fd_bound_connections(c.max_connections)
        if self.max_connections < c.max_connections:
            log.warning("at most %d client connections (not %d): the open-file limit is %s",
                        self.max_connections, c.max_connections, soft)
        t = c.upstream_timeout_s
        self._pool = UpstreamPool(self._upstream, connect_timeout_s=min(t, 10.0),
                                  read_timeout_s=t)
        server_log = ServerLog(log, self.errors)
        # aiohttp's own keep-alive timer is only a backstop (ours runs first); request bodies
        # pass through as they came (no decompression); header lines and counts are bounded by
        # aiohttp's parser, their total by ours
        common: dict[str, Any] = dict(access_log=None, logger=server_log, auto_decompress=False,
                      keepalive_timeout=c.keepalive_timeout_s + c.header_timeout_s,
                      max_line_size=8190, max_field_size=8190, max_headers=128,
                      handler_cancellation=True)
        # the proxy is aiohttp's low-level server with a fixed dispatch (`_route`): no router
        # or middleware machinery on the per-request path; a client that disconnects while
        # queued leaves the line (its handler is cancelled)
        proxy = web.Server(self._route, request_factory=self._make_request, **common)
        control = web.Server(self._control_route, request_factory=self._make_control_request,
                             **common)
        limits = ConnectionLimits(max_connections=self.max_connections,
                                  max_header_b=c.max_header_b,
                                  header_timeout_s=c.header_timeout_s,
                                  keepalive_timeout_s=c.keepalive_timeout_s)
        control_limits = ConnectionLimits(max_connections=min(64, self.max_connections),
                                          max_header_b=c.max_header_b,
                                          header_timeout_s=c.header_timeout_s,
                                          keepalive_timeout_s=c.keepalive_timeout_s)
        try:
            self.url = await self._serve(proxy, limits, c.listen_host, c.listen_port, "listen")
            self.control_url = await self._serve(control, control_limits, c.control_host,
                                                 c.control_port, "control")
        except BaseException:
            await self.stop()
            raise
        if not _is_loopback(c.control_host):
            log.warning("the control endpoint %s is reachable from other hosts and its token "
                        "travels in plain HTTP (insecure_control)", self.control_url)
        self._housekeeping = asyncio.get_running_loop().create_task(self._flush_logs())
        log.info("gateway on %s -> %s (control %s, max_concurrency %d, max_connections %d)",
                 self.url, self._upstream, self.control_url, self.gate.limit,
                 self.max_connections)
        return self

    async def _serve(self, server: Any, limits: ConnectionLimits, host: str, port: int,
                     key: str) -> str:
        from aiohttp import web
        # on stop, in-flight requests get 5 s to finish before their handlers are cancelled
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        self._runners.append(runner)
        guarded = GuardedServer(server, limits, self._counters)
        self._guarded.append(guarded)
        try:
            srv = await asyncio.get_running_loop().create_server(
                guarded, host, port, reuse_address=True, backlog=1024)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                              key=key) from None
        self._servers.append(srv)
        h, p = srv.sockets[0].getsockname()[:2]
        return f"http://[{h}]:{p}" if ":" in h else f"http://{h}:{p}"

    async def stop(self) -> None:
        """Stop serving, close the listeners and the upstream connections."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        for srv in self._servers:
            srv.close()
        self._servers.clear()
        for guarded in self._guarded:
            guarded.close()
            guarded.close_unserved()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        self.errors.flush(force=True)

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(self.config.error_log_interval_s / 2)
            self.errors.flush()

    # --------------------------------------------------------------- proxying
    def _make_request(self, message: Any, payload: Any, protocol: Any, writer: Any,
                      task: Any) -> Any:
        return self._web.BaseRequest(message, payload, protocol, writer, task,
                                     asyncio.get_running_loop(),
                                     client_max_size=self.config.max_body_b)

    async def _route(self, request: Any) -> Any:
        conn = mark_busy(request)
        try:
            if request.method == "POST" and request.path in ADMITTED_PATHS:
                return await self._admitted(request)
            return await self._dispatch(request)
        finally:
            mark_idle(conn, request)

    async def _dispatch(self, request: Any) -> Any:
        """Everything but an admitted request."""
        web = self._web
        path, method = request.path, request.method
        expect = request.headers.get("Expect")
        if expect is not None:
            refused = await self._expect(request, expect)
            if refused is not None:
                return refused
        if method in ("GET", "HEAD"):
            if path.startswith("/v1/") or path == "/health":
                return await self._passthrough(request)
            if path == "/metrics":
                return await self._metrics(request)
        if path in ADMITTED_PATHS or path.startswith("/v1/") or path in ("/health", "/metrics"):
            allow = "POST" if path in ADMITTED_PATHS and method != "POST" else "GET, HEAD"
            return web.Response(status=405, text="405: Method Not Allowed",
                                headers={"Allow": allow})
        return web.Response(status=404, text="404: Not Found")

    async def _expect(self, request: Any, expect: str) -> Any:
        """The router's default expect handler, which the low-level server lacks."""
        if expect.lower() != "100-continue" or request.version < (1, 1):
            return self._web.Response(status=417, text=f"Unknown Expect: {expect}")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    def _refusal(self, status: int, counter: str, message: str, *,
                 retry_after_s: int | None = None) -> Any:
        """An error answer that closes the connection (the rest of an unread body is not
        read)."""
        self._counters[counter] += 1
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
        resp = self._web.json_response({"error": {"message": message, "type": counter}},
                                       status=status, headers=headers)
        resp.force_close()
        return resp

    async def _read_body(self, request: Any) -> Any:
        """The request body within the limits, as a `_Body`, or the error response."""
        c = self.config
        n = request.content_length
        if n is not None and n > c.max_body_b:
            return self._refusal(413, "body_too_large",
                                 f"request body of {n} bytes is over {c.max_body_b}")
        body = _Body(self.budget)
        if n and not self.budget.take_nowait(n) and not await self.budget.take(n,
                                                                              c.body_timeout_s):
            return self._refusal(503, "buffer_full", "too many request bodies in memory; retry",
                                 retry_after_s=1)
        body.held_b = n or 0
        expect = request.headers.get("Expect")
        if expect is not None:
            refused = await self._expect(request, expect)
            if refused is not None:
                body.release()
                return refused
        if not request.body_exists:
            return body
        content = request.content
        try:
            if content.is_eof() and content.exception() is None:   # all here: no waiting
                result = self._add(body, content.read_nowait())
            else:
                result = await self._read_chunks(content, body)
        except BaseException:
            body.release()
            raise
        if result is None and n is not None and body.size_b != n:
            result = self._refusal(400, "bad_body", f"request body of {body.size_b} bytes, "
                                   f"Content-Length {n}")
        if result is not None:           # refused: the bytes read so far go
            body.release()
            return result
        return body

    def _add(self, body: _Body, chunk: bytes) -> Any:
        """Keep one piece of a body; None, or the refusal when it breaks a limit."""
        body.size_b += len(chunk)
        if body.size_b > body.held_b:          # no Content-Length (chunked): held as it comes
            if body.size_b > self.config.max_body_b:
                return self._refusal(413, "body_too_large",
                                     f"request body is over {self.config.max_body_b} bytes")
            more = body.size_b - body.held_b
            if not self.budget.try_take(more):
                return self._refusal(503, "buffer_full", "too many request bodies in memory; "
                                     "retry", retry_after_s=1)
            body.held_b += more
        if chunk:
            body.chunks.append(chunk)
        return None

    async def _read_chunks(self, content: Any, body: _Body) -> Any:
        """Read the rest of a body under the idle and total timeouts; None, or the refusal."""
        c = self.config
        loop = asyncio.get_running_loop()
        end_s = loop.time() + c.body_timeout_s
        try:
            async with asyncio.timeout(None) as deadline:
                while True:
                    deadline.reschedule(min(end_s, loop.time() + c.body_idle_timeout_s))
                    chunk = await content.readany()
                    if not chunk:
                        return None
                    refused = self._add(body, chunk)
                    if refused is not None:
                        return refused
        except TimeoutError:
            return self._refusal(408, "body_timeouts", "request body not received in time")
        except self._body_errors as exc:
            return self._refusal(400, "bad_body", f"request body unreadable: {exc}")

    async def _admitted(self, request: Any) -> Any:
        # the body is read (within the byte budget) before admission: a slow upload must not
        # hold a place in the batch the limit counts
        body = await self._read_body(request)
        if not isinstance(body, _Body):
            return body
        try:
            await self.gate.acquire()
            try:
                return await self._forward(request, body)
            finally:
                self.gate.release()
        finally:
            body.release()

    async def _passthrough(self, request: Any) -> Any:
        return await self._forward(request, None)

    async def _forward(self, request: Any, body: _Body | None) -> Any:
        web = self._web
        resp = up = None
        try:
            assert self._pool is not None  # made by start()
            up = await self._pool.request(request.method, request.raw_path,
                                          request.raw_headers,
                                          None if body is None else body.chunks)
            if body is not None:        # the upstream has answered: the bytes can go
                body.release()
            ctype = up.header(b"content-type")
            if ctype.startswith(b"text/event-stream"):
                headers = {"Content-Type": ctype.decode("latin-1"), "Cache-Control": "no-cache"}
                encoding = up.header(b"content-encoding")
                if encoding:                       # bytes pass through undecoded
                    headers["Content-Encoding"] = encoding.decode("latin-1")
                resp = web.StreamResponse(status=up.status, headers=headers)
                await resp.prepare(request)
                # each piece is written as soon as it arrives: no line splitting, no parsing
                while chunk := await up.read_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
            data = await up.read()
            passed = self._multidict((k.decode("latin-1"), v.decode("latin-1"))
                                     for k, v in up.headers if k.lower() not in HOP_HEADERS_B)
            return web.Response(status=up.status, body=data, headers=passed)
        except (UpstreamError, OSError) as exc:
            if resp is not None and resp.prepared:   # mid-stream: client or upstream went away
                self.errors.log("stream", "stream %s aborted: %s", request.raw_path, exc)
                raise
            self._counters["upstream_errors"] += 1
            self.errors.log("upstream", "upstream %s%s failed: %s", self._upstream,
                            request.raw_path, exc)
            return web.json_response({"error": {"message": f"upstream error: {exc}",
                                                 "type": "upstream_error"}}, status=502)
        finally:
            if up is not None:    # reused if the message ended cleanly, else aborted
                up.release()

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return web.Response(body=generate_latest(self._registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    # --------------------------------------------------------------- control
    def _make_control_request(self, message: Any, payload: Any, protocol: Any, writer: Any,
                              task: Any) -> Any:
        return self._web.BaseRequest(message, payload, protocol, writer, task,
                                     asyncio.get_running_loop(), client_max_size=64 * 1024)

    async def _control_route(self, request: Any) -> Any:
        conn = mark_busy(request)
        try:
            path, method = request.path, request.method
            if path == "/control" and method == "GET":
                return await self._control_get(request)
            if path == "/control/max_concurrency" and method == "POST":
                return await self._control_set(request)
            if path in ("/control", "/control/max_concurrency"):
                return self._web.Response(status=405, text="405: Method Not Allowed", headers={
                    "Allow": "GET" if path == "/control" else "POST"})
            return self._web.Response(status=404, text="404: Not Found")
        finally:
            mark_idle(conn, request)

    def _authorised(self, request: Any) -> bool:
        auth = request.headers.get("Authorization", "")
        given = auth[7:].encode("utf-8", "surrogateescape") if auth.startswith("Bearer ") \
            else b""
        return hmac.compare_digest(given, self._token)

    async def _control_get(self, request: Any) -> Any:
        from aiohttp import web
        if not self._authorised(request):
            return web.json_response({"error": "missing or wrong token"}, status=401)
        return web.json_response(self.gate.state())

    async def _control_set(self, request: Any) -> Any:
        from aiohttp import web
        if not self._authorised(request):
            return web.json_response({"error": "missing or wrong token"}, status=401)
        try:
            payload = await request.json()
            value = payload["max_concurrency"]
            self.gate.set_limit(value)
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"need {{\"max_concurrency\": int >= 1}}: {exc}"},
                                     status=400)
        log.info("gateway max_concurrency -> %d", self.gate.limit)
        return web.json_response(self.gate.state())


class GatewayControl:
    """Synchronous client of a gateway's control endpoint (loopback HTTP).

    Parameters
    ----------
    control_url : str
        The control endpoint, ``http://`` or ``https://``.
    token : str
        Its bearer token.
    timeout_s : float, default 2.0
        Timeout of each request, s.
    """

    def __init__(self, control_url: str, token: str, *, timeout_s: float = 2.0) -> None:
        if not control_url.startswith(("http://", "https://")):
            raise GatewayError(f"gateway control URL must be http:// or https://, got "
                               f"{control_url!r}")
        self.control_url = control_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(  # noqa: S310 - http(s) only (checked in __init__)
            self.control_url + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(  # noqa: S310 - http(s) only (checked in __init__)
                    req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:200]
            if exc.code == 401:
                raise GatewayError(f"gateway at {self.control_url} refused the control token"
                                   ) from None
            raise GatewayError(f"gateway control {path}: HTTP {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise GatewayError(f"cannot reach the gateway control at {self.control_url}: {exc}"
                               ) from None

    def state(self) -> dict:
        """The gate's state (GET /control)."""
        return self._call("GET", "/control")

    def set_max_concurrency(self, n: int) -> int:
        """Set the concurrency limit (POST /control/max_concurrency); returns the one in force."""
        return int(self._call("POST", "/control/max_concurrency",
                              {"max_concurrency": int(n)})["max_concurrency"])


class GatewayBatchActuator:
    """palsctl's batch knob through the gateway: clamps to ``1..launch_max``, skips writes that
    change nothing, restores the limit found at open on `close`."""

    def __init__(self, control: GatewayControl, *, launch_max: int, dry_run: bool = False) -> None:
        self.control = control
        self.launch_max = int(launch_max)
        self.dry_run = dry_run
        self.original = int(control.state()["max_concurrency"])
        self.max_batch = self.original

    def set_max_batch(self, max_batch: int) -> int:
        """Set the batch limit (clamped to 1..launch_max); returns the value in force."""
        value = int(min(max(int(max_batch), 1), self.launch_max))
        if value != self.max_batch:
            if self.dry_run:
                log.info("dry run: would set gateway max_concurrency %d -> %d", self.max_batch,
                         value)
                self.max_batch = value
            else:
                self.max_batch = self.control.set_max_concurrency(value)
        return self.max_batch

    def close(self) -> None:
        """Restore the limit found at open (a failure is logged)."""
        if not self.dry_run and self.max_batch != self.original:
            try:
                self.control.set_max_concurrency(self.original)
                self.max_batch = self.original
            except GatewayError as exc:
                log.error("could not restore the gateway limit: %s", exc)


def read_token_file(path: str | os.PathLike, *, create: bool = False) -> str:
    """The control token in the file ``path`` (surrounding whitespace stripped).

    The file must be a regular file owned by the current user, readable and writable by no one
    else (``chmod 600``), and hold one token of 8–1024 printable ASCII characters. ``create``:
    a missing file is created (mode 0600) with a new random token. Every failure is a
    `ConfigError` naming the file.
    """
    import secrets

    p = os.fspath(path)

    def err(msg: str) -> ConfigError:
        return ConfigError(f"token file {p}: {msg}")

    try:
        st = os.stat(p)
    except FileNotFoundError:
        if not create:
            raise err("not found") from None
        token = secrets.token_urlsafe(24)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
        except OSError as exc:
            raise err(f"cannot create it: {exc.strerror or exc}") from None
        return token
    except OSError as exc:
        raise err(f"cannot read it: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise err("not a regular file")
    if os.name == "posix":
        if st.st_uid != os.geteuid():
            raise err(f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
        if st.st_mode & 0o077:
            raise err(f"others may read or write it (mode {stat.S_IMODE(st.st_mode):04o}); "
                      f"run chmod 600 {p}")
    if st.st_size > 4096:
        raise err(f"{st.st_size} bytes: not a token")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(4097)
    except OSError as exc:
        raise err(f"cannot read it: {exc.strerror or exc}") from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise err("not ASCII text") from None
    try:
        _check_token(token)
    except ConfigError as exc:
        raise err(str(exc).split(": ", 1)[-1]) from None
    return token


async def run_gateway(config: GatewayConfig, *, duration_s: float | None = None,
                      ready: Any = None) -> None:
    """Serve until cancelled, SIGINT/SIGTERM, or ``duration_s`` elapses."""
    from palsctl.adapters.serve import serve_until_stopped
    await serve_until_stopped(Gateway(config), duration_s=duration_s, ready=ready)
