import numpy as np
import pytest

from palsctl.errors import ConfigError
from palsctl.types import Setpoint
from palsctl.workloads import (
    AZURE_CONV_FIT,
    GridSignal,
    LogNormalLengths,
    MMPPWorkload,
    PoissonWorkload,
    Ramp,
    SetpointSchedule,
    Steps,
    TraceWorkload,
    azure_conv_workload,
)
from palsctl.workloads.fit_azure import CONV_TRACE, fit_mmpp2
from palsctl.workloads.traces import load_trace

L = LogNormalLengths(mu=5.0, sigma=0.8, min_tokens=4, max_tokens=2000)


def collect(w, t_end, dt):
    out = []
    for k in range(int(round(t_end / dt))):
        out.extend(w.requests_between(k * dt, (k + 1) * dt))
    return out


def test_poisson_rate_lengths_and_determinism():
    w = PoissonWorkload(20.0, prompt=L, output=L, seed=3)
    reqs = collect(w, 500, 1.0)
    assert abs(len(reqs) / 500 - 20.0) < 4 * np.sqrt(20 / 500)
    assert [r.request_id for r in reqs] == list(range(len(reqs)))
    out = np.array([r.output_tokens for r in reqs])
    assert out.min() >= 4 and out.max() <= 2000
    assert abs(out.mean() - w.mean_output_tokens) < 0.05 * w.mean_output_tokens
    # same seed, other query windows: same requests
    w2 = PoissonWorkload(20.0, prompt=L, output=L, seed=3)
    assert collect(w2, 500, 0.37)[:5000] == [r for r in reqs if r.arrival_s < 0.37 * 1351][:5000]
    assert PoissonWorkload(20.0, prompt=L, output=L, seed=4).requests_between(0, 5) != \
        reqs[:len(w.requests_between(0, 5))]


def test_mmpp_is_bursty_with_the_stationary_mean_rate():
    w = MMPPWorkload((2.0, 40.0), (50.0, 10.0), prompt=L, output=L, seed=1)
    assert w.rate_req_s == pytest.approx((2 * 50 + 40 * 10) / 60)
    reqs = collect(w, 6000, 1.0)
    t = np.array([r.arrival_s for r in reqs])
    assert np.all(np.diff(t) >= 0)
    assert abs(len(reqs) / 6000 - w.rate_req_s) < 0.1 * w.rate_req_s
    counts = np.bincount(t.astype(int))
    assert counts.var() / counts.mean() > 5  # Poisson would give ~1
    p = collect(PoissonWorkload(w.rate_req_s, prompt=L, output=L, seed=1), 6000, 1.0)
    pc = np.bincount(np.array([r.arrival_s for r in p]).astype(int))
    assert pc.var() / pc.mean() < 1.3


def test_lognormal_mean_and_from_mean():
    rng = np.random.default_rng(0)
    assert L.sample(rng, 200_000).mean() == pytest.approx(L.mean(), rel=0.01)
    assert LogNormalLengths.from_mean(300.0, 0.5).mean() == pytest.approx(300.0, rel=0.01)
    with pytest.raises(ConfigError):
        LogNormalLengths(mu=1.0, sigma=-1.0)


def test_azure_conv_workload_scaling_keeps_burstiness():
    w = azure_conv_workload(11.06, seed=0)
    assert w.rate_req_s == pytest.approx(11.06)
    assert w.rates_req_s[1] / w.rates_req_s[0] == pytest.approx(
        AZURE_CONV_FIT.rates_req_s[1] / AZURE_CONV_FIT.rates_req_s[0])
    assert w.mean_dwell_s == AZURE_CONV_FIT.mean_dwell_s


def test_fitted_constants_match_the_trace(shared_data):
    tr = load_trace(shared_data / CONV_TRACE)
    assert len(tr.times_s) == 19366
    logs_p, logs_o = np.log(tr.prompt_tokens), np.log(tr.output_tokens)
    assert AZURE_CONV_FIT.prompt.mu == pytest.approx(logs_p.mean(), abs=1e-5)
    assert AZURE_CONV_FIT.prompt.sigma == pytest.approx(logs_p.std(), abs=1e-5)
    assert AZURE_CONV_FIT.output.mu == pytest.approx(logs_o.mean(), abs=1e-5)
    assert AZURE_CONV_FIT.output.sigma == pytest.approx(logs_o.std(), abs=1e-5)
    assert AZURE_CONV_FIT.mean_rate_req_s == pytest.approx(19366 / tr.times_s[-1], rel=0.01)
    # re-fitting the MMPP on the whole trace gives the constants kept in code
    rates, dwell = fit_mmpp2(tr.times_s)
    assert rates == pytest.approx(AZURE_CONV_FIT.rates_req_s, rel=1e-3)
    assert dwell == pytest.approx(AZURE_CONV_FIT.mean_dwell_s, rel=1e-3)


def test_mmpp_fit_recovers_a_known_process():
    w = MMPPWorkload((3.0, 12.0), (60.0, 30.0), prompt=L, output=L, seed=7)
    t = np.array([r.arrival_s for r in w.requests_between(0, 3000)])
    rates, dwell = fit_mmpp2(t)
    assert rates == pytest.approx((3.0, 12.0), rel=0.15)
    assert dwell == pytest.approx((60.0, 30.0), rel=0.5)


def test_trace_replay_window_scaling_and_repeat(shared_data):
    path = shared_data / CONV_TRACE
    w = TraceWorkload(path, start_s=600, duration_s=300)
    reqs = collect(w, 300, 1.0)
    tr = load_trace(path)
    path = tr  # the same trace, parsed once
    sel = (tr.times_s >= 600) & (tr.times_s < 900)
    assert len(reqs) == int(sel.sum())
    assert reqs[0].prompt_tokens == int(tr.prompt_tokens[sel][0])
    assert reqs[0].arrival_s == pytest.approx(tr.times_s[sel][0] - 600)
    fast = TraceWorkload(path, start_s=600, duration_s=300, rate_req_s=2 * w.rate_req_s)
    assert fast.window_s == pytest.approx(150.0)
    assert len(collect(fast, 150, 1.0)) == len(reqs)
    rep = TraceWorkload(path, start_s=600, duration_s=300, rate_req_s=w.rate_req_s * 2,
                        repeat=True)
    r2 = collect(rep, 300, 1.0)
    assert len(r2) == 2 * len(reqs) and len({r.request_id for r in r2}) == len(r2)
    assert collect(TraceWorkload(path, start_s=600, duration_s=300), 400, 1.0) == reqs


def test_mooncake_replay(shared_data):
    w = TraceWorkload(shared_data / "mooncake-fast25/conversation_trace.jsonl", duration_s=600,
                      rate_req_s=1.0)
    reqs = collect(w, w.window_s, 1.0)
    assert len(reqs) == pytest.approx(w.window_s * 1.0, rel=0.01)
    assert w.mean_prompt_tokens > 5000  # long-context trace


def test_missing_trace_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        TraceWorkload(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ConfigError, match="not an Azure"):
        TraceWorkload(bad)


def test_schedules():
    s = Steps([(0, 1400), (480, 900), (840, 1400)])
    assert [s(t) for t in (0, 479, 480, 839.9, 840, 5000)] == [1400, 1400, 900, 900, 1400, 1400]
    r = Ramp([(0, 0), (10, 100), (20, 100)])
    assert (r(5), r(15), r(99)) == (50.0, 100.0, 100.0)
    with pytest.raises(ConfigError, match="start at t_s = 0"):
        Steps([(5, 1)])
    with pytest.raises(ConfigError, match="increase"):
        Ramp([(0, 1), (0, 2)])
    sched = SetpointSchedule(power_budget_w=s, throughput_tok_s=1000.0)
    assert sched(500) == Setpoint(power_budget_w=900.0, throughput_tok_s=1000.0)
    with pytest.raises(ConfigError, match="unknown setpoint"):
        SetpointSchedule(budget=1.0)


def test_grid_signal_maps_onto_range(shared_data):
    g = GridSignal(shared_data / "vessim-grid/watttime_example.csv", min_w=800, max_w=1400,
                   speedup=300)
    assert g.column == "Caiso_North"
    vals = np.array([g(t) for t in range(0, 8928)])
    assert vals.min() == pytest.approx(800) and vals.max() == pytest.approx(1400)
    raw = g.signal
    i = int(np.argmax(raw))
    assert g(g.times_s[i] / 300) == pytest.approx(1400)
    inv = GridSignal(shared_data / "vessim-grid/watttime_example.csv", min_w=800, max_w=1400,
                     speedup=300, invert=True)
    assert inv(g.times_s[i] / 300) == pytest.approx(800)
    sol = GridSignal(shared_data / "vessim-grid/solar_example.csv", column="Berlin", min_w=500,
                     max_w=1000)
    assert sol(0) == pytest.approx(500)  # night
    with pytest.raises(ConfigError, match="no column"):
        GridSignal(shared_data / "vessim-grid/solar_example.csv", column="Atlantis", min_w=1,
                   max_w=2)


@pytest.mark.parametrize("rows, match", [
    ("0,5\n300,nan\n600,7\n", r"g\.csv:3: the signal must be a finite number, got 'nan'"),
    ("0,5\n300,inf\n", r"g\.csv:3: the signal must be a finite number"),
    ("600,5\n0,6\n", r"g\.csv:3: times must not decrease, got '0' after '600'"),
    ("2023-06-08 00:05:00,5\n2023-06-08 00:00:00,6\n", r"g\.csv:3: times must not decrease"),
    ("0,5\nx,6\n", r"g\.csv:3: cannot parse time 'x'"),
])
def test_grid_signal_refuses_a_non_finite_value_or_times_out_of_order(tmp_path, rows, match):
    # a NaN used to flatten the whole signal to min_w, and times out of order to scramble it
    path = tmp_path / "g.csv"
    path.write_text("time,signal\n" + rows)
    with pytest.raises(ConfigError, match=match):
        GridSignal(path, min_w=800, max_w=1400)
