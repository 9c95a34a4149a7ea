"""The emulator's HTTP surface: OpenAI completions/chat (streaming and not), /v1/models,
/metrics (parsed by palsctl's own vLLM parser), the power endpoint and the batch control file."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from palsctl.adapters.emulator import Emulator, EmulatorConfig, estimate_prompt_tokens
from palsctl.adapters.vllm_metrics import parse_metrics
from palsctl.adapters.vllm_scheduler import write_batch_target
from palsctl.errors import ConfigError
from palsctl.plants.sim import SimPlant

pytestmark = pytest.mark.timeout(60)


def run(fn, gpu="h100-sxm", gpus=2, **cfg):
    async def main():
        plant = SimPlant("llama-3.1-8b", gpu, gpus, max_batch_launch=16, seed=3)
        emu = await Emulator(plant, EmulatorConfig(served_model_name="m", speedup=4.0,
                                                   **cfg)).start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                return await fn(emu, s)
        finally:
            await emu.stop()
    return asyncio.run(main())


def test_completions_chat_models_and_metrics():
    async def fn(emu, s):
        async with s.get(emu.url + "/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "m"
        async with s.post(emu.url + "/v1/completions",
                          json={"model": "m", "prompt": "x" * 40, "max_tokens": 7}) as r:
            js = await r.json()
        assert js["object"] == "text_completion"
        assert js["usage"] == {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}
        assert js["choices"][0]["text"].count(" w") == 7
        async with s.post(emu.url + "/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "hi"}],
                "max_completion_tokens": 5, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            lines = [ln for ln in (await r.read()).split(b"\n\n") if ln]
        assert lines[-1] == b"data: [DONE]"
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                       if c["choices"])
        assert text.count(" w") == 5
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 5
        async with s.get(emu.url + "/metrics") as r:
            snap = parse_metrics(await r.text(), model_name="m")
        assert snap.generation_tokens == 12 and snap.requests_finished == 2
        assert snap.ttft.count == 2 and snap.tpot.count == 10 and snap.running == 0
        assert snap.prompt_tokens == 10 + 4 + 1
        return emu.served

    assert run(fn) == 2


def test_bad_requests():
    async def fn(emu, s):
        cases = [({"model": "other", "prompt": "x"}, 404),
                 ({"model": "m", "prompt": "x", "max_tokens": 0}, 400),
                 ({"model": "m", "prompt": "x", "max_tokens": "5"}, 400),
                 ({"model": "m", "prompt": 5}, 400)]
        for body, status in cases:
            async with s.post(emu.url + "/v1/completions", json=body) as r:
                assert r.status == status, body
        async with s.post(emu.url + "/v1/chat/completions", json={"messages": []}) as r:
            assert r.status == 400
        async with s.post(emu.url + "/v1/completions", data=b"{not json") as r:
            assert r.status == 400
        async with s.post(emu.url + "/palsctl/power/cap", json={"power_cap_w": "x"}) as r:
            assert r.status == 400

    run(fn)


def test_request_larger_than_kv_cache_rejected():
    async def fn(emu, s):
        kv = emu.plant.info.extra["kv_capacity_tokens"]
        assert kv < 250_000
        async with s.post(emu.url + "/v1/completions",
                          json={"model": "m", "prompt": "x" * (4 * kv), "max_tokens": 10}) as r:
            assert r.status == 400 and "KV cache" in (await r.json())["message"]

    run(fn, gpu="a100-sxm4-40gb", gpus=1)


def test_power_endpoint_caps_and_energy():
    async def fn(emu, s):
        async with s.get(emu.url + "/palsctl/power") as r:
            p0 = await r.json()
        assert len(p0["gpus"]) == 2 and p0["power_cap_max_w"] == 700
        async with s.post(emu.url + "/palsctl/power/cap", json={"power_cap_w": 1e6}) as r:
            assert (await r.json())["applied_power_cap_w"] == 700.0       # clamped
        async with s.post(emu.url + "/palsctl/power/cap", json={"power_cap_w": 250.4}) as r:
            p1 = await r.json()
        assert p1["applied_power_cap_w"] == 250.0
        assert all(g["power_limit_w"] == 250.0 for g in p1["gpus"])
        assert p1["gpus"][0]["energy_j"] >= p0["gpus"][0]["energy_j"]

    run(fn)


def test_batch_file_limits_running(tmp_path):
    bf = tmp_path / "batch"
    write_batch_target(bf, 3)

    async def fn(emu, s):
        peak = 0

        async def one(i):
            async with s.post(emu.url + "/v1/completions",
                              json={"model": "m", "prompt": f"p{i}", "max_tokens": 40}) as r:
                assert r.status == 200

        tasks = [asyncio.create_task(one(i)) for i in range(10)]
        while not all(t.done() for t in tasks):
            await emu._next_tick()
            peak = max(peak, len(emu.plant.engine.running))
        await asyncio.gather(*tasks)
        return peak

    peak = run(fn, batch_file=str(bf))
    assert 1 <= peak <= 3


def test_prompt_estimate_and_config_validation():
    assert estimate_prompt_tokens("abcd" * 10) == 10
    assert estimate_prompt_tokens([1, 2, 3]) == 3
    assert estimate_prompt_tokens(["abcd", "abcdabcd"]) == 3
    with pytest.raises(ValueError):
        estimate_prompt_tokens(3.5)
    with pytest.raises(ConfigError):
        EmulatorConfig(speedup=0)
    with pytest.raises(ConfigError):
        EmulatorConfig(tick_s=5)


def test_emulator_power_is_a_sensor_and_actuator_that_reads_back():
    from palsctl.adapters.emulator import EmulatorPower, restore_limit
    from palsctl.errors import ActuatorError
    from palsctl.interfaces import Actuator, Sensor
    from palsctl.types import Action

    async def fn(emu, s):
        def sync():
            p = EmulatorPower(emu.url)
            assert isinstance(p, Sensor) and isinstance(p, Actuator)
            assert p.state_targets() == [{"kind": "emulator", "url": emu.url,
                                          "power_limit_w": 700.0}]
            p.prime()
            m = p.read()
            assert m.power_cap_w == 700.0 and m.power_w > 0 and m.energy_j > 0
            assert p.apply(Action(power_cap_w=300.4)) == Action(power_cap_w=300.0)
            restore_limit(emu.url, 650.0)          # someone else changes the limit
            assert p.read().power_cap_w == 650.0 and p.power_cap_w == 650.0
            assert p.apply(Action(power_cap_w=300.0)) == Action(power_cap_w=300.0)
            assert p.drift.events == 1 and p.apply(Action()) == Action(power_cap_w=300.0)
            p.close()
            after = EmulatorPower(emu.url).read_gpus()
            with pytest.raises(ActuatorError, match="could not restore"):
                restore_limit("http://127.0.0.1:9", 700.0, timeout_s=0.5)
            return [g.power_limit_w for g in after]

        return await asyncio.to_thread(sync)

    assert run(fn) == [700.0, 700.0]
