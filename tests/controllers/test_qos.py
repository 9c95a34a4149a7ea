"""QoS first: the demand estimate, the online latency tightening, and closed-loop properties of
the QoS-first controllers on the simulated plant (hypothesis)."""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palsctl.controllers.qos import DemandEstimator, QosTightening
from palsctl.errors import ConfigError
from palsctl.types import Measurement, Setpoint


def _m(**kw):
    base = dict(t_s=1.0, window_s=1.0, power_w=800.0, energy_j=0.0, throughput_tok_s=1000.0)
    base.update(kw)
    return Measurement(**base)


# -- demand ------------------------------------------------------------------------------------
def test_demand_is_the_larger_of_target_and_arrivals_plus_the_backlog():
    est = DemandEstimator(tau_s=10.0, drain_s=20.0)
    d = est.update(_m(demand_tok_s=500.0), Setpoint(throughput_tok_s=800.0), dt_s=1.0,
                   output_tokens_mean=200.0)
    assert (d.demand_tok_s, d.source, d.backlog_tok_s) == (800.0, "target", 0.0)
    # a stale target that the load outgrew: the arrivals take over, the queue adds its drain
    est.reset()
    for _ in range(200):
        d = est.update(_m(demand_tok_s=1500.0, waiting=40), Setpoint(throughput_tok_s=800.0),
                       dt_s=1.0, output_tokens_mean=200.0)
    assert d.source == "arrivals"
    assert d.arrivals_tok_s == pytest.approx(1500.0)
    assert d.backlog_tok_s == pytest.approx(40 * 200.0 / 20.0)
    assert d.demand_tok_s == pytest.approx(1500.0 + 400.0)


def test_arrival_rate_is_an_ewma_with_its_time_constant():
    est = DemandEstimator(tau_s=10.0, drain_s=0.0)
    est.update(_m(demand_tok_s=0.0), Setpoint(), dt_s=1.0, output_tokens_mean=None)
    for _ in range(10):   # one time constant of a step from 0 to 1000
        d = est.update(_m(demand_tok_s=1000.0), Setpoint(), dt_s=1.0, output_tokens_mean=None)
    assert d.arrivals_tok_s == pytest.approx(1000.0 * (1 - math.exp(-1.0)), rel=1e-9)


def _run(est, rates, dt_s=1.0):
    d = None
    for x in rates:
        d = est.update(_m(demand_tok_s=x), Setpoint(), dt_s=dt_s, output_tokens_mean=None)
    return d


def _warm_pair(level, seconds, **variant):
    """Two estimators (60-s and 10-s averages, no queue) after ``seconds`` at ``level``: the
    plain one and one with the ``variant`` options."""
    kw = dict(tau_s=60.0, drain_s=0.0, burst_tau_s=10.0)
    pair = DemandEstimator(**kw), DemandEstimator(**kw, **variant)
    for est in pair:
        _run(est, [level] * seconds)
    return pair


def test_a_lasting_fall_of_the_load_is_followed_within_the_shift_time():
    slow, shift = _warm_pair(2000.0, 300, shift_s=15.0, shift_drop=0.1)
    # the load halves for good: 60 s later the slow average alone still asks for ~1.37x the
    # load; with the shift it restarted at the fast average's level (~1,180) once that had
    # stayed 10 % below it for 15 s, and decayed from there
    a = _run(slow, [1000.0] * 60).arrivals_tok_s
    b = _run(shift, [1000.0] * 60).arrivals_tok_s
    assert a == pytest.approx(1000.0 + 1000.0 * math.exp(-1.0), rel=0.02)
    fast_at_17 = 1000.0 + 1000.0 * math.exp(-17.0 / 10.0)
    assert b == pytest.approx(1000.0 + (fast_at_17 - 1000.0) * math.exp(-43.0 / 60.0), rel=0.03)
    assert b < 1.1 * 1000.0 and a > 1.3 * 1000.0


def test_a_lull_shorter_than_the_shift_time_does_not_reset_the_slow_average():
    est = DemandEstimator(tau_s=60.0, drain_s=0.0, burst_tau_s=10.0, shift_s=15.0)
    _run(est, [2000.0] * 300)
    # 12 s of nothing: the fast average falls 10 % below the slow one after ~1 s, but the
    # lull ends before 15 s of that, so only the slow decay applies
    d = _run(est, [0.0] * 12 + [2000.0] * 3)
    ref = DemandEstimator(tau_s=60.0, drain_s=0.0, burst_tau_s=10.0)
    _run(ref, [2000.0] * 300)
    assert d.arrivals_tok_s == pytest.approx(
        _run(ref, [0.0] * 12 + [2000.0] * 3).arrivals_tok_s, rel=1e-12)
    assert d.arrivals_tok_s > 1500.0


def test_a_lasting_rise_of_the_load_is_followed_within_the_rise_time():
    plain, rise = _warm_pair(600.0, 120, rise_ratio=2.5, rise_s=2.0)
    # the load steps up sixfold: after 2 s the fast average alone is at ~1.9x the old level,
    # the rise restarted it at the new one
    a = _run(plain, [3600.0] * 2).arrivals_tok_s
    b = _run(rise, [3600.0] * 2).arrivals_tok_s
    assert a == pytest.approx(3600.0 + (600.0 - 3600.0) * math.exp(-2.0 / 10.0), rel=1e-9)
    assert b == pytest.approx(3600.0)
    assert rise.rises == 1
    # after that it decays on the fast average's time constant, as before
    c = _run(rise, [600.0] * 10).arrivals_tok_s
    assert c == pytest.approx(600.0 + 3000.0 * math.exp(-1.0), rel=1e-9)


def test_a_single_spike_or_a_smaller_rise_does_not_count_as_a_rise():
    plain, rise = _warm_pair(600.0, 120, rise_ratio=2.5, rise_s=2.0)
    # one window at 13x, spikes one window apart, then a lasting doubling (under 2.5x)
    trace = [8000.0, 600.0, 8000.0, 600.0, 6000.0, 500.0] + [1200.0] * 30
    assert _run(rise, trace).arrivals_tok_s == _run(plain, trace).arrivals_tok_s
    assert rise.rises == 0


def test_no_rise_while_the_averages_start_up():
    # from the first window the averages know nothing: a ramp in the first tau/2 is theirs
    est = DemandEstimator(tau_s=60.0, drain_s=0.0, burst_tau_s=10.0, rise_ratio=2.5)
    _run(est, [100.0] * 5 + [5000.0] * 20)
    assert est.rises == 0
    _run(est, [5000.0] * 10 + [50000.0] * 2)
    assert est.rises == 1


def test_without_an_arrival_counter_an_unsaturated_plant_serves_its_demand():
    est = DemandEstimator(tau_s=1e-6, drain_s=30.0)
    d = est.update(_m(throughput_tok_s=700.0), Setpoint(), dt_s=1.0, output_tokens_mean=100.0)
    assert d.demand_tok_s == pytest.approx(700.0)
    # saturated (a queue): the throughput is capacity, not demand — kept from before, plus drain
    d = est.update(_m(throughput_tok_s=300.0, waiting=30), Setpoint(), dt_s=1.0,
                   output_tokens_mean=100.0)
    assert d.arrivals_tok_s == pytest.approx(700.0)
    assert d.demand_tok_s == pytest.approx(700.0 + 30 * 100.0 / 30.0)


def test_stale_measurement_does_not_move_the_estimate():
    est = DemandEstimator(tau_s=5.0)
    est.update(_m(demand_tok_s=1000.0), Setpoint(), dt_s=1.0, output_tokens_mean=None)
    d = est.update(_m(demand_tok_s=0.0, stale=True), Setpoint(), dt_s=1.0,
                   output_tokens_mean=None)
    assert d.arrivals_tok_s == 1000.0


# -- tightening -------------------------------------------------------------------------------
def test_tpot_near_the_slo_tightens_at_once_and_decays_with_its_memory():
    q = QosTightening(guard=0.8, memory_s=100.0)
    sp = Setpoint(tpot_slo_s=0.1)
    assert not q.update(_m(tpot_p90_s=0.07), sp, dt_s=1.0, predicted_itl_s=0.05)
    assert q.itl_factor == 1.0                     # 0.07 < 0.8 × 0.1: nothing learned
    assert q.update(_m(tpot_p90_s=0.09), sp, dt_s=1.0, predicted_itl_s=0.05)
    f0 = 0.09 / (0.8 * 0.05)
    assert q.itl_factor == pytest.approx(f0)
    for _ in range(100):                           # one memory time constant later
        q.update(_m(tpot_p90_s=0.02), sp, dt_s=1.0, predicted_itl_s=0.05)
    assert q.itl_factor - 1 == pytest.approx((f0 - 1) * math.exp(-1.0), rel=1e-9)


def test_ttft_near_the_slo_raises_the_capacity_asked_bounded():
    q = QosTightening(ttft_guard=0.5, bound=3.0)
    sp = Setpoint(ttft_slo_s=2.0)
    q.update(_m(ttft_p90_s=1.5), sp, dt_s=1.0, predicted_itl_s=None)
    assert q.capacity_factor == pytest.approx(1.5)
    q.update(_m(ttft_p90_s=60.0), sp, dt_s=1.0, predicted_itl_s=None)
    assert q.capacity_factor == 3.0
    q.reset()
    assert (q.itl_factor, q.capacity_factor) == (1.0, 1.0)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(tpot=st.none() | st.floats(0, 10), pred=st.none() | st.floats(1e-6, 1.0),
       slo=st.none() | st.floats(1e-3, 1.0), ttft=st.none() | st.floats(0, 100),
       stale=st.booleans())
def test_factors_stay_in_their_bounds(tpot, pred, slo, ttft, stale):
    q = QosTightening(bound=4.0)
    for _ in range(3):
        q.update(_m(tpot_p90_s=tpot, ttft_p90_s=ttft, stale=stale),
                 Setpoint(tpot_slo_s=slo, ttft_slo_s=slo and 20 * slo), dt_s=1.0,
                 predicted_itl_s=pred)
        assert 1.0 <= q.itl_factor <= 4.0 and 1.0 <= q.capacity_factor <= 4.0


# -- closed-loop properties on the simulated plant --------------------------------------------
def _closed_loop(name, *, rate_req_s, sp, duration_s, seed, prompt=512, output=256):
    from palsctl.loop import run_loop
    from palsctl.plants.sim import SimPlant
    from palsctl.registry import make_controller
    from palsctl.testing.checks import ConstantStream

    plant = SimPlant(model="mixtral-8x7b", gpu="a100-sxm4-80gb", num_gpus=4, seed=seed)
    rec = run_loop(plant, make_controller(name), duration_s=duration_s, schedule=lambda t: sp,
                   workload=ConstantStream(rate_req_s, prompt, output))
    plant.close()
    return rec


@pytest.mark.slow
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(["search", "mpc"]), load=st.floats(0.3, 1.3),
       seed=st.integers(0, 3))
def test_never_lowers_the_cap_while_requests_wait_longer_than_the_drain_horizon(name, load,
                                                                                  seed):
    """With slack in the SLO (a loose TPOT objective, no budget), no voluntary cap cut while
    the queue holds more than ``drain_s`` seconds of the plant's throughput."""
    from palsctl.plants.sim import steady_state

    full = steady_state("mixtral-8x7b", "a100-sxm4-80gb", 4, 256, prompt_tokens=512,
                        output_tokens=256).throughput_tok_s
    sp = Setpoint(throughput_tok_s=load * full, tpot_slo_s=1.0)
    rec = _closed_loop(name, rate_req_s=load * full / 256.0, sp=sp, duration_s=150.0,
                       seed=seed)
    drain_s = 30.0   # the controllers' default
    for prev, cur in zip(rec.steps, rec.steps[1:]):
        m = cur.measurement
        queued_s = m.waiting * 256.0 / max(m.throughput_tok_s, 1.0)
        if queued_s > drain_s and m.waiting > 0:
            assert cur.applied.power_cap_w >= prev.applied.power_cap_w - 1e-9, \
                (name, cur.t_s, queued_s)


@pytest.mark.slow
@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(["search", "mpc", "pi"]), load=st.floats(0.2, 0.8),
       seed=st.integers(0, 3))
def test_batch_limit_changes_a_bounded_number_of_times_under_constant_load(name, load, seed):
    from palsctl.plants.sim import steady_state

    full = steady_state("mixtral-8x7b", "a100-sxm4-80gb", 4, 256, prompt_tokens=512,
                        output_tokens=256).throughput_tok_s
    sp = Setpoint(throughput_tok_s=load * full, tpot_slo_s=0.1, power_budget_w=1200.0)
    rec = _closed_loop(name, rate_req_s=load * full / 256.0, sp=sp, duration_s=300.0, seed=seed)
    batches = [s.applied.max_batch for s in rec.steps]
    changes = sum(1 for a, b in zip(batches, batches[1:]) if a != b)
    assert changes <= 10, (name, changes)


# -- no chatter on a wiggling budget ------------------------------------------------------------
@pytest.mark.parametrize("name", ["search", "mpc"])
def test_a_budget_that_wiggles_up_by_a_watt_does_not_move_the_cap_up(name):
    from palsctl.controllers.mpc import MPCController
    from palsctl.controllers.search import SearchController
    from tests.support.doubles import AnalyticModel, limits4, plant_info4

    cls = SearchController if name == "search" else MPCController
    ctl = cls(model=AnalyticModel())
    ctl.setup(limits=limits4(), dt_s=1.0, plant_info=plant_info4())
    lim, margin = ctl.limits, ctl.config.budget_margin

    def ceiling(budget_w):
        return lim.clamp_cap_w(budget_w * (1 - margin) / 4)

    cap = 400.0
    caps = []
    # the target asks for more than any of these budgets allow: the cap sits at the ceiling
    waits = (0, 0, 0, 0, 0, 0, 50)
    for budget, waiting in zip((1000.0, 1004.0, 1000.0, 1004.0, 1040.0, 1000.0, 1004.0), waits):
        m = _m(power_w=cap * 4, throughput_tok_s=1000.0, waiting=waiting, running=200,
               power_cap_w=cap, max_batch=256, demand_tok_s=1000.0)
        cap = ctl.step(m, Setpoint(throughput_tok_s=5000.0, power_budget_w=budget)).power_cap_w
        assert cap <= ceiling(budget)
        caps.append(cap)
    low = ceiling(1000.0)
    assert ceiling(1004.0) - low < ctl.config.cap_min_raise_w <= ceiling(1040.0) - low
    # +4 W of budget (1 W per GPU) is no raise; +40 W is; a cut is followed at once; with
    # requests waiting every watt serves QoS: the 1-W raise is made
    assert caps == [low, low, low, low, ceiling(1040.0), low, ceiling(1004.0)]
    cfg = {"cap_min_raise_w": -1.0}
    with pytest.raises(ConfigError, match="cap_min_raise_w"):
        cls(model=AnalyticModel(), **cfg)
