"""The gateway's limits on clients, over loopback: heads, bodies, connections, the byte budget,
rate-limited error logs, the control bind and the token file. Timeouts are set to fractions of a
second and every wait is bounded."""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import os

import aiohttp
import pytest

from palsctl.adapters.gateway import Gateway, GatewayConfig, read_token_file
from palsctl.adapters.httplimits import ByteBudget, RateLimitedLog
from palsctl.errors import ConfigError
from tests.support.gateway import (
    TOKEN,
    DigestUpstream,
    body_of,
    closed_by_peer,
    good_request,
    open_raw,
    post_head,
    read_response,
    running_gateway,
)

pytestmark = pytest.mark.timeout(60)
KIB = 1024


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 45))


async def with_digest(fn, **limits):
    up = await DigestUpstream().start()
    try:
        async with running_gateway(up.url, **limits) as gw:
            async with aiohttp.ClientSession() as s:
                await fn(gw, s, up)
    finally:
        await up.stop()


# ------------------------------------------------------------------ heads and idle connections
def test_slow_head_gets_408_while_others_are_served():
    async def fn(gw, s, up):
        r, w = await open_raw(gw.url)
        w.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n")     # and nothing more
        await good_request(s, gw.url)
        got = await closed_by_peer(r)
        assert got.startswith(b"HTTP/1.1 408 ")
        assert gw._counters["header_timeouts"] == 1
        w.close()

    run(with_digest(fn, header_timeout_s=0.3))


def test_idle_connections_are_closed_after_the_keepalive_timeout():
    async def fn(gw, s, up):
        r, w = await open_raw(gw.url)           # never sends anything
        assert await closed_by_peer(r) == b""
        r2, w2 = await open_raw(gw.url)         # one request, then idle
        w2.write(post_head(length=2) + b"{}")
        status, headers, _ = await read_response(r2)
        assert status == 200
        assert await closed_by_peer(r2) == b""
        assert gw._counters["idle_closed"] == 2 and gw.connections == 0
        w.close()
        w2.close()

    run(with_digest(fn, keepalive_timeout_s=0.3))


@pytest.mark.parametrize("terminated", [False, True])
def test_head_over_the_limit_gets_431(terminated):
    async def fn(gw, s, up):
        r, w = await open_raw(gw.url)
        extra = "".join(f"X-Pad-{i}: {'a' * 100}\r\n" for i in range(40))     # ~4.4 kB
        head = post_head(length=2, extra=extra)
        w.write(head + b"{}" if terminated else head[:-2])
        got = await closed_by_peer(r)
        assert got.startswith(b"HTTP/1.1 431 ")
        assert up.requests == 0 and gw._counters["header_too_large"] == 1
        await good_request(s, gw.url)            # an ordinary head passes
        w.close()

    run(with_digest(fn, max_header_b=4 * KIB))


@pytest.mark.parametrize("line", [b"POST /v1/completions HTTP/2.0", b"GET /health HTTP/9.9",
                                  b"GET /health"])
def test_other_http_versions_get_505(line):
    async def fn(gw, s, up):
        r, w = await open_raw(gw.url)
        w.write(b"\r\n" + line + b"\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}")
        got = await closed_by_peer(r)
        assert got.startswith(b"HTTP/1.1 505 ") and up.requests == 0
        assert gw._counters["bad_version"] == 1
        r, w = await open_raw(gw.url)                    # 1.0 passes (a stray CRLF first)
        w.write(b"\r\nPOST /v1/completions HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
        status, _, _ = await read_response(r)
        assert status == 200
        w.close()

    run(with_digest(fn))


# ------------------------------------------------------------------ connections
def test_at_the_connection_limit_the_oldest_waiting_connection_makes_room():
    async def fn(gw, s, up):
        gw._guarded[0].limits.grace_s = 0.05    # (1 s by default)
        slow = []
        for _ in range(4):
            r, w = await open_raw(gw.url)
            w.write(b"POST /v1/comp")           # partial heads: no request in progress
            slow.append((r, w))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if gw.connections == 4:
                break
        assert gw.connections == 4
        await asyncio.sleep(0.1)                # past the grace
        await good_request(s, gw.url)           # a 5th connection: the oldest slow one goes
        first = await closed_by_peer(slow[0][0])
        assert first.startswith(b"HTTP/1.1 408 ")
        assert gw._counters["connections_evicted"] >= 1
        for _, w in slow:
            w.close()

    run(with_digest(fn, max_connections=4))


def test_connections_within_their_grace_are_not_evicted():
    async def fn(gw, s, up):
        slow = []
        for _ in range(2):
            r, w = await open_raw(gw.url)
            w.write(b"POST /v1/comp")
            slow.append((r, w))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if gw.connections == 2:
                break
        r, w = await open_raw(gw.url)            # both are younger than the grace (1 s)
        status, headers, _ = await read_response(r)
        assert status == 503 and headers["retry-after"] == "1"
        assert gw._counters["connections_evicted"] == 0 and gw.connections == 2
        for _, wb in [*slow, (r, w)]:
            wb.close()

    run(with_digest(fn, max_connections=2))


def test_when_every_connection_is_busy_a_newcomer_gets_503_retry_after():
    async def fn(gw, s, up):
        busy = []
        for _ in range(3):                      # bodies arriving slowly: requests in progress
            r, w = await open_raw(gw.url)
            w.write(post_head(length=100) + b'{"pro')
            busy.append((r, w))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if gw.budget.used_b == 300:
                break
        r, w = await open_raw(gw.url)
        status, headers, body = await read_response(r)
        assert status == 503 and headers["retry-after"] == "1"
        assert gw._counters["connections_refused"] == 1
        w.close()
        for rb, wb in busy:                     # the busy ones finish normally
            wb.write(b'mpt": "' + b"x" * 86 + b'"}')
            status, _, body = await read_response(rb)
            assert status == 200 and b'"bytes": 100' in body
            wb.close()

    run(with_digest(fn, max_connections=3))


# ------------------------------------------------------------------ bodies
def test_body_over_the_limit_is_refused_before_it_is_read():
    async def fn(gw, s, up):
        r, w = await open_raw(gw.url)
        w.write(post_head(length=5000, extra="Expect: 100-continue\r\n"))
        status, headers, body = await read_response(r)   # no 100 Continue first
        assert status == 413 and headers["connection"] == "close"
        w.close()
        r, w = await open_raw(gw.url)            # chunked: refused once over the limit
        w.write(post_head(chunked=True) + b"800\r\n" + b"a" * 0x800 + b"\r\n")
        status, headers, body = await read_response(r)
        assert status == 413
        w.close()
        assert up.requests == 0 and gw.budget.used_b == 0
        assert gw._counters["body_too_large"] == 2

    run(with_digest(fn, max_body_b=1000))


def test_chunked_body_within_limits_arrives_whole():
    async def fn(gw, s, up):
        data = body_of(300 * KIB, seed=3)

        async def gen():
            for i in range(0, len(data), 7000):
                yield data[i:i + 7000]

        async with s.post(gw.url + "/v1/completions", data=gen()) as r:
            js = await r.json()
        assert js["bytes"] == len(data) and js["sha256"] == hashlib.sha256(data).hexdigest()
        assert gw.budget.used_b == 0

    run(with_digest(fn, max_body_b=512 * KIB, max_buffered_b=1024 * KIB))


def test_concurrent_large_uploads_stay_within_the_byte_budget_and_all_complete():
    async def fn(gw, s, up):
        bodies = [body_of(256 * KIB, seed=i) for i in range(12)]

        async def one(b):
            async with s.post(gw.url + "/v1/completions", data=b) as r:
                assert r.status == 200
                return (await r.json())["sha256"]

        digests = await asyncio.gather(*[one(b) for b in bodies])
        assert digests == [hashlib.sha256(b).hexdigest() for b in bodies]
        assert 256 * KIB <= gw.budget.peak_b <= gw.budget.large_limit_b
        assert gw.budget.used_b == 0

    run(with_digest(fn, max_body_b=256 * KIB, max_buffered_b=512 * KIB))


def test_full_budget_gives_503_to_large_bodies_but_small_requests_pass():
    async def fn(gw, s, up):
        await gw.gate.acquire()                 # the only slot: bodies read wait for admission

        async def post(n, seed):
            async with s.post(gw.url + "/v1/completions", data=body_of(n, seed)) as r:
                return r.status, r.headers.get("Retry-After")

        held = [asyncio.create_task(post(200 * KIB, i)) for i in range(2)]
        for _ in range(200):
            await asyncio.sleep(0.01)
            if gw.gate.waiting == 2:
                break
        assert gw.budget.used_b == 400 * KIB    # of 448 KiB for large bodies
        assert await post(200 * KIB, 9) == (503, "1")
        small = asyncio.create_task(post(2 * KIB, 5))     # small: the reserved eighth
        for _ in range(200):
            await asyncio.sleep(0.01)
            if gw.gate.waiting == 3:
                break
        assert gw.budget.used_b == 402 * KIB
        gw.gate.release(completed=False)
        assert [await t for t in (*held, small)] == [(200, None)] * 3
        assert gw.budget.used_b == 0 and gw._counters["buffer_full"] == 1

    run(with_digest(fn, max_concurrency=1, max_body_b=256 * KIB, max_buffered_b=512 * KIB,
                    body_timeout_s=0.5))


def test_a_stalled_body_gets_408_and_frees_its_bytes():
    async def fn(gw, s, up):
        r, w = await open_raw(gw.url)
        w.write(post_head(length=100) + b'{"prompt"')
        status, headers, _ = await read_response(r)
        assert status == 408 and gw.budget.used_b == 0 and up.requests == 0
        w.close()

    run(with_digest(fn, body_idle_timeout_s=0.3))


def test_a_client_that_leaves_mid_body_frees_its_bytes():
    async def fn(gw, s, up):
        r, w = await open_raw(gw.url)
        w.write(post_head(length=100_000) + b"x" * 1000)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if gw.budget.used_b:
                break
        w.transport.abort()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not gw.budget.used_b:
                break
        assert gw.budget.used_b == 0 and up.requests == 0
        await good_request(s, gw.url)

    run(with_digest(fn))


def test_compressed_request_body_passes_through_undecoded():
    async def fn(gw, s, up):
        raw = gzip.compress(b'{"prompt": "' + b"z" * 5000 + b'"}')
        async with s.post(gw.url + "/v1/completions", data=raw,
                          headers={"Content-Encoding": "gzip",
                                   "Content-Type": "application/json"}) as r:
            js = await r.json()
        assert js == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                      "encoding": "gzip"}

    run(with_digest(fn))


# ------------------------------------------------------------------ logs
def test_upstream_errors_are_logged_once_then_counted(caplog):
    async def main():
        async with running_gateway("http://127.0.0.1:9", error_log_interval_s=60.0) as gw:
            async with aiohttp.ClientSession() as s:
                for _ in range(40):
                    async with s.post(gw.url + "/v1/completions", json={"prompt": "x"}) as r:
                        assert r.status == 502
            during = [r for r in caplog.records if "failed" in r.getMessage()]
            assert len(during) == 1
        return gw

    with caplog.at_level(logging.WARNING, logger="palsctl.adapters.gateway"):
        gw = run(main())
    lines = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(lines) == 2 and "(39 such in the last" in lines[1]
    assert gw._counters["upstream_errors"] == 40


def test_rate_limited_log_windows_with_a_simulated_clock(caplog):
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("t.rl"), interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t.rl"):
        for k in range(1000):                   # 100 events per second for 10 s
            now[0] = k * 0.01
            rl.log("up", "failed %d", k)
        now[0] = 10.0
        rl.log("up", "failed %d", 1000)         # ends the window: one summary line
        now[0] = 25.0
        rl.flush()                              # nothing pending
        rl.log("up", "failed %d", 1001)         # a quiet spell: logged at once
        rl.log("other", "other %s", "x")        # its own key
        now[0] = 26.0
        rl.log("up", "failed %d", 1002)
        rl.flush(force=True)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["failed 0", "failed 1000 (1000 such in the last 10 s)", "failed 1001",
                    "other x", "failed 1002 (1 such in the last 1 s)"]
    assert rl.events == 1004 and rl.lines == 5


def test_garbage_from_a_client_is_one_log_line_without_a_traceback(caplog):
    async def fn(gw, s, up):
        for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
                     b"GET /\x00\x01 HTTP/1.1\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\n"
                     b"Content-Length: -5\r\n\r\n"):
            r, w = await open_raw(gw.url)
            w.write(junk)
            got = await closed_by_peer(r)
            assert got.startswith(b"HTTP/1.") and got[8:13] in (b" 400 ", b" 505 ")
            w.close()
        await good_request(s, gw.url)

    with caplog.at_level(logging.DEBUG, logger="palsctl.adapters.gateway"):
        run(with_digest(fn, error_log_interval_s=60.0))
    assert not [r for r in caplog.records if r.exc_info]
    assert len([r for r in caplog.records if "bad request" in r.getMessage()]) == 2


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("fields,words", [
    (dict(upstream="http://"), "no host"),
    (dict(upstream="http://127.0.0.1:99999"), "invalid"),
    (dict(upstream="http://127.0.0.1:0"), "1..65535"),
    (dict(upstream="http://u:secret@127.0.0.1:8000"), "credentials"),
    (dict(upstream="http://127.0.0.1:8000/?a=1"), "query"),
    (dict(upstream="ftp://127.0.0.1"), "http"),
    (dict(token="has space inside"), "printable"),
    (dict(token="toolong" * 200), "printable"),
    (dict(control_host="0.0.0.0"), "--insecure"),
    (dict(control_host="10.1.2.3"), "loopback"),
    (dict(control_host="gateway.example.com"), "loopback"),
    (dict(listen_port=70000), "0..65535"),
    (dict(header_timeout_s=float("nan")), "header_timeout_s"),
    (dict(body_timeout_s=float("inf")), "body_timeout_s"),
    (dict(keepalive_timeout_s=0), "keepalive_timeout_s"),
    (dict(max_connections=0), "max_connections"),
    (dict(max_body_b=100, max_buffered_b=100), "max_buffered_b"),
    (dict(max_header_b=10), "max_header_b"),
])
def test_config_refuses_bad_values(fields, words):
    base = dict(upstream="http://127.0.0.1:8000", token=TOKEN)
    with pytest.raises(ConfigError, match=words):
        GatewayConfig(**{**base, **fields})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.0.1", "::1", "[::1]", "localhost",
                                  "::ffff:127.0.0.1"])
def test_loopback_control_hosts_are_accepted(host):
    GatewayConfig(upstream="http://127.0.0.1:8000", token=TOKEN, control_host=host)


def test_insecure_control_bind_is_allowed_with_a_warning(caplog):
    async def main():
        cfg = GatewayConfig(upstream="http://127.0.0.1:8000", token=TOKEN, control_host="0.0.0.0",
                            insecure_control=True)
        gw = await Gateway(cfg).start()
        await gw.stop()

    with caplog.at_level(logging.WARNING, logger="palsctl.adapters.gateway"):
        run(main())
    assert any("plain HTTP" in r.getMessage() for r in caplog.records)


def test_a_port_in_use_is_a_config_error_naming_the_listener():
    async def main():
        async with running_gateway("http://127.0.0.1:8000") as gw:
            port = int(gw.control_url.rsplit(":", 1)[1])
            cfg = GatewayConfig(upstream="http://127.0.0.1:8000", token=TOKEN,
                                control_port=port)
            with pytest.raises(ConfigError, match="key 'control': cannot listen"):
                await Gateway(cfg).start()

    run(main())


# ------------------------------------------------------------------ token file
def test_token_file_checks(tmp_path):
    p = tmp_path / "tok"
    with pytest.raises(ConfigError, match="not found"):
        read_token_file(p)
    token = read_token_file(p, create=True)
    assert len(token) >= 24 and (os.stat(p).st_mode & 0o777) == 0o600
    assert read_token_file(p) == token
    os.chmod(p, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token_file(p)
    os.chmod(p, 0o600)
    for content, words in ((b"", "at least 8"), (b"short\n", "at least 8"),
                           (b"two words here\n", "printable"), ("é" * 10, "ASCII"),
                           (b"x" * 5000, "not a token")):
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ConfigError, match=words):
            read_token_file(p)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_token_file(tmp_path)
    with pytest.raises(ConfigError, match="cannot create"):
        read_token_file(tmp_path / "no-such-dir" / "tok", create=True)
    if hasattr(os, "geteuid") and os.geteuid() == 0:     # only root can give a file away
        q = tmp_path / "theirs"
        q.write_text("a-token-of-someone-else\n")
        os.chmod(q, 0o600)
        os.chown(q, 12345, 12345)
        with pytest.raises(ConfigError, match="owned by uid 12345"):
            read_token_file(q)


# ------------------------------------------------------------------ the byte budget alone
def test_byte_budget_fifo_small_pass_and_reserve():
    async def main():
        b = ByteBudget(64 * KIB)              # small: <= 1 KiB; large ones share 56 KiB
        assert b.large_limit_b == 56 * KIB
        assert await b.take(40 * KIB, 1)
        order = []

        async def want(n, tag):
            ok = await b.take(n, 5)
            order.append((tag, ok))

        t1 = asyncio.create_task(want(20 * KIB, "big"))
        await asyncio.sleep(0)
        t2 = asyncio.create_task(want(10 * KIB, "medium"))   # fits, but queues behind "big"
        t3 = asyncio.create_task(want(KIB, "small"))         # small: passes the queue
        await asyncio.sleep(0)
        assert order == [("small", True)]
        b.give(40 * KIB)
        await asyncio.gather(t1, t2)
        assert order == [("small", True), ("big", True), ("medium", True)]
        assert b.used_b == 31 * KIB and b.peak_b == 41 * KIB
        assert not await b.take(57 * KIB, 1)                 # never fits: at once
        assert not await b.take(30 * KIB, 0.05)              # times out, leaves the queue
        assert not b._waiters
        b.give(31 * KIB)
        assert b.used_b == 0
        await t3

    run(main())


def test_byte_budget_cancelled_waiter_gives_back_what_it_was_granted():
    async def main():
        b = ByteBudget(64 * KIB)
        assert await b.take(50 * KIB, 1)
        t = asyncio.create_task(b.take(20 * KIB, 5))
        await asyncio.sleep(0)
        b.give(50 * KIB)                      # grants t's bytes ...
        t.cancel()                            # ... and t is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await t
        assert b.used_b == 0 and not b._waiters

    run(main())
