"""Contract and behaviour of the simulated plant (SimPlant)."""
import math

import numpy as np
import pytest

from palsctl.errors import ConfigError, UnknownNameError
from palsctl.interfaces import SimulatedPlant
from palsctl.plants.sim import GPU_PRESETS, MODEL_PRESETS, SimPlant, get_gpu, get_model
from palsctl.types import Action, Request


def _backlog(n, prompt=200, output=100, start=0, seed=0, spread=0.5):
    rng = np.random.default_rng(seed)
    lo, hi = max(1, int(output * (1 - spread))), int(output * (1 + spread))
    outs = rng.integers(lo, hi + 1, size=n)
    return [Request(request_id=start + i, arrival_s=0.0, prompt_tokens=prompt,
                    output_tokens=int(outs[i])) for i in range(n)]


def test_required_presets_exist():
    for g in ("a100-sxm4-80gb", "a100-sxm4-40gb", "h100-sxm", "h200", "b200"):
        assert get_gpu(g).name == g
    for m in ("llama-3.1-8b", "qwen3-8b", "qwen3-14b", "qwen3-32b", "qwen3-30b-a3b",
              "mixtral-8x7b", "deepseek-moe-16b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b",
              "gpt-oss-20b"):
        assert get_model(m).name == m
    assert get_model("mixtral-8x7b").is_moe and not get_model("qwen3-8b").is_moe


def test_contract_limits_info_and_defaults():
    p = SimPlant(model="mixtral-8x7b", gpu="a100-sxm4-80gb", num_gpus=4, dt_s=1.0, seed=0,
                 max_batch_launch=256, power_cap_w=None, max_batch=None, noise=True)
    assert isinstance(p, SimulatedPlant)
    lim = p.limits
    assert (lim.power_cap_min_w, lim.power_cap_max_w, lim.power_cap_default_w) == (100, 400, 400)
    assert lim.power_cap_step_w == 1.0 and lim.max_batch_max == 256 and lim.num_gpus == 4
    assert p.info.model == "mixtral-8x7b" and p.info.gpu == "a100-sxm4-80gb"
    assert p.info.num_gpus == 4 and p.info.simulated
    assert p.dt_s == 1.0 and p.now_s == 0.0
    applied = p.apply(Action())
    assert applied.power_cap_w == 400 and applied.max_batch == 256


def test_default_plant_is_valid():
    p = SimPlant()
    assert p.info.model == "mixtral-8x7b" and p.info.num_gpus == 4


def test_idle_plant_draws_idle_power():
    p = SimPlant("llama-3.1-8b", "h100-sxm", 1, noise=False)
    p.advance(5.0)
    m = p.read()
    assert m.t_s == 5.0 and m.window_s == 5.0
    assert m.power_w == pytest.approx(GPU_PRESETS["h100-sxm"].idle_w)
    assert m.energy_j == pytest.approx(5.0 * m.power_w)
    assert m.throughput_tok_s == 0 and m.running == 0 and m.waiting == 0
    assert m.ttft_p90_s is None and m.tpot_p90_s is None


def test_apply_clamps_to_limits():
    p = SimPlant("llama-3.1-8b", "h100-sxm", 1, max_batch_launch=64)
    a = p.apply(Action(power_cap_w=10_000, max_batch=0))
    assert a.power_cap_w == 700 and a.max_batch == 1
    a = p.apply(Action(power_cap_w=50.0, max_batch=1000))
    assert a.power_cap_w == 200 and a.max_batch == 64
    a = p.apply(Action(power_cap_w=333.7))
    assert a.power_cap_w == 333 and a.max_batch == 64


def test_serves_requests_and_reports_latencies():
    p = SimPlant("llama-3.1-8b", "h100-sxm", 1, noise=False)
    p.submit([Request(request_id=i, arrival_s=0.1 * i, prompt_tokens=300, output_tokens=50)
              for i in range(40)])
    p.advance(1.0)
    m = p.read()
    assert m.throughput_tok_s > 0 and m.prompt_tok_s > 0
    assert m.ttft_p90_s is not None and 0 < m.ttft_p90_s < 1.0
    assert m.demand_tok_s == pytest.approx(10 * 50 / 1.0)
    p.advance(10.0)
    p.read()
    done = p.completed()
    assert len(done) == 40 and p.completed() == []
    for r in done:
        assert r.first_token_s >= r.arrival_s and r.finish_s > r.first_token_s
        assert 0.004 < r.tpot_s < 0.05
    assert p.progress(3) == (50, True)


def test_progress_streams_tokens():
    p = SimPlant("llama-3.1-8b", "h100-sxm", 1, noise=False)
    p.submit([Request(request_id=7, arrival_s=0.0, prompt_tokens=100, output_tokens=400)])
    assert p.progress(7) == (0, False)
    p.advance(0.5)
    n1, f1 = p.progress(7)
    p.advance(0.5)
    n2, f2 = p.progress(7)
    assert 0 < n1 < n2 <= 400 and not f1
    with pytest.raises(KeyError):
        p.progress(12345)


def test_energy_counter_is_integral_of_power_and_monotonic():
    p = SimPlant("qwen3-8b", "h100-sxm", 1, noise=True, seed=3)
    p.submit(_backlog(3000, prompt=500, output=200))
    e_prev, total = 0.0, 0.0
    for k in range(20):
        p.apply(Action(power_cap_w=700 - 20 * k, max_batch=16 + 8 * k))
        p.advance(0.5)
        m = p.read()
        assert m.energy_j >= e_prev
        e_prev = m.energy_j
        total += m.power_w * m.window_s
    # noisy window means integrate to the counter within the noise
    assert total == pytest.approx(e_prev, rel=0.01)
    c = p.counters()
    assert sum(c.energy_j) == pytest.approx(e_prev)


def test_counters_snapshot():
    p = SimPlant("mixtral-8x7b", "a100-sxm4-80gb", 4, noise=False)
    p.submit(_backlog(500))
    p.advance(3.0)
    c = p.counters()
    assert len(c.power_instant_w) == 4 and len(c.power_avg_1s_w) == 4 and len(c.energy_j) == 4
    assert all(100 < w <= 400 for w in c.power_avg_1s_w)
    assert c.generation_tokens_total > 0 and c.prompt_tokens_total > 0
    assert c.itl_s.count > 0 and c.ttft_s.count > 0
    assert c.itl_s.cumulative_counts[-1] == c.itl_s.count
    assert list(c.itl_s.cumulative_counts) == sorted(c.itl_s.cumulative_counts)
    assert len(c.ttft_s.cumulative_counts) == len(c.ttft_s.bounds_s) + 1
    assert c.sm_clock_mhz > 0 and c.power_cap_w == 400


def _trajectory(seed, noise=True):
    p = SimPlant("qwen3-30b-a3b", "h100-sxm", 1, seed=seed, noise=noise)
    p.submit([Request(request_id=i, arrival_s=0.05 * i, prompt_tokens=100 + (i * 37) % 900,
                      output_tokens=20 + (i * 53) % 400) for i in range(400)])
    out = []
    for k in range(15):
        p.apply(Action(power_cap_w=700 - 25 * k, max_batch=8 + 4 * k))
        p.advance(1.0)
        out.append(p.read())
    return out


def test_same_seed_same_trajectory_other_seed_differs_in_noise_only():
    a, b, c = _trajectory(1), _trajectory(1), _trajectory(2)
    assert a == b
    assert [m.power_w for m in a] != [m.power_w for m in c]
    def strip(ms):
        return [(m.energy_j, m.throughput_tok_s, m.running, m.waiting, m.kv_usage,
                 m.ttft_p90_s, m.tpot_p90_s) for m in ms]

    assert strip(a) == strip(c)
    for ma, mc in zip(a, c):
        assert mc.power_w == pytest.approx(ma.power_w, rel=0.06)


@pytest.mark.parametrize("kw, key", [
    (dict(power_cap_w=50.0), "power_cap_w"),
    (dict(power_cap_w=900.0), "power_cap_w"),
    (dict(max_batch=0), "max_batch"),
    (dict(max_batch=1000), "max_batch"),
    (dict(max_batch_launch=0), "max_batch_launch"),
    (dict(dt_s=0.0), "dt_s"),
])
def test_bad_constructor_input_raises_config_error(kw, key):
    with pytest.raises(ConfigError) as ei:
        SimPlant("llama-3.1-8b", "h100-sxm", 1, **kw)
    assert key in str(ei.value)


def test_unknown_presets_list_known_names():
    with pytest.raises(UnknownNameError) as ei:
        SimPlant("gpt-5", "h100-sxm")
    assert "gpt-5" in str(ei.value) and "llama-3.1-8b" in str(ei.value)
    with pytest.raises(UnknownNameError) as ei:
        SimPlant("llama-3.1-8b", "h800")
    assert "h800" in str(ei.value) and "a100-sxm4-80gb" in str(ei.value)


def test_model_too_big_for_gpus_is_an_error():
    with pytest.raises(ConfigError, match="does not fit"):
        SimPlant("qwen3-235b-a22b", "h100-sxm", 1)


def test_all_presets_construct_and_run():
    for name in MODEL_PRESETS:
        m = get_model(name)
        n = max(1, math.ceil(m.weight_bytes / 50e9))
        n = 1 << (n - 1).bit_length()
        p = SimPlant(name, "h200", n, noise=False)
        p.submit(_backlog(50, prompt=100, output=20))
        p.advance(2.0)
        assert p.read().throughput_tok_s > 0, name


def test_request_longer_than_kv_cache_is_refused_not_lost():
    p = SimPlant("llama-3.1-8b", "h100-sxm", 1, noise=False)
    cap = p.engine.kv_cap
    p.submit([Request(request_id=1, arrival_s=0.0, prompt_tokens=cap, output_tokens=10),
              Request(request_id=2, arrival_s=0.0, prompt_tokens=10, output_tokens=10)])
    p.advance(1.0)
    assert p.rejected == 1
    with pytest.raises(KeyError, match="refused"):
        p.progress(1)
    assert [r.request_id for r in p.completed()] == [2]


def test_submit_rejects_bad_requests():
    p = SimPlant("llama-3.1-8b", "h100-sxm", 1)
    with pytest.raises(ConfigError):
        p.submit([Request(request_id=1, arrival_s=0.0, prompt_tokens=0, output_tokens=5)])
    p.submit([Request(request_id=3, arrival_s=0.0, prompt_tokens=5, output_tokens=5)])
    with pytest.raises(ConfigError, match="duplicate"):
        p.submit([Request(request_id=3, arrival_s=1.0, prompt_tokens=5, output_tokens=5)])


def test_gpu_presets_rank_as_datasheets_say():
    from palsctl.plants.sim import steady_state
    thr = {g: steady_state("llama-3.1-8b", g, 1, 16, prompt_tokens=200, output_tokens=400)
           .throughput_tok_s for g in ("a100-sxm4-40gb", "a100-sxm4-80gb", "h100-sxm", "h200",
                                       "b200")}
    # memory-bound decode: throughput follows HBM bandwidth
    assert thr["a100-sxm4-40gb"] < thr["a100-sxm4-80gb"] < thr["h100-sxm"] < thr["h200"] \
        < thr["b200"]
    for g in GPU_PRESETS.values():
        assert g.idle_w < g.min_cap_w < g.tdp_w and g.min_sm_clock_mhz < g.max_sm_clock_mhz


def test_more_gpus_split_the_work():
    from palsctl.plants.sim import steady_state
    one = steady_state("qwen3-32b", "h100-sxm", 1, 8, prompt_tokens=200, output_tokens=400)
    two = steady_state("qwen3-32b", "h100-sxm", 2, 8, prompt_tokens=200, output_tokens=400)
    assert two.itl_median_s < one.itl_median_s and two.power_w > one.power_w
