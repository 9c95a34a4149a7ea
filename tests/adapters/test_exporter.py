"""The Prometheus exporter of a loop: series, labels, values against `palsctl.metrics`, serving."""
import dataclasses
import math
import socket
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from palsctl.adapters.exporter import METRIC_NAMES, LoopExporter, QosWindowCounter
from palsctl.errors import ConfigError
from palsctl.loop import RunRecord, StepRecord, run_loop
from palsctl.metrics import summarize
from palsctl.types import Action, Limits, Measurement, Setpoint

LIM = Limits(power_cap_min_w=100, power_cap_max_w=400, power_cap_default_w=400, num_gpus=2)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples, name, **labels):
    return samples[(name, tuple(sorted({"model_name": "m", **labels}.items())))]


def _record(rows) -> RunRecord:
    """rows: (power_w, throughput, waiting, tpot_p90, setpoint, guard_note)."""
    steps = []
    for i, (p, x, wait, tpot, sp, note) in enumerate(rows):
        m = Measurement(t_s=i + 1.0, window_s=1.0, power_w=p, energy_j=0.0, throughput_tok_s=x,
                        waiting=wait, tpot_p90_s=tpot, power_cap_w=300.0, max_batch=8)
        steps.append(StepRecord(t_s=i + 1.0, measurement=m, setpoint=sp,
                                requested=Action(power_cap_w=350.0, max_batch=8),
                                applied=Action(power_cap_w=300.0 - i, max_batch=8 + i),
                                guard_note=note, step_latency_s=1e-4 * (i + 1)))
    return RunRecord(steps=steps, requests=[], limits=LIM, dt_s=1.0)


setpoints = st.builds(Setpoint,
                      throughput_tok_s=st.one_of(st.none(), st.sampled_from([80.0, 100.0])),
                      tpot_slo_s=st.one_of(st.none(), st.just(0.1)),
                      power_budget_w=st.one_of(st.none(), st.just(700.0)))
rows = st.lists(st.tuples(st.floats(300, 800), st.floats(0, 150), st.integers(0, 3),
                          st.one_of(st.none(), st.floats(0.01, 0.3)), setpoints,
                          st.sampled_from(["", "", "cap 350 W lowered to 300 W to fit budget"])),
                min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(rows=rows, backlog_window_s=st.sampled_from([1.0, 3.0, 5.0]))
def test_counters_equal_what_summarize_scores(rows, backlog_window_s):
    rec = _record(rows)
    ex = LoopExporter(model_name="m", gpus=[0, 1], backlog_window_s=backlog_window_s)
    for s in rec.steps:
        ex.observe(s)
    summ = summarize(rec, backlog_window_s=backlog_window_s)
    smp = _samples(ex.text())
    n = len(rec.steps)
    assert _value(smp, "palsctl_control_steps_total") == n
    rate = summ["qos_violation_rate"]
    assert _value(smp, "palsctl_qos_violations_total") == pytest.approx(
        0.0 if rate is None else rate * n, abs=1e-9)
    assert _value(smp, "palsctl_energy_joules_total") == pytest.approx(summ["energy_j"])
    assert _value(smp, "palsctl_generated_tokens_total") == pytest.approx(
        summ["generated_tokens"])
    assert _value(smp, "palsctl_guard_interventions_total") == sum(bool(r[5]) for r in rows)
    assert _value(smp, "palsctl_controller_step_seconds_count") == n
    assert _value(smp, "palsctl_controller_step_seconds_sum") == pytest.approx(
        sum(s.step_latency_s for s in rec.steps))
    last = rec.steps[-1]
    for g in ("0", "1"):   # per GPU, labelled like DCGM's gpu label
        assert _value(smp, "palsctl_power_cap_watts", gpu=g) == last.applied.power_cap_w
    assert _value(smp, "palsctl_batch_limit") == last.applied.max_batch
    budget = _value(smp, "palsctl_power_budget_watts")
    if last.setpoint.power_budget_w is None:
        assert math.isnan(budget)
    else:
        assert budget == last.setpoint.power_budget_w
    m = last.measurement
    assert _value(smp, "palsctl_power_watts") == pytest.approx(m.power_w)
    assert _value(smp, "palsctl_throughput_tokens_per_second") == pytest.approx(
        m.throughput_tok_s)
    assert _value(smp, "palsctl_tokens_per_joule") == pytest.approx(m.throughput_tok_s / m.power_w)


def test_every_series_is_exported_with_the_labels_dcgm_and_vllm_use():
    ex = LoopExporter(model_name="Qwen/Qwen3-8B", gpus=[2, 3], extra_labels={"replica": "r0"})
    ex.observe(_record([(500.0, 90.0, 0, 0.05, Setpoint(power_budget_w=700.0), "")]).steps[0])
    fams = {f.name: f for f in text_string_to_metric_families(ex.text())}
    names = {s.name for f in fams.values() for s in f.samples}
    for name in METRIC_NAMES:
        assert name in names or f"{name}_bucket" in names, name
    for f in fams.values():
        for s in f.samples:
            assert s.labels["model_name"] == "Qwen/Qwen3-8B" and s.labels["replica"] == "r0"
    caps = [s for s in fams["palsctl_power_cap_watts"].samples]
    assert sorted(s.labels["gpu"] for s in caps) == ["2", "3"]
    assert fams["palsctl_controller_step_seconds"].type == "histogram"
    assert fams["palsctl_qos_violations"].type == "counter"


def test_faults_are_counted_from_the_loops_notes_and_a_failing_actuator_shows_its_run():
    ex = LoopExporter(model_name="m", gpus=[0])
    steps = _record([(500.0, 90.0, 0, 0.05, Setpoint(), "")] * 6).steps
    notes = ["", "sensor: OSError: endpoint down",
             "actuator: ActuatorError: 503", "sensor: ValueError: NaN; actuator: OSError: reset",
             "actuator: ActuatorError: 503", "stale measurement (energy counter not advancing)"]
    in_row = []
    for s, note in zip(steps, notes):
        ex.observe(dataclasses.replace(s, fault=note))
        in_row.append(_value(_samples(ex.text()), "palsctl_actuator_failures_in_row"))
    smp = _samples(ex.text())
    assert _value(smp, "palsctl_sensor_faults_total") == 2
    assert _value(smp, "palsctl_actuator_faults_total") == 3
    assert in_row == [0, 0, 1, 2, 3, 0]


def test_qos_counter_skips_a_first_window_without_a_previous_setpoint():
    c = QosWindowCounter(backlog_window_s=1.0)
    sp = Setpoint(throughput_tok_s=100.0)
    rec = _record([(500.0, 10.0, 2, None, sp, ""), (500.0, 10.0, 2, None, Setpoint(), "")])
    assert c.update(rec.steps[0]) == (False, True)     # its own setpoint: target 100, backlog
    assert c.update(rec.steps[1]) == (False, True)     # scored against step 0's setpoint


def test_simulated_run_feeds_the_exporter_from_its_records():
    sim = pytest.importorskip("palsctl.plants.sim")
    from palsctl.registry import make_controller
    from palsctl.workloads.synthetic import LogNormalLengths, PoissonWorkload

    plant = sim.SimPlant("llama-3.1-8b", "h100-sxm", 1, dt_s=1.0, seed=0, noise=False)
    wl = PoissonWorkload(8.0, prompt=LogNormalLengths(mu=5.0, sigma=0.5),
                         output=LogNormalLengths(mu=5.5, sigma=0.5),
                         seed=1)
    rec = run_loop(plant, make_controller("static"), duration_s=20.0, workload=wl,
                   schedule=lambda t: Setpoint(power_budget_w=500.0, tpot_slo_s=0.009))
    ex = LoopExporter(model_name="m", gpus=[0])
    for s in rec.steps:
        ex.observe(s)
    smp = _samples(ex.text())
    summ = summarize(rec)
    assert 0 < summ["qos_violation_rate"] < 1          # some windows over the TPOT SLO
    assert _value(smp, "palsctl_guard_interventions_total") == sum(
        bool(s.guard_note) for s in rec.steps) > 0     # static's 700 W cap lowered to 500 W
    assert _value(smp, "palsctl_qos_violations_total") == pytest.approx(
        summ["qos_violation_rate"] * len(rec.steps))
    assert _value(smp, "palsctl_energy_joules_total") == pytest.approx(summ["energy_j"])


def test_serves_on_loopback_and_closes():
    ex = LoopExporter(model_name="m", gpus=[0])
    ex.observe(_record([(400.0, 50.0, 0, None, Setpoint(), "")]).steps[0])
    port = ex.serve(0)
    try:
        assert ex.port == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert _value(_samples(body), "palsctl_power_watts") == 400.0
        with pytest.raises(RuntimeError):
            ex.serve(0)
    finally:
        ex.close()
    ex.close()   # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_bad_port_and_busy_port_are_config_errors():
    ex = LoopExporter(model_name="m", gpus=[0])
    for bad in (-1, 70000, True, "9100"):
        with pytest.raises(ConfigError, match="metrics_port"):
            ex.serve(bad)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match="cannot listen"):
            ex.serve(s.getsockname()[1])


@pytest.mark.parametrize("kw", [dict(gpus=[]), dict(gpus=[0], extra_labels={"gpu": "x"}),
                                dict(gpus=[0], extra_labels={"bad-name": "x"})])
def test_bad_labels_are_config_errors(kw):
    with pytest.raises(ConfigError):
        LoopExporter(model_name="m", **kw)
