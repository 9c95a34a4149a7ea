"""Properties of the pure allocator (hypothesis) and a few worked cases."""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palsctl.cluster.allocate import Envelope, Replica, allocate, envelope_from_model, served_tok_s

TOL = 1e-6


@st.composite
def envelopes(draw, lo: float, hi: float) -> Envelope:
    """A random concave non-decreasing curve spanning [lo, hi]."""
    k = draw(st.integers(1, 6))
    cuts = sorted(draw(st.lists(st.floats(0.05, 0.95), min_size=k - 1, max_size=k - 1,
                                unique=True)))
    p = [lo] + [lo + c * (hi - lo) for c in cuts] + [hi]
    slopes = sorted(draw(st.lists(st.floats(0.0, 20.0), min_size=len(p) - 1,
                                  max_size=len(p) - 1)), reverse=True)
    x0 = draw(st.floats(0.0, 2000.0))
    x = [x0]
    for s, a, b in zip(slopes, p, p[1:]):
        x.append(x[-1] + s * (b - a))
    return Envelope.hull(p, x)


@st.composite
def fleets(draw, min_n: int = 1, max_n: int = 12):
    n = draw(st.integers(min_n, max_n))
    reps = []
    for i in range(n):
        lo = draw(st.floats(50.0, 800.0))
        hi = lo + draw(st.floats(1.0, 2500.0))
        env = draw(envelopes(lo, hi))
        demand = draw(st.one_of(st.none(), st.floats(0.0, 50000.0)))
        reps.append(Replica(name=f"r{i}", min_w=lo, max_w=hi, envelope=env, demand_tok_s=demand))
    return reps


policies = st.sampled_from(["equal", "proportional", "marginal"])


@settings(max_examples=60, deadline=None)
@given(fleets(), st.floats(0.0, 40000.0), st.floats(0.0, 500.0), policies)
def test_sum_within_budget_and_bounds_respected(reps, budget, reserve, policy):
    a = allocate(reps, budget, policy=policy, reserve_w=reserve)
    s = np.array(a.shares_w)
    assert s.sum() <= max(0.0, budget - reserve) + TOL
    lo = np.array([r.min_w for r in reps])
    hi = np.array([r.max_w for r in reps])
    assert (s <= hi + TOL).all()
    if a.feasible:
        assert (s >= lo - TOL).all()
        # nothing left on the table while someone could take more
        assert s.sum() >= min(hi.sum(), budget - reserve) - 1e-6 * max(1.0, budget) \
            or policy == "marginal"
    else:
        assert lo.sum() > budget - reserve


@settings(max_examples=60, deadline=None)
@given(fleets(), st.floats(0.0, 30000.0), st.floats(0.0, 8000.0), policies)
def test_monotone_in_budget(reps, budget, extra, policy):
    a = allocate(reps, budget, policy=policy)
    b = allocate(reps, budget + extra, policy=policy)
    for x, y in zip(a.shares_w, b.shares_w):
        assert y >= x - 1e-6 * max(1.0, budget + extra)


@settings(max_examples=60, deadline=None)
@given(fleets(min_n=2), st.floats(0.0, 30000.0))
def test_marginal_equalises_marginal_gains(reps, budget):
    """KKT: every replica strictly inside its bounds (and in the same fill phase) has a left
    slope >= lambda >= right slope of its (demand-truncated) envelope."""
    a = allocate(reps, budget, policy="marginal")
    if not a.feasible or a.marginal_tok_s_per_w is None:
        return
    lam = a.marginal_tok_s_per_w
    needs = a.needs_w
    all_needs_met = all(s >= n - 1e-6 for s, n in zip(a.shares_w, needs))
    for r, s, n in zip(reps, a.shares_w, needs):
        if not (r.min_w + 1e-6 < s < r.max_w - 1e-6):
            continue
        left, right = r.envelope.slopes(s)
        if all_needs_met:
            # phase 1 (headroom above the needs): replicas above their need are water-filled
            if s > n + 1e-6 and right > 1e-9:
                assert left >= lam - 1e-6 and right <= lam + 1e-6
        elif s < n - 1e-6:
            # phase 0 (up to the needs): replicas below their need are water-filled
            assert left >= lam - 1e-6 and right <= lam + 1e-6


@settings(max_examples=60, deadline=None)
@given(fleets(), st.floats(0.0, 30000.0))
def test_marginal_serves_at_least_equal(reps, budget):
    m = allocate(reps, budget, policy="marginal")
    e = allocate(reps, budget, policy="equal")
    p = allocate(reps, budget, policy="proportional")
    got = served_tok_s(reps, m.shares_w)
    assert got >= served_tok_s(reps, e.shares_w) - 1e-6 * max(1.0, got)
    assert got >= served_tok_s(reps, p.shares_w) - 1e-6 * max(1.0, got)


def test_needs_served_first_then_headroom():
    env = Envelope(power_w=(400.0, 800.0, 1600.0), throughput_tok_s=(1000.0, 3000.0, 4000.0))
    r = [Replica(name="a", min_w=400, max_w=1600, envelope=env, demand_tok_s=2000.0),
         Replica(name="b", min_w=400, max_w=1600, envelope=env, demand_tok_s=3500.0)]
    # needs: a 600 W, b 1200 W
    a = allocate(r, 1800.0, policy="marginal")
    assert a.needs_w == pytest.approx((600.0, 1200.0))
    assert a.shares_w == pytest.approx((600.0, 1200.0))
    # short of the needs: the steep part first (a's 400-600 W and b's 600-800 W: 5 tok/s/W)
    a = allocate(r, 1200.0, policy="marginal")
    assert a.shares_w == pytest.approx((600.0, 600.0))
    assert a.marginal_tok_s_per_w == pytest.approx(5.0)
    # beyond the needs the rest is spread where the envelope still rises, then flat headroom
    a = allocate(r, 3200.0, policy="marginal")
    assert a.shares_w == pytest.approx((1600.0, 1600.0))
    a = allocate(r, 2200.0, policy="marginal")
    assert sum(a.shares_w) == pytest.approx(2200.0)
    # a's 600-800 W (5 tok/s/W) first, then 1.25 tok/s/W for both: the tie goes in order
    assert a.shares_w == pytest.approx((1000.0, 1200.0))


def test_equal_and_proportional_clip_and_redistribute():
    r = [Replica(name="a", min_w=100, max_w=300, demand_tok_s=None),
         Replica(name="b", min_w=100, max_w=2000, demand_tok_s=None)]
    assert allocate(r, 1000.0, policy="equal").shares_w == pytest.approx((300.0, 700.0))
    assert allocate(r, 150.0, policy="equal").feasible is False
    assert sum(allocate(r, 150.0, policy="equal").shares_w) <= 150.0
    env = Envelope(power_w=(100.0, 2000.0), throughput_tok_s=(0.0, 1900.0))
    r = [Replica(name="a", min_w=100, max_w=2000, envelope=env, demand_tok_s=400.0),
         Replica(name="b", min_w=100, max_w=2000, envelope=env, demand_tok_s=1200.0)]
    # needs 500 W and 1300 W: proportional splits 900 W as 250 / 650
    assert allocate(r, 900.0, policy="proportional").shares_w == pytest.approx((250.0, 650.0))


def test_errors():
    r = [Replica(name="a", min_w=100, max_w=300)]
    with pytest.raises(ValueError, match="unknown allocation policy"):
        allocate(r, 100.0, policy="fair")
    with pytest.raises(ValueError, match="needs an envelope"):
        allocate(r, 200.0, policy="marginal")
    with pytest.raises(ValueError, match="budget_w"):
        allocate(r, float("nan"))
    with pytest.raises(ValueError, match="concave"):
        Envelope(power_w=(1.0, 2.0, 3.0), throughput_tok_s=(0.0, 1.0, 3.0))


def test_hull_is_upper_concave_envelope():
    rng = np.random.default_rng(0)
    p = rng.uniform(100, 1000, 200)
    x = np.sqrt(p) * rng.uniform(0.5, 1.0, 200)
    env = Envelope.hull(p, x)
    assert (env(p) >= x - 1e-9).all()   # above every point
    assert env.throughput_tok_s[-1] == pytest.approx(x.max())


def test_envelope_from_the_simulators_model_respects_the_slo():
    from palsctl.controllers.model_source import model_for
    from palsctl.types import PlantInfo

    info = PlantInfo(model="llama-3.1-8b", gpu="h100-sxm", num_gpus=1, simulated=True,
                     prompt_tokens_mean=512.0, output_tokens_mean=256.0)
    ppm = model_for(info)
    loose = envelope_from_model(ppm, num_gpus=1, power_cap_min_w=200.0, power_cap_max_w=700.0,
                                max_batch=256)
    tight = envelope_from_model(ppm, num_gpus=1, power_cap_min_w=200.0, power_cap_max_w=700.0,
                                max_batch=256, tpot_slo_s=0.03)
    assert loose.throughput_tok_s[-1] > tight.throughput_tok_s[-1]
    assert loose.power_w[-1] <= 700.0 + 1e-9
    lam = np.diff(loose.throughput_tok_s) / np.diff(loose.power_w)
    assert (np.diff(lam) <= 1e-9).all()


def test_256_replicas_allocate_fast_enough_to_tick_every_period():
    """A smoke bound (the figure itself is measured in bench/bench_fleet.py)."""
    rng = np.random.default_rng(1)
    reps = []
    for i in range(256):
        lo, hi = 400.0, 1600.0
        p = np.linspace(lo, hi, 14)
        x = 5000 * np.sqrt((p - 300) / 1300) * rng.uniform(0.5, 1.5)
        reps.append(Replica(name=f"r{i}", min_w=lo, max_w=hi, envelope=Envelope.hull(p, x),
                            demand_tok_s=float(rng.uniform(1000, 5000))))
    allocate(reps, 256 * 900.0)
    t0 = time.perf_counter()
    a = allocate(reps, 256 * 900.0)
    assert time.perf_counter() - t0 < 1.0
    assert sum(a.shares_w) <= 256 * 900.0 + 1e-6
