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

`GatewayControl` is a small synchronous client for it; `GatewayBatchActuator` turns it into
palsctl's batch knob.

The proxy listener is aiohttp's server; the upstream side is `palsctl.adapters.upstream`'s lean
keep-alive client (httptools), which forwards streamed bodies as they arrive, chunk for chunk,
without parsing them.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from palsctl.adapters.upstream import HOP_HEADERS_B, UpstreamError, UpstreamPool
from palsctl.errors import ConfigError, PalsctlError

log = logging.getLogger(__name__)

ADMITTED_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_REQUEST_BODY_B = 64 * 1024 * 1024


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
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def set_limit(self, limit: int) -> int:
        self._check(limit)
        self._limit = int(limit)
        self._wake()
        return self._limit

    async def acquire(self) -> None:
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
        return {"max_concurrency": self._limit, "in_flight": self._in_flight,
                "waiting": self.waiting, "admitted_total": self.admitted_total,
                "completed_total": self.completed_total, "wait_s_total": self.wait_s_total}


class _GateCollector:
    """prometheus_client collector reading the gate's state at scrape time."""

    def __init__(self, gate: AdmissionGate, counters: dict[str, float]) -> None:
        self.gate, self.counters = gate, counters

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415
        g = self.gate
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
                                  value=self.counters["upstream_errors"])


@dataclass(frozen=True, kw_only=True, slots=True)
class GatewayConfig:
    """``upstream``: base URL of the OpenAI-compatible server (``http://127.0.0.1:8000``);
    ``listen_host``/``listen_port``: the proxy; ``control_host``/``control_port``: the control
    endpoint (loopback by default; port 0 picks a free one); ``token``: the control token;
    ``max_concurrency``: the initial limit; ``upstream_timeout_s``: connect/read timeout."""

    upstream: str
    token: str
    max_concurrency: int = 64
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    control_host: str = "127.0.0.1"
    control_port: int = 0
    upstream_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.upstream.startswith(("http://", "https://")):
            raise ConfigError("upstream must be an http(s) URL", key="upstream",
                              value=self.upstream)
        if len(self.token) < 8:
            raise ConfigError("control token must be at least 8 characters", key="token")
        if isinstance(self.max_concurrency, bool) or not isinstance(self.max_concurrency, int) \
                or self.max_concurrency < 1:
            raise ConfigError("max_concurrency must be an integer >= 1", key="max_concurrency",
                              value=self.max_concurrency)
        for key in ("listen_port", "control_port"):
            port = getattr(self, key)
            if not 0 <= port <= 65535:
                raise ConfigError("port must be in 0..65535", key=key, value=port)
        if self.upstream_timeout_s <= 0:
            raise ConfigError("upstream_timeout_s must be > 0", key="upstream_timeout_s",
                              value=self.upstream_timeout_s)


class Gateway:
    """The running gateway: ``await gw.start()``, then ``gw.url`` / ``gw.control_url``;
    ``await gw.stop()``."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.gate = AdmissionGate(config.max_concurrency)
        self._counters = {"upstream_errors": 0.0}
        self._pool = None
        self._runners: list[Any] = []
        self.url = ""
        self.control_url = ""
        self._upstream = config.upstream.rstrip("/")
        self._token = config.token.encode()

    # --------------------------------------------------------------- lifecycle
    async def start(self) -> "Gateway":
        from aiohttp import web  # noqa: PLC0415
        from multidict import CIMultiDict  # noqa: PLC0415
        from prometheus_client import CollectorRegistry  # noqa: PLC0415

        # kept for the per-request path (an import statement there costs a lookup each time)
        self._web, self._multidict = web, CIMultiDict
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_GateCollector(self.gate, self._counters))
        t = self.config.upstream_timeout_s
        self._pool = UpstreamPool(self._upstream, connect_timeout_s=min(t, 10.0),
                                  read_timeout_s=t)
        # the proxy is aiohttp's low-level server with a fixed dispatch (`_route`): no router
        # or middleware machinery on the per-request path; a client that disconnects while
        # queued leaves the line (its handler is cancelled)
        proxy = web.Server(self._route, request_factory=self._make_request,
                           handler_cancellation=True, access_log=None)
        control = web.Application()
        control.router.add_get("/control", self._control_get)
        control.router.add_post("/control/max_concurrency", self._control_set)
        c = self.config
        self.url = await self._serve(web.ServerRunner(proxy, handle_signals=False,
                                                      shutdown_timeout=5.0),
                                     c.listen_host, c.listen_port)
        self.control_url = await self._serve(
            web.AppRunner(control, access_log=None, handle_signals=False, shutdown_timeout=5.0),
            c.control_host, c.control_port)
        log.info("gateway on %s -> %s (control %s, max_concurrency %d)", self.url,
                 self._upstream, self.control_url, self.gate.limit)
        return self

    async def _serve(self, runner: Any, host: str, port: int) -> str:
        from aiohttp import web  # noqa: PLC0415
        # on stop, in-flight requests get 5 s to finish before their handlers are cancelled
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        sock = site._server.sockets[0]  # noqa: SLF001 - the only way to learn port 0's choice
        h, p = sock.getsockname()[:2]
        return f"http://{h}:{p}"

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # --------------------------------------------------------------- proxying
    def _make_request(self, message: Any, payload: Any, protocol: Any, writer: Any,
                      task: Any) -> Any:
        return self._web.BaseRequest(message, payload, protocol, writer, task,
                                     asyncio.get_running_loop(),
                                     client_max_size=MAX_REQUEST_BODY_B)

    async def _route(self, request: Any) -> Any:
        web = self._web
        path, method = request.path, request.method
        expect = request.headers.get("Expect")
        if expect is not None:     # the router's default expect handler, which Server lacks
            if expect.lower() != "100-continue" or request.version < (1, 1):
                return web.Response(status=417, text=f"Unknown Expect: {expect}")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        if method == "POST" and path in ADMITTED_PATHS:
            return await self._admitted(request)
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

    async def _admitted(self, request: Any) -> Any:
        body = await request.read()
        await self.gate.acquire()
        try:
            return await self._forward(request, body)
        finally:
            self.gate.release()

    async def _passthrough(self, request: Any) -> Any:
        return await self._forward(request, None)

    async def _forward(self, request: Any, body: bytes | None) -> Any:
        web = self._web
        resp = up = None
        try:
            up = await self._pool.request(request.method, request.raw_path,
                                          request.raw_headers, body)
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
            headers = self._multidict((k.decode("latin-1"), v.decode("latin-1"))
                                      for k, v in up.headers if k.lower() not in HOP_HEADERS_B)
            return web.Response(status=up.status, body=data, headers=headers)
        except (UpstreamError, OSError) as exc:
            if resp is not None and resp.prepared:   # mid-stream: client or upstream went away
                log.warning("stream %s aborted: %s", request.raw_path, exc)
                raise
            self._counters["upstream_errors"] += 1
            log.warning("upstream %s%s failed: %s", self._upstream, request.raw_path, exc)
            return web.json_response({"error": {"message": f"upstream error: {exc}",
                                                 "type": "upstream_error"}}, status=502)
        finally:
            if up is not None:    # reused if the message ended cleanly, else aborted
                up.release()

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web  # noqa: PLC0415
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: PLC0415
        return web.Response(body=generate_latest(self._registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    # --------------------------------------------------------------- control
    def _authorised(self, request: Any) -> bool:
        auth = request.headers.get("Authorization", "")
        given = auth[7:].encode() if auth.startswith("Bearer ") else b""
        return hmac.compare_digest(given, self._token)

    async def _control_get(self, request: Any) -> Any:
        from aiohttp import web  # noqa: PLC0415
        if not self._authorised(request):
            return web.json_response({"error": "missing or wrong token"}, status=401)
        return web.json_response(self.gate.state())

    async def _control_set(self, request: Any) -> Any:
        from aiohttp import web  # noqa: PLC0415
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
    """Synchronous client of a gateway's control endpoint (loopback HTTP)."""

    def __init__(self, control_url: str, token: str, *, timeout_s: float = 2.0) -> None:
        self.control_url = control_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.control_url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
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
        return self._call("GET", "/control")

    def set_max_concurrency(self, n: int) -> int:
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
        if not self.dry_run and self.max_batch != self.original:
            try:
                self.control.set_max_concurrency(self.original)
                self.max_batch = self.original
            except GatewayError as exc:
                log.error("could not restore the gateway limit: %s", exc)


async def run_gateway(config: GatewayConfig, *, duration_s: float | None = None,
                      ready: Any = None) -> None:
    """Serve until cancelled, SIGINT/SIGTERM, or ``duration_s`` elapses."""
    from palsctl.adapters.serve import serve_until_stopped  # noqa: PLC0415
    await serve_until_stopped(Gateway(config), duration_s=duration_s, ready=ready)
