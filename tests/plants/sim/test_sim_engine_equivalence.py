"""The fast engine reproduces the reference engine (the step path before it was rewritten for
speed, `reference_engine.py`): same measurements every control step, same finished requests,
same counters and histograms, on fixed scenarios that cover the engine's paths (saturated mixed
steps, decode leaps, throttling under a cap and its settling, preemption, expert parallelism,
sliding windows, submissions out of arrival order).

The rewrite keeps every floating-point operation in the same order, so the two agree bit for
bit; the comparison allows a relative 1e-9 so that only a real change of behaviour fails it.
"""
import dataclasses
import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palsctl.plants.sim import SimPlant, get_gpu
from palsctl.types import Action, Request
from palsctl.workloads.synthetic import LogNormalLengths, PoissonWorkload, azure_conv_workload
from tests.plants.sim.reference_engine import reference_plant

REL = 1e-9


def _same(a, b, where: str) -> None:
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), f"{where}: {a} vs {b}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), f"{where}: {a} {b}"
        assert math.isclose(a, b, rel_tol=REL, abs_tol=1e-12), f"{where}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _compare(make, script, n_steps: int, dt_s: float = 1.0, counters_every: int = 25):
    """Drive the fast plant and the reference plant (``make(reference)`` builds one) through
    the same control loop: ``script(k, plant)`` submits requests and applies actions before
    step ``k``; compare everything a user of the plant can see. Returns the fast plant."""
    fast, ref = make(False), make(True)
    for k in range(n_steps):
        for p in (fast, ref):
            script(k, p)
            p.advance(dt_s)
        where = f"step {k}"
        _same(fast.read(), ref.read(), f"{where} read")
        _same(fast.completed(), ref.completed(), f"{where} completed")
        if k % counters_every == counters_every - 1:
            _same(fast.counters(), ref.counters(), f"{where} counters")
    _same(fast.counters(), ref.counters(), "end counters")
    fe, re_ = fast.engine, ref.engine
    for name in ("dstep", "gen_tokens", "prompt_tokens", "arrived", "finished", "preemptions",
                 "kv_used", "dec_n", "rejected"):
        _same(getattr(fe, name), getattr(re_, name), f"engine.{name}")
    for t in (fe.t, fe.t - 0.05, fe.t - 0.7, fe.t - 2.4, fe.t - 3.0, fe.t - 30.0):
        _same(fe.energy_at(t), re_.energy_at(t), f"energy_at({t})")
        _same(fe.clock_at(t), re_.clock_at(t), f"clock_at({t})")
    return fast


def _plant(*args, **kwargs):
    return lambda reference: (reference_plant if reference else SimPlant)(*args, **kwargs)


def _feed(workload, moves=None):
    """Submit the workload's arrivals of the coming second before each step, and apply
    ``moves[k]`` (an `Action`) before step ``k``."""
    moves = moves or {}

    def script(k, plant):
        plant.submit(workload.requests_between(float(k), float(k + 1)))
        if k in moves:
            plant.apply(moves[k])
    return script


def _backlog(n, prompt, output, seed=0):
    rng = np.random.default_rng(seed)
    outs = rng.integers(output // 2, output + output // 2 + 1, size=n)
    return [Request(request_id=i, arrival_s=0.0, prompt_tokens=prompt, output_tokens=int(x))
            for i, x in enumerate(outs)]


@pytest.mark.slow
def test_mixtral_4xa100_azure_conv_300s_with_moving_caps():
    moves = {60: Action(power_cap_w=200.0), 120: Action(power_cap_w=150.0, max_batch=64),
             180: Action(power_cap_w=400.0), 240: Action(max_batch=256)}
    wl = {}

    def make(reference):
        p = _plant("mixtral-8x7b", "a100-sxm4-80gb", 4, seed=1)(reference)
        wl[id(p)] = azure_conv_workload(seed=3)     # one per plant: it draws lengths lazily
        return p

    def script(k, plant):
        _feed(wl[id(plant)], moves)(k, plant)
    fast = _compare(make, script, 300)
    assert fast.engine.finished > 1000


def test_llama8b_h100_saturated_batch256_with_a_cap_cut():
    reqs = _backlog(3000, 512, 256)
    moves = {40: Action(power_cap_w=400.0), 70: Action(power_cap_w=700.0)}

    def script(k, plant):
        if k == 0:
            plant.submit(reqs)
        if k in moves:
            plant.apply(moves[k])
    fast = _compare(_plant("llama-3.1-8b", "h100-sxm", 1, max_batch_launch=256, noise=False),
                    script, 100)
    assert fast.engine.waiting and fast.engine.finished > 1500


@pytest.mark.parametrize("parallelism", ["ep", "tp+ep"])
def test_qwen3_moe_2xh100_expert_parallel(parallelism):
    lengths = dict(prompt=LogNormalLengths(mu=6.0, sigma=1.0, min_tokens=4, max_tokens=8000),
                   output=LogNormalLengths(mu=5.0, sigma=0.8, min_tokens=4, max_tokens=1500))
    wl = {}

    def make(reference):
        p = _plant("qwen3-30b-a3b", "h100-sxm", 2, parallelism=parallelism, seed=2,
                   max_batch_launch=512)(reference)
        wl[id(p)] = PoissonWorkload(40.0, seed=5, **lengths)
        return p

    def script(k, plant):
        _feed(wl[id(plant)], {30: Action(power_cap_w=300.0), 45: Action(max_batch=32)})(k, plant)
    fast = _compare(make, script, 60)
    assert fast.engine.finished > 500


def test_sliding_window_model_under_load():
    lengths = dict(prompt=LogNormalLengths(mu=7.0, sigma=1.0, min_tokens=4, max_tokens=20000),
                   output=LogNormalLengths(mu=5.5, sigma=0.8, min_tokens=4, max_tokens=3000))
    wl = {}

    def make(reference):
        p = _plant("gpt-oss-20b", "h100-sxm", 1, seed=4, noise=False)(reference)
        wl[id(p)] = PoissonWorkload(12.0, seed=6, **lengths)
        return p

    def script(k, plant):
        _feed(wl[id(plant)])(k, plant)
    fast = _compare(make, script, 60)
    assert fast.engine.finished > 200


def _tiny_kv_gpu():
    return dataclasses.replace(get_gpu("h100-sxm"), name="h100-tiny", mem_bytes=21e9)


def test_kv_limited_admission_and_preemption_with_a_backlog():
    """The KV cache, not the batch, bounds the running set: admission at the watermark every
    few steps, preemptions when decode outgrows the cache."""
    rnd = random.Random(7)
    reqs = [Request(request_id=i, arrival_s=0.0, prompt_tokens=rnd.randint(200, 3000),
                    output_tokens=rnd.randint(50, 2000)) for i in range(600)]

    def script(k, plant):
        if k == 0:
            plant.submit(reqs)
        if k == 20:
            plant.apply(Action(power_cap_w=300.0))
    fast = _compare(_plant("llama-3.1-8b", _tiny_kv_gpu(), 1, max_batch_launch=256, seed=7),
                    script, 60)
    assert fast.engine.preemptions > 0 and fast.engine.waiting


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(5, 80), batch=st.integers(1, 64),
       dt=st.sampled_from([0.05, 0.3, 1.0]))
def test_preemption_knob_moves_and_out_of_order_submissions(seed, n, batch, dt):
    """Tiny KV cache (preemption), caps and batches moving while requests are in flight,
    requests submitted in batches whose arrival times go back and forth."""
    kv_cap = SimPlant("llama-3.1-8b", _tiny_kv_gpu(), 1).engine.kv_cap
    rnd = random.Random(seed)
    reqs = [Request(request_id=i, arrival_s=rnd.uniform(0, 6),
                    prompt_tokens=rnd.randint(1, kv_cap // 4),
                    output_tokens=rnd.randint(1, kv_cap // 4)) for i in range(n)]
    batches = [reqs[i:i + 7] for i in range(0, n, 7)]
    moves = {k: Action(power_cap_w=rnd.uniform(100, 800), max_batch=rnd.randint(1, 64))
             for k in range(0, 100, 7)}

    def script(k, plant):
        if k < len(batches):
            plant.submit(batches[k])
        if k in moves:
            plant.apply(moves[k])
    fast = _compare(_plant("llama-3.1-8b", _tiny_kv_gpu(), 1, max_batch_launch=batch, seed=seed),
                    script, 150, dt_s=dt)
    assert fast.engine.arrived == len(reqs) - fast.engine.rejected


def test_request_results_built_fast_equal_the_dataclass_and_fall_back():
    from palsctl.plants.sim import engine
    from palsctl.types import RequestResult

    args = (7, 0.25, 100, 30, 0.5, 3.75, 2)
    fast = engine._request_result(*args)
    slow = RequestResult(request_id=7, arrival_s=0.25, prompt_tokens=100, output_tokens=30,
                         first_token_s=0.5, finish_s=3.75, preemptions=2)
    assert type(fast) is RequestResult and fast == slow and hash(fast) == hash(slow)
    assert fast.tpot_s == slow.tpot_s and fast.ttft_s == slow.ttft_s
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.finish_s = 0.0
    assert engine._request_result.__name__ == "make_fast"   # the fast path is in use

    @dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
    class Other:                     # a different shape: the real constructor is used
        request_id: int
        arrival_s: float
        prompt_tokens: int
        output_tokens: int
        first_token_s: float
        finish_s: float
        preemptions: int = 0
        extra: int = 5

    real = engine.RequestResult
    try:
        engine.RequestResult = Other
        make = engine._result_factory()
    finally:
        engine.RequestResult = real
    r = make(*args)
    assert make.__name__ == "make" and isinstance(r, Other) and r.extra == 5 and r.finish_s == 3.75


def test_energy_history_trimmed_inside_long_advances(monkeypatch):
    """Long ``advance`` calls trim the energy history as they go (here every 40 segments):
    windowed energies and the firmware's 0.1 s window see what the reference sees."""
    from palsctl.plants.sim import engine

    monkeypatch.setattr(engine, "HISTORY_TRIM", 40)
    wl = {}

    def make(reference):
        p = _plant("mixtral-8x7b", "a100-sxm4-80gb", 4, seed=1, power_cap_w=180.0)(reference)
        wl[id(p)] = azure_conv_workload(seed=8)
        return p

    def script(k, plant):
        plant.submit(wl[id(plant)].requests_between(7.0 * k, 7.0 * (k + 1)))
        if k == 6:
            plant.apply(Action(power_cap_w=300.0))
    fast = _compare(make, script, 12, dt_s=7.0, counters_every=3)
    assert len(fast.engine._hist) < 200 and fast.engine.finished > 200
