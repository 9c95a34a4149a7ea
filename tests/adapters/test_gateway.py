"""Admission gate and gateway over loopback against a controllable upstream (no sleeps: the
upstream holds each request until the test releases it)."""
from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from palsctl.adapters.gateway import (
    AdmissionGate,
    Gateway,
    GatewayBatchActuator,
    GatewayConfig,
    GatewayControl,
    GatewayError,
)
from palsctl.errors import ConfigError

TOKEN = "test-token-123456"


# ------------------------------------------------------------------ the gate alone
def test_gate_fifo_resize_and_cancel():
    async def main():
        gate = AdmissionGate(2)
        order = []

        async def worker(i, hold):
            await gate.acquire()
            order.append(i)
            await hold.wait()
            gate.release()

        holds = [asyncio.Event() for _ in range(6)]
        tasks = [asyncio.create_task(worker(i, holds[i])) for i in range(6)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == [0, 1] and gate.in_flight == 2 and gate.waiting == 4
        gate.set_limit(1)                 # shrink: nobody dropped, nobody admitted
        holds[0].set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == [0, 1] and gate.in_flight == 1
        holds[1].set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == [0, 1, 2] and gate.in_flight == 1
        tasks[3].cancel()                 # a waiter leaves the line
        gate.set_limit(3)                 # grow: the next waiters in FIFO order
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == [0, 1, 2, 4, 5] and gate.in_flight == 3
        for h in holds:
            h.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert gate.in_flight == 0 and gate.waiting == 0
        assert gate.admitted_total == 5 and gate.completed_total == 5

    asyncio.run(main())


def test_gate_rejects_bad_limits():
    with pytest.raises(ValueError):
        AdmissionGate(0)
    gate = AdmissionGate(1)
    for bad in (0, -3, 2.5, True, "4"):
        with pytest.raises(ValueError):
            gate.set_limit(bad)
    with pytest.raises(RuntimeError):
        gate.release()


def test_config_validation():
    with pytest.raises(ConfigError, match="upstream"):
        GatewayConfig(upstream="localhost:8000", token=TOKEN)
    with pytest.raises(ConfigError, match="token"):
        GatewayConfig(upstream="http://127.0.0.1:1", token="short")
    with pytest.raises(ConfigError, match="max_concurrency"):
        GatewayConfig(upstream="http://127.0.0.1:1", token=TOKEN, max_concurrency=0)


# ------------------------------------------------------------------ a controllable upstream
class Upstream:
    """Holds every admitted request until ``release(n)``; counts concurrency."""

    def __init__(self):
        self.active = 0
        self.max_active = 0
        self.seen: list[str] = []
        self.active_at_arrival: list[int] = []
        self.go = asyncio.Queue()
        self.arrived = asyncio.Queue()

    async def start(self):
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = "http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]
        return self

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "m"}]})

    async def completions(self, request):
        body = await request.json()
        rid = body["prompt"] if "prompt" in body else body["messages"][0]["content"]
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.seen.append(rid)
        self.active_at_arrival.append(self.active)
        await self.arrived.put(rid)
        try:
            await self.go.get()
            if body.get("stream"):
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                for k in range(3):
                    await resp.write(f"data: {json.dumps({'id': rid, 'k': k})}\n\n".encode())
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            return web.json_response({"id": rid, "choices": [{"text": "ok"}]})
        finally:
            self.active -= 1

    def release(self, n):
        for _ in range(n):
            self.go.put_nowait(None)


async def _with_gateway(fn, limit=4):
    up = await Upstream().start()
    gw = await Gateway(GatewayConfig(upstream=up.url, token=TOKEN, max_concurrency=limit)).start()
    try:
        async with aiohttp.ClientSession() as s:
            await fn(up, gw, s)
    finally:
        await gw.stop()
        await up.runner.cleanup()


async def _post(s, url, rid, stream=False, chat=False):
    if chat:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": rid}]}
    else:
        path, body = "/v1/completions", {"prompt": rid}
    body["stream"] = stream
    async with s.post(url + path, json=body) as r:
        if stream:
            return r.status, [line async for line in r.content if line.strip()]
        return r.status, await r.json()


def test_proxy_nonstreaming_streaming_chat_and_models():
    async def fn(up, gw, s):
        up.release(3)
        st, js = await _post(s, gw.url, "a")
        assert st == 200 and js["id"] == "a"
        st, lines = await _post(s, gw.url, "b", stream=True)
        assert st == 200 and lines[-1] == b"data: [DONE]\n" and len(lines) == 4
        st, js = await _post(s, gw.url, "c", chat=True)
        assert st == 200 and js["id"] == "c"
        async with s.get(gw.url + "/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "m"
        async with s.get(gw.url + "/metrics") as r:
            text = await r.text()
        assert "palsctl_gateway_max_concurrency 4.0" in text
        assert "palsctl_gateway_completed_total 3.0" in text

    asyncio.run(_with_gateway(fn))


def test_shrink_mid_stream_no_drop_no_duplicate_and_limit_respected():
    async def fn(up, gw, s):
        n = 24
        tasks = [asyncio.create_task(_post(s, gw.url, f"r{i}", stream=i % 2 == 0))
                 for i in range(n)]
        for _ in range(6):                      # 6 in flight at the upstream
            await up.arrived.get()
        assert up.active == 6 and gw.gate.waiting == n - 6
        gw.gate.set_limit(2)                    # shrink while 6 are mid-request
        up.release(3)                           # 3 finish: still 3 >= 2 in flight, none admitted
        while gw.gate.completed_total < 3:
            await asyncio.sleep(0)
        assert up.active == 3 and gw.gate.in_flight == 3
        up.release(n)                           # release everything; observe the bound
        results = await asyncio.gather(*tasks)
        assert all(st == 200 for st, _ in results)
        assert sorted(up.seen) == sorted(f"r{i}" for i in range(n))   # each exactly once
        # the first 6 arrived under limit 6; every later arrival found at most 2 in flight
        assert up.active_at_arrival[:6] == [1, 2, 3, 4, 5, 6]
        assert max(up.active_at_arrival[6:]) <= 2
        assert gw.gate.max_in_flight_seen == 6
        assert gw.gate.in_flight == 0 and gw.gate.admitted_total == n

    asyncio.run(_with_gateway(fn, limit=6))


def test_concurrency_after_drain_never_exceeds_new_limit():
    async def fn(up, gw, s):
        n = 20
        tasks = [asyncio.create_task(_post(s, gw.url, f"q{i}")) for i in range(n)]
        for _ in range(8):
            await up.arrived.get()
        gw.gate.set_limit(3)
        peak_after_drain = 0
        drained = False
        done = 8
        up.release(8)      # the 8 old ones finish
        while done < n or up.active:
            if not drained and gw.gate.in_flight <= 3:
                drained = True
            if drained:
                peak_after_drain = max(peak_after_drain, up.active)
            if not up.arrived.empty():
                await up.arrived.get()
                up.release(1)
                done += 1
            await asyncio.sleep(0)
            if all(t.done() for t in tasks):
                break
        await asyncio.gather(*tasks)
        assert drained and 1 <= peak_after_drain <= 3
        assert len(up.seen) == n == len(set(up.seen))

    asyncio.run(_with_gateway(fn, limit=8))


def test_client_that_leaves_the_queue_never_reaches_upstream():
    async def fn(up, gw, s):
        held = asyncio.create_task(_post(s, gw.url, "held"))
        await up.arrived.get()
        async with aiohttp.ClientSession() as s2:       # a second client, queued
            queued = asyncio.create_task(_post(s2, gw.url, "gone"))
            while gw.gate.waiting == 0:
                await asyncio.sleep(0)
            queued.cancel()
            await asyncio.gather(queued, return_exceptions=True)
        while gw.gate.waiting:                           # its handler was cancelled
            await asyncio.sleep(0)
        up.release(2)
        assert (await held)[0] == 200
        st, js = await _post(s, gw.url, "next")
        assert st == 200 and up.seen == ["held", "next"]
        assert gw.gate.in_flight == 0

    asyncio.run(_with_gateway(fn, limit=1))


def test_control_endpoint_token_loopback_and_client():
    up_holder = {}
    started = threading.Event()

    def serve():
        async def main():
            up = await Upstream().start()
            gw = await Gateway(GatewayConfig(upstream=up.url, token=TOKEN,
                                             max_concurrency=5)).start()
            stop = asyncio.Event()
            up_holder.update(gw=gw, loop=asyncio.get_running_loop(), stop=stop)
            started.set()
            await stop.wait()
            await gw.stop()
            await up.runner.cleanup()
        asyncio.run(main())

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    assert started.wait(20)
    gw = up_holder["gw"]
    try:
        assert gw.control_url.startswith("http://127.0.0.1:")
        assert gw.control_url != gw.url
        with pytest.raises(GatewayError, match="token"):
            GatewayControl(gw.control_url, "wrong-token-xxxx").state()
        ctl = GatewayControl(gw.control_url, TOKEN)
        assert ctl.state()["max_concurrency"] == 5
        with pytest.raises(GatewayError, match="400"):
            ctl.set_max_concurrency(0)
        act = GatewayBatchActuator(ctl, launch_max=16)
        assert act.set_max_batch(100) == 16
        assert act.set_max_batch(3) == 3 and ctl.state()["max_concurrency"] == 3
        dry = GatewayBatchActuator(ctl, launch_max=16, dry_run=True)
        assert dry.set_max_batch(7) == 7 and ctl.state()["max_concurrency"] == 3
        act.close()
        assert ctl.state()["max_concurrency"] == 5
    finally:
        up_holder["loop"].call_soon_threadsafe(up_holder["stop"].set)
        th.join(20)
    with pytest.raises(GatewayError, match="cannot reach"):
        GatewayControl(gw.control_url, TOKEN, timeout_s=1).state()


def test_upstream_down_gives_502_and_frees_the_slot():
    async def main():
        gw = await Gateway(GatewayConfig(upstream="http://127.0.0.1:9", token=TOKEN,
                                         max_concurrency=1)).start()
        try:
            async with aiohttp.ClientSession() as s:
                for _ in range(2):
                    async with s.post(gw.url + "/v1/completions", json={"prompt": "x"}) as r:
                        assert r.status == 502
            assert gw.gate.in_flight == 0 and gw.gate.completed_total == 2
        finally:
            await gw.stop()

    asyncio.run(main())


# ------------------------------------------------------------------ gate properties

ops = st.lists(st.one_of(
    st.tuples(st.just("arrive"), st.just(0)),
    st.tuples(st.just("finish"), st.integers(0, 50)),
    st.tuples(st.just("resize"), st.integers(1, 6)),
    st.tuples(st.just("cancel"), st.integers(0, 50))), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), ops)
def test_gate_invariants_under_random_operations(limit0, operations):
    """Admissions happen only below the limit in force, in FIFO order of the requests still
    waiting; nothing is admitted twice; slots are never lost."""

    class CheckedGate(AdmissionGate):
        def _admit(self):
            assert self._in_flight < self._limit
            super()._admit()

    async def main():
        gate = CheckedGate(limit0)
        admitted, waiting, holding, cancelled = [], [], {}, set()
        next_id = 0

        async def req(i):
            await gate.acquire()
            admitted.append(i)
            ev = asyncio.Event()
            holding[i] = ev
            await ev.wait()
            del holding[i]
            gate.release()

        tasks = {}
        for op, arg in operations:
            if op == "arrive":
                tasks[next_id] = asyncio.create_task(req(next_id))
                waiting.append(next_id)
                next_id += 1
            elif op == "finish" and holding:
                list(holding.values())[arg % len(holding)].set()
            elif op == "resize":
                gate.set_limit(arg)
            elif op == "cancel":
                queued = [i for i in waiting if i not in admitted and i not in cancelled]
                if queued:
                    i = queued[arg % len(queued)]
                    tasks[i].cancel()
                    cancelled.add(i)
            for _ in range(4):
                await asyncio.sleep(0)
            assert gate.in_flight == len(holding)
        # admissions are FIFO among the requests that were not cancelled
        order = [i for i in waiting if i in set(admitted)]
        assert admitted == order
        assert len(admitted) == len(set(admitted))
        for ev in list(holding.values()):
            ev.set()
        gate.set_limit(100)
        for _ in range(10):
            await asyncio.sleep(0)
        for ev in list(holding.values()):
            ev.set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert gate.in_flight == 0 and gate.waiting == 0
        assert set(admitted) | cancelled == set(range(next_id))

    asyncio.run(main())


def test_compressed_upstream_body_passes_through_with_its_encoding():
    import gzip

    async def main():
        async def gz(request):
            return web.Response(body=gzip.compress(b'{"id": "z"}'), headers={
                "Content-Type": "application/json", "Content-Encoding": "gzip"})

        app = web.Application()
        app.router.add_post("/v1/completions", gz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = "http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]
        gw = await Gateway(GatewayConfig(upstream=url, token=TOKEN)).start()
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(gw.url + "/v1/completions", json={"prompt": "x"}) as r:
                    assert r.headers["Content-Encoding"] == "gzip"
                    assert (await r.json())["id"] == "z"      # the client decompresses
        finally:
            await gw.stop()
            await runner.cleanup()

    asyncio.run(main())
