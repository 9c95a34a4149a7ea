import dataclasses
import json

import pytest

from palsctl.loop import RunRecord, StepRecord
from palsctl.metrics import SUMMARY_KEYS, summarize, window_setpoints
from palsctl.types import Action, Limits, Measurement, RequestResult, Setpoint

LIM = Limits(power_cap_min_w=100, power_cap_max_w=400, power_cap_default_w=400, num_gpus=4)


def record(power, tput, setpoints, *, waiting=None, demand=None, tpot=None, requests=(),
           targets_w=None):
    steps = []
    for i, (p, x, sp) in enumerate(zip(power, tput, setpoints)):
        m = Measurement(t_s=i + 1.0, window_s=1.0, power_w=p, energy_j=sum(power[:i + 1]),
                        throughput_tok_s=x, waiting=(waiting or [0] * len(power))[i],
                        demand_tok_s=(demand or [None] * len(power))[i],
                        tpot_p90_s=(tpot or [None] * len(power))[i])
        steps.append(StepRecord(t_s=i + 1.0, measurement=m, setpoint=sp,
                                requested=Action(power_cap_w=400.0, max_batch=8),
                                applied=Action(power_cap_w=300.0, max_batch=8),
                                step_latency_s=1e-4 * (i + 1)))
    return RunRecord(steps=steps, requests=list(requests), limits=LIM, dt_s=1.0)


def test_energy_tokens_and_budget_with_tolerance_band():
    # windows are scored against the previous step's setpoint: budgets in force 1000 x 4
    sps = [Setpoint(power_budget_w=1000.0)] * 4
    r = record([1005.0, 1020.0, 900.0, 1100.0], [10.0, 20.0, 30.0, 40.0], sps)
    s = summarize(r)
    assert s["energy_j"] == pytest.approx(4025.0)
    assert s["generated_tokens"] == pytest.approx(100.0)
    assert s["tokens_per_joule"] == pytest.approx(100.0 / 4025.0)
    assert s["duration_s"] == 4.0 and s["mean_power_w"] == pytest.approx(4025.0 / 4)
    # 1005 W is inside the 1 % band; 1020 and 1100 are over: 2 s, (20 + 100) J
    assert s["time_over_budget_s"] == 2.0
    assert s["energy_over_budget_j"] == pytest.approx(120.0)
    assert s["qos_violation_rate"] is None and s["slo_attainment"] is None
    assert s["settling_time_s"] is None
    assert set(SUMMARY_KEYS) <= set(s)
    json.dumps(s)


def test_window_uses_setpoint_in_force_during_it():
    sps = [Setpoint(power_budget_w=1000.0), Setpoint(power_budget_w=500.0),
           Setpoint(power_budget_w=500.0)]
    assert [sp.power_budget_w for sp in window_setpoints(record([0] * 3, [0] * 3, sps).steps)] \
        == [1000.0, 1000.0, 500.0]
    # window 2 (800 W) still ran under the 1000 W budget; window 3 (800 W) under 500 W
    s = summarize(record([800.0, 800.0, 800.0], [1.0] * 3, sps))
    assert s["time_over_budget_s"] == 1.0 and s["energy_over_budget_j"] == pytest.approx(300.0)


def test_over_budget_by_the_energy_counter_and_late_windows():
    # budget 1000 W, cut to 800 W for windows 5-7 (scored against the setpoint in force); the
    # readings are noisy, the counter exact
    sps = [Setpoint(power_budget_w=1000.0)] * 3 + [Setpoint(power_budget_w=800.0)] * 4
    drawn = [990.0, 990.0, 990.0, 990.0, 990.0, 790.0, 820.0]
    read = [990.0, 1015.0, 990.0, 990.0, 990.0, 812.0, 820.0]
    r = record(read, [1.0] * 7, sps)
    energy = [sum(drawn[:i + 1]) for i in range(7)]
    r = RunRecord(steps=[dataclasses.replace(st, measurement=dataclasses.replace(
        st.measurement, energy_j=e)) for st, e in zip(r.steps, energy)],
        requests=[], limits=LIM, dt_s=1.0)
    s = summarize(r)
    # by the reading: window 2 (noise), 5 (first window under the cut), 6 (noise), 7 (drawn)
    assert s["time_over_budget_s"] == 4.0
    assert s["time_over_budget_late_s"] == 3.0       # the first window of the cut is exempt
    # by the counter: 5 and 7 only; the noise windows drew less than the budget
    assert s["time_over_budget_counter_s"] == 2.0
    assert s["time_over_budget_late_counter_s"] == 1.0
    # a stale window and a counter that went backwards fall back to the reading
    st = r.steps
    st[1] = dataclasses.replace(st[1], measurement=dataclasses.replace(st[1].measurement,
                                                                        stale=True))
    st[5] = dataclasses.replace(st[5], measurement=dataclasses.replace(st[5].measurement,
                                                                        energy_j=0.0))
    s = summarize(RunRecord(steps=st, requests=[], limits=LIM, dt_s=1.0))
    assert s["time_over_budget_counter_s"] == 4.0      # 2 and 6 by their readings again


def test_the_runs_first_window_is_exempt_from_the_late_seconds_like_a_cut():
    # the plant runs the first window at the cap it started with (no controller decided yet):
    # over a budget in force from t = 0 it is the first window of a cut, not a late one
    sps = [Setpoint(power_budget_w=1000.0)] * 3
    s = summarize(record([1500.0, 990.0, 1200.0], [1.0] * 3, sps))
    assert s["time_over_budget_s"] == 2.0 and s["time_over_budget_counter_s"] == 2.0
    assert s["time_over_budget_late_s"] == 1.0 and s["time_over_budget_late_counter_s"] == 1.0
    # without a budget in the first window there is nothing to exempt
    s = summarize(record([1500.0, 990.0, 1200.0], [1.0] * 3, [Setpoint()] * 3))
    assert s["time_over_budget_late_s"] == 0.0


def test_qos_violation_needs_backlog_and_counts_latency():
    sp = Setpoint(throughput_tok_s=100.0, tpot_slo_s=0.1)
    r = record([500.0] * 5, [100.0, 90.0, 90.0, 96.0, 50.0], [sp] * 5,
               waiting=[0, 3, 0, 5, 0], demand=[None, None, 80.0, None, 300.0],
               tpot=[0.05, 0.05, 0.05, 0.05, 0.2])
    s = summarize(r, backlog_window_s=1.0)
    # window 2: 90 < 95 with requests waiting -> short; window 3: 90 but nothing waits (the
    # plant serves all it is offered) -> not; window 4: 96 within the 5 % tolerance; window 5:
    # 50 tok/s with a large offered demand but no backlog -> not short, TPOT over the SLO
    assert s["throughput_shortfall_rate"] == pytest.approx(1 / 5)
    assert s["latency_violation_rate"] == pytest.approx(1 / 5)
    assert s["qos_violation_rate"] == pytest.approx(2 / 5)


def test_offered_demand_alone_is_not_a_shortfall():
    # bursty arrivals whose output is generated over the following seconds: the offered demand
    # (counted at arrival) is far above what was generated, but nothing waits -> no shortfall
    sp = Setpoint(throughput_tok_s=100.0)
    demand = [300.0, 0.0, 0.0] * 4
    tput = [0.0, 50.0, 50.0] * 4
    r = record([500.0] * 12, tput, [sp] * 12, demand=demand)
    for w in (1.0, 3.0, 5.0):
        assert summarize(r, backlog_window_s=w)["throughput_shortfall_rate"] == 0.0


def test_shortfall_needs_a_backlog_through_the_trailing_window():
    sp = Setpoint(throughput_tok_s=100.0)
    tput = [80.0, 80.0, 80.0, 80.0, 120.0, 120.0, 80.0, 80.0]
    waiting = [0, 2, 2, 2, 2, 2, 2, 0]
    r = record([500.0] * 8, tput, [sp] * 8, waiting=waiting)
    # 1 s windows: backlog in windows 2-7; short (80 < 95) in 2, 3, 4 and 7 -> 4 of 8
    assert summarize(r, backlog_window_s=1.0)["throughput_shortfall_rate"] == pytest.approx(4 / 8)
    # 3 s windows: a backlog through the whole window ending at windows 4, 5, 6, 7 (t = 4..7);
    # their means: 80, 93.3 (short), 106.7, 106.7 -> 2 of 8
    assert summarize(r, backlog_window_s=3.0)["throughput_shortfall_rate"] == pytest.approx(2 / 8)
    # the default 5 s window: only t = 6 (2..6: 80, 80, 80, 120, 120 -> 96, within tolerance)
    # and t = 7 (3..7 -> 96) have a full backlog; neither is short
    assert summarize(r)["throughput_shortfall_rate"] == 0.0


def test_settling_time_after_budget_steps():
    hi, lo = Setpoint(power_budget_w=1000.0), Setpoint(power_budget_w=600.0)
    # decisions at t = 1..12 s: steps 0-2 hi, 3-8 lo, 9-11 hi; the budget drops at the decision
    # at t = 4 s, so windows 4.. (t > 4 s) run under lo and windows 10.. under hi again
    sps = [hi] * 3 + [lo] * 6 + [hi] * 3
    power = [900.0] * 4 + [800.0, 700.0, 600.0, 590.0, 600.0] + [600.0, 900.0, 950.0]
    s = summarize(record(power, [1.0] * 12, sps), settle_window_s=1.0)
    # with no averaging: windows 4 (4..5 s, 800 W) and 5 (5..6 s, 700 W) are over 606 W -> in
    # spec from t = 6 s, 2 s after the step at t_e = 4 s. Up-step: nothing out of spec -> 0.
    assert s["settling_times_s"] == [2.0, 0.0]
    assert s["settling_time_s"] == 2.0 and s["unsettled_steps"] == 0
    # 2 s trailing means since the step: 800, 750, 650 (over), 595, 595 -> settled at t = 7 s
    assert summarize(record(power, [1.0] * 12, sps), settle_window_s=2.0)["settling_times_s"] \
        == [3.0, 0.0]
    # never settles when the last window of the segment is still over
    power2 = [900.0] * 12
    s2 = summarize(record(power2, [1.0] * 12, sps))
    assert s2["settling_times_s"][0] == 6.0 and s2["unsettled_steps"] == 1


def test_slo_attainment_and_tracking_and_latency_percentiles():
    sp = Setpoint(ttft_slo_s=1.0, tpot_slo_s=0.1, power_target_w=500.0)
    reqs = [RequestResult(request_id=0, arrival_s=0.5, prompt_tokens=10, output_tokens=11,
                          first_token_s=1.0, finish_s=1.5),   # ttft .5, tpot .05 -> ok
            RequestResult(request_id=1, arrival_s=0.5, prompt_tokens=10, output_tokens=11,
                          first_token_s=2.0, finish_s=2.5),   # ttft 1.5 -> miss
            RequestResult(request_id=2, arrival_s=1.5, prompt_tokens=10, output_tokens=3,
                          first_token_s=1.6, finish_s=2.2),   # tpot .3 -> miss
            RequestResult(request_id=3, arrival_s=1.5, prompt_tokens=10, output_tokens=1,
                          first_token_s=1.6, finish_s=1.6)]   # one token: ttft only -> ok
    s = summarize(record([400.0, 600.0, 500.0], [1.0] * 3, [sp] * 3, requests=reqs))
    assert s["slo_attainment"] == pytest.approx(0.5)
    assert s["completed_requests"] == 4
    assert s["power_tracking_mae_w"] == pytest.approx(200.0 / 3)
    assert s["power_tracking_rel_error"] == pytest.approx(200.0 / 3 / 500.0)
    assert s["step_latency_p50_s"] == pytest.approx(2e-4)
    assert s["mean_power_cap_w"] == 300.0 and s["mean_max_batch"] == 8.0


def _with_actions(rec, caps, batches):
    import dataclasses as dc
    rec.steps = [dc.replace(s, applied=Action(power_cap_w=c, max_batch=b))
                 for s, c, b in zip(rec.steps, caps, batches)]
    return rec


def test_thrash_counters_count_batch_changes_and_cap_reversals():
    n = 10
    r = record([500.0] * n, [10.0] * n, [Setpoint()] * n)
    caps = [300, 310, 320, 310, 310, 300.2, 300.0, 330, 320, 330]   # moves < 0.5 W ignored
    batches = [8, 8, 16, 16, 8, 8, 8, 8, 32, 32]
    s = summarize(_with_actions(r, caps, batches))
    # moves +10 +10 -10 -9.8 +30 -10 +10 (the -0.2 ignored): reversals at 3 sign flips
    # (+ to -, - to +, + to -, - to +) = 4 over 10 s
    assert s["cap_reversals_per_100s"] == pytest.approx(100.0 * 4 / 10)
    assert s["batch_changes_per_100s"] == pytest.approx(100.0 * 3 / 10)


def test_throughput_violation_rate_and_binding_split_against_a_reference():
    sps = [Setpoint(throughput_tok_s=100.0, power_budget_w=1000.0)] * 6
    # a backlog throughout; the trailing 5-s mean throughput falls below 95 of 100 tok/s from
    # the fourth window on
    r = record([900.0] * 6, [100.0, 100.0, 100.0, 50.0, 50.0, 50.0], sps, waiting=[1] * 6)
    # the reference (static) draws 1200 W in the first three windows: those are binding
    ref = record([1200.0, 1200.0, 1200.0, 800.0, 800.0, 800.0], [100.0] * 6, sps)
    s = summarize(r, reference=ref, settle_window_s=1.0)
    assert s["throughput_violation_rate"] == s["throughput_shortfall_rate"] == pytest.approx(0.5)
    assert s["binding_fraction"] == pytest.approx(0.5)
    assert s["throughput_violation_rate_binding"] == 0.0
    assert s["throughput_violation_rate_loose"] == 1.0
    assert s["qos_violation_rate_binding"] == 0.0 and s["qos_violation_rate_loose"] == 1.0
    # without a reference there is no split
    s0 = summarize(r)
    assert s0["binding_fraction"] is None and s0["qos_violation_rate_binding"] is None
