"""The gateway under abuse, on loopback, bounded in counts and time: hostile HTTP (hypothesis),
uploads that stall, abort or overflow (hypothesis), a flood of slow connections, an upstream
outage. Invariants: the gateway keeps serving good requests; the bytes bodies hold never exceed
the budget and all come back; no admission slot is lost; connections stay under the limit and
go once their clients do; no traceback reaches the log; alike failures are counted, not logged
one by one."""
from __future__ import annotations

import asyncio
import http.client
import logging
import socket
import threading
import time

import aiohttp
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from palsctl.adapters.gateway import Gateway, GatewayConfig
from tests.support.gateway import (
    TOKEN,
    DigestUpstream,
    body_of,
    good_request,
    hostport,
    running_gateway,
)

pytestmark = pytest.mark.timeout(180)
KIB = 1024
LIMITS = dict(max_concurrency=4, max_body_b=256 * KIB, max_buffered_b=512 * KIB,
              max_header_b=8 * KIB, header_timeout_s=0.5, body_idle_timeout_s=0.5,
              body_timeout_s=2.0, keepalive_timeout_s=1.0, max_connections=64,
              error_log_interval_s=60.0)


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


class LiveGateway:
    """A gateway and a digesting upstream on an event loop in a thread, for blocking clients."""

    def __init__(self, **limits) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.up = self.call(DigestUpstream().start())
        self.gw = self.call(Gateway(GatewayConfig(upstream=self.up.url, token=TOKEN,
                                                  **limits)).start())
        self.host, self.port = hostport(self.gw.url)

    def call(self, coro, timeout_s: float = 20.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def state(self) -> dict:
        async def read():
            gw = self.gw
            return {"buffered_b": gw.budget.used_b, "in_flight": gw.gate.in_flight,
                    "waiting": gw.gate.waiting, "connections": gw.connections,
                    "peak_b": gw.budget.peak_b}
        return self.call(read())

    def quiesced(self, timeout_s: float = 8.0) -> dict:
        """The state once nothing is held any more (bounded wait)."""
        end = time.monotonic() + timeout_s
        while True:
            s = self.state()
            if (s["buffered_b"], s["in_flight"], s["waiting"], s["connections"]) == (0,) * 4 \
                    or time.monotonic() > end:
                return s
            time.sleep(0.05)

    def good(self) -> None:
        c = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            c.request("POST", "/v1/completions", body=b'{"prompt": "ok"}',
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            assert r.status == 200, (r.status, r.read())
            r.read()
        finally:
            c.close()

    def close(self) -> None:
        self.call(self.gw.stop())
        self.call(self.up.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def live():
    g = LiveGateway(**LIMITS)
    yield g
    g.close()


class Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@pytest.fixture
def tracebacks():
    h = Tracebacks()
    for name in ("palsctl", "aiohttp", "asyncio"):
        logging.getLogger(name).addHandler(h)
    yield h.records
    for name in ("palsctl", "aiohttp", "asyncio"):
        logging.getLogger(name).removeHandler(h)


# ------------------------------------------------------------------ hostile HTTP
HEADER_CHOICES = [
    (b"Host", b"gw"), (b"Content-Type", b"application/json"), (b"Content-Length", b"5"),
    (b"Content-Length", b"-1"), (b"Content-Length", b"abc"), (b"Content-Length", b"9" * 25),
    (b"Content-Length", b"0"), (b"Content-Length", b"5, 5"), (b"Content-Length", b"300000"),
    (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"gzip, chunked"),
    (b"Transfer-Encoding", b"identity"), (b"Expect", b"100-continue"), (b"Expect", b"bogus"),
    (b"Connection", b"close"), (b"Connection", b"upgrade"), (b"Upgrade", b"websocket"),
    (b"Content-Encoding", b"gzip"), (b"Authorization", b"Bearer x"), (b"X", b"\x00\x01"),
    (b"Bad Name", b"v"), (b"X-Long", b"a" * 9000), (b"", b"empty"), (b"X-Unicode", "é".encode()),
    (b"X-Fold", b"a\r\n b"), (b"Host", b"h1"),
]


@st.composite
def raw_requests(draw) -> bytes:
    method = draw(st.sampled_from([b"POST"] * 4 + [b"GET", b"HEAD", b"PUT", b"OPTIONS",
                                                   b"CONNECT", b"PRI", b"P\x00ST", b""]))
    path = draw(st.sampled_from([b"/v1/completions"] * 3 + [
        b"/v1/chat/completions", b"/v1/models", b"/metrics", b"/health", b"/", b"*",
        b"/v1/../../etc/passwd", b"/v1/completions?x=" + b"a" * 9000, b"/%00", b"/\xff\xfe",
        b"http://evil.example/v1/completions", b"/v1/completions#frag"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 4 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9.9",
                                                        b"", b"HTTP/1.1 x"]))
    eol = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r"]))
    headers = draw(st.lists(st.sampled_from(HEADER_CHOICES), max_size=6))
    chunked = (b"Transfer-Encoding", b"chunked") in headers
    if chunked:
        pieces = draw(st.lists(st.binary(min_size=1, max_size=300), max_size=4))
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
        body += draw(st.sampled_from([b"0\r\n\r\n", b"", b"zz\r\n", b"0\r\nX: y\r\n\r\n",
                                      b"fffffffffffffff\r\n"]))
    else:
        body = draw(st.binary(max_size=600))
    head = b" ".join(x for x in (method, path, version) if x) + eol
    head += b"".join(k + b": " + v + eol for k, v in headers) + eol
    data = head + body
    if draw(st.integers(0, 5)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    if draw(st.integers(0, 5)) == 0:
        data += b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"  # pipelined
    return data


def exchange(live: LiveGateway, data: bytes) -> bytes:
    """Send ``data``, half-close, and read until the gateway closes (bounded)."""
    got = b""
    with socket.create_connection((live.host, live.port), timeout=5) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
    return got


@fuzz(80)
@given(raw_requests())
def test_hostile_http_gets_an_http_answer_or_a_close_and_never_breaks_the_gateway(
        live, tracebacks, data):
    got = exchange(live, data)
    if got:
        assert got.startswith(b"HTTP/1."), got[:80]
        status = int(got.split(b" ", 2)[1])
        assert 100 <= status <= 599
        event(f"answer {status}")
    else:
        event("closed without an answer")
    live.good()
    assert not tracebacks, [r.getMessage() for r in tracebacks]


def test_after_the_hostile_requests_nothing_is_held(live):
    live.good()
    s = live.quiesced()
    assert (s["buffered_b"], s["in_flight"], s["waiting"]) == (0, 0, 0)
    assert s["peak_b"] <= 512 * KIB


# ------------------------------------------------------------------ uploads
UPLOAD_MODES = ["whole", "whole", "chunked", "abort", "stall", "too large", "lie"]


async def upload(host: str, port: int, size: int, mode: str) -> int | None:
    """One upload over a raw connection; its status (None: no answer, connection gone)."""
    r, w = await asyncio.open_connection(host, port)
    body = body_of(size)
    try:
        if mode == "chunked":
            w.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked"
                    b"\r\n\r\n")
            for i in range(0, size, 40_000):
                piece = body[i:i + 40_000]
                w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            w.write(b"0\r\n\r\n")
        else:
            declared = {"lie": size + 1000, "too large": 300 * KIB}.get(mode, size)
            w.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n"
                    % declared)
            if mode == "too large":             # over max_body_b: refused before it is read
                w.write(body[:size // 2])
            elif mode in ("abort", "stall"):
                w.write(body[:size // 2])
            else:
                w.write(body)
        await w.drain()
        if mode == "abort":
            w.transport.abort()
            return None
        line = await asyncio.wait_for(r.readline(), 10)
        return int(line.split()[1]) if line else None
    except (OSError, asyncio.IncompleteReadError):
        return None
    finally:
        w.close()


EXPECTED = {"whole": {200, 503}, "chunked": {200, 503}, "stall": {408}, "lie": {408},
            "too large": {413, None}, "abort": {None}}


@fuzz(15)
@given(st.lists(st.tuples(st.integers(1, 250 * KIB), st.sampled_from(UPLOAD_MODES)),
                min_size=1, max_size=10))
def test_uploads_that_stall_abort_or_overflow_never_leak_budget_or_slots(live, uploads):
    async def batch():
        return await asyncio.gather(*[upload(live.host, live.port, n, m) for n, m in uploads])

    statuses = asyncio.run(asyncio.wait_for(batch(), 30))
    for (n, mode), status in zip(uploads, statuses, strict=True):
        assert status in EXPECTED[mode], (n, mode, status)
        event(f"{mode}: {status}")
    s = live.quiesced()
    assert (s["buffered_b"], s["in_flight"], s["waiting"], s["connections"]) == (0, 0, 0, 0), s
    assert s["peak_b"] <= 512 * KIB
    live.good()


# ------------------------------------------------------------------ slow connections
def test_a_flood_of_slow_connections_leaves_good_clients_served():
    async def main():
        up = await DigestUpstream().start()
        try:
            async with running_gateway(up.url, max_connections=40, header_timeout_s=0.5,
                                       keepalive_timeout_s=5.0) as gw:
                gw._guarded[0].limits.grace_s = 0.1
                loop = asyncio.get_running_loop()
                host, port = hostport(gw.url)
                stop = False
                opened = 0
                seen_max = 0

                class Slow(asyncio.Protocol):
                    def connection_made(self, transport):
                        transport.write(b"POST /v1/completions HTTP/1.1\r\nX: ")

                    def connection_lost(self, exc):      # back 20 ms later
                        if not stop:
                            loop.call_later(0.02, lambda: loop.create_task(open_one()))

                async def open_one():
                    nonlocal opened
                    try:
                        await loop.create_connection(Slow, host, port)
                        opened += 1
                    except OSError:
                        pass

                async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=2)) as s:
                    await asyncio.gather(*[good_request(s, gw.url) for _ in range(2)])
                    await asyncio.gather(*[open_one() for _ in range(120)])   # 3x the limit
                    for k in range(40):                                       # ~1 s
                        await good_request(s, gw.url, prompt=str(k))
                        seen_max = max(seen_max, gw.connections)
                        await asyncio.sleep(0.02)
                stop = True
                assert seen_max <= 40 and opened > 120          # evicted ones came back
                c = gw._counters                                # 120 cannot fit in 40
                assert c["connections_evicted"] + c["connections_refused"] \
                    + c["header_timeouts"] >= 80
                for _ in range(300):                            # all gone once clients are
                    if gw.connections == 0:
                        break
                    await asyncio.sleep(0.02)
                assert gw.connections == 0
        finally:
            await up.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


# ------------------------------------------------------------------ upstream outage
def test_an_upstream_outage_is_counted_not_logged_per_request(caplog):
    async def main():
        async with running_gateway("http://127.0.0.1:9", error_log_interval_s=60.0,
                                   max_concurrency=64) as gw:
            conn = aiohttp.TCPConnector(limit=30)
            async with aiohttp.ClientSession(connector=conn) as s:
                async def one(i):
                    async with s.post(gw.url + "/v1/completions", json={"prompt": i}) as r:
                        return r.status

                statuses = await asyncio.gather(*[one(i) for i in range(300)])
            assert statuses == [502] * 300
            return gw

    with caplog.at_level(logging.WARNING, logger="palsctl.adapters.gateway"):
        gw = asyncio.run(asyncio.wait_for(main(), 60))
    lines = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(lines) == 2 and "(299 such in the last" in lines[1], lines
    assert gw._counters["upstream_errors"] == 300
