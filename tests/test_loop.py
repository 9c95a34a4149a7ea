import dataclasses
import math

import pytest

from palsctl.controllers.baselines import StaticController
from palsctl.errors import ConfigError
from palsctl.interfaces import Controller, ControllerConfig, Plant
from palsctl.loop import run_loop
from palsctl.metrics import summarize
from palsctl.plants.sim import SimPlant
from palsctl.safety import GuardConfig, SafetyGuard
from palsctl.types import Action, Limits, Measurement, PlantInfo
from palsctl.workloads import PoissonWorkload, SetpointSchedule, Steps
from palsctl.workloads.synthetic import LogNormalLengths


@dataclasses.dataclass(frozen=True, kw_only=True)
class _TunedConfig(ControllerConfig):
    dt_s: float = 0.5


class Tuned(Controller):
    Config = _TunedConfig

    def step(self, measurement, setpoint):
        return Action()


class Recorder(Controller):
    """Asks for a cap ramp and remembers what it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def step(self, measurement, setpoint):
        self.seen.append((measurement.t_s, setpoint.power_budget_w))
        return Action(power_cap_w=150.0 + 10 * len(self.seen), max_batch=32)

    def diagnostics(self):
        return {"n": len(self.seen)}


class CapToBudget(Controller):
    """Asks for the whole budget on one GPU and a batch of 16."""

    def step(self, measurement, setpoint):
        return Action(power_cap_w=setpoint.power_budget_w, max_batch=16)


def workload(rate=3.0, seed=0):
    return PoissonWorkload(rate, prompt=LogNormalLengths.from_mean(300, 0.5),
                           output=LogNormalLengths.from_mean(100, 0.5), seed=seed)


def test_dt_mismatch_is_refused():
    plant = SimPlant("llama-3.1-8b", "h100-sxm", 1, dt_s=1.0)
    with pytest.raises(ConfigError, match="tuned for dt_s=0.5"):
        run_loop(plant, Tuned(), duration_s=10, schedule=SetpointSchedule())


def test_simulated_loop_records_every_step():
    plant = SimPlant("llama-3.1-8b", "h100-sxm", 1, dt_s=0.5, seed=1)
    ctl = Recorder()
    calls = []
    sched = SetpointSchedule(power_budget_w=Steps([(0, 700), (5, 300)]))
    rec = run_loop(plant, ctl, duration_s=10, schedule=sched, workload=workload(),
                   progress=lambda k, n: calls.append((k, n)))
    assert len(rec.steps) == 20 and calls[-1] == (20, 20) and len(calls) == 20
    assert [s.t_s for s in rec.steps] == pytest.approx([0.5 * (k + 1) for k in range(20)])
    assert plant.now_s == pytest.approx(10.0)
    # the controller sees the budget in force from its decision time on
    assert ctl.seen[8] == (pytest.approx(4.5), 700) and ctl.seen[9] == (pytest.approx(5.0), 300)
    s15 = rec.steps[15]
    assert s15.requested == Action(power_cap_w=310.0, max_batch=32)
    assert s15.applied == Action(power_cap_w=300.0, max_batch=32)
    assert "fit budget" in s15.guard_note
    assert rec.steps[8].applied == Action(power_cap_w=240.0, max_batch=32)
    assert rec.steps[8].guard_note == ""
    # below the H100's 200 W minimum cap: clamped, and said so
    assert rec.steps[0].applied.power_cap_w == 200.0 and "clamped" in rec.steps[0].guard_note
    assert rec.steps[3].diagnostics == {"n": 4}
    assert all(s.step_latency_s > 0 for s in rec.steps)
    assert rec.requests and all(r.finish_s <= 10.0 + 1e-9 for r in rec.requests)
    # measurement windows line up with the steps; the plant holds the applied cap
    assert all(s.measurement.t_s == pytest.approx(s.t_s) for s in rec.steps)
    assert rec.steps[5].measurement.power_cap_w == rec.steps[4].applied.power_cap_w
    assert rec.plant_info.prompt_tokens_mean == pytest.approx(workload().mean_prompt_tokens)
    s = summarize(rec)
    assert s["steps"] == 20 and s["duration_s"] == pytest.approx(10.0)


def test_guard_settings_and_unguarded_runs():
    plant = SimPlant("llama-3.1-8b", "h100-sxm", 1, seed=1)
    rec = run_loop(plant, StaticController(), duration_s=5,
                   schedule=SetpointSchedule(power_budget_w=300), guard=False)
    assert rec.steps[-1].applied.power_cap_w == 700.0  # unguarded: the budget is ignored
    assert rec.steps[-1].guard_note == ""
    plant = SimPlant("llama-3.1-8b", "h100-sxm", 1, seed=1)
    rec = run_loop(plant, StaticController(), duration_s=3, schedule=SetpointSchedule(),
                   guard=GuardConfig(max_cap_change_w=20.0))
    caps = [s.applied.power_cap_w for s in rec.steps]
    assert caps == [700.0, 700.0, 700.0]
    with pytest.raises(ValueError):
        run_loop(plant, StaticController(), duration_s=1, schedule=SetpointSchedule(),
                 guard=SafetyGuard(StaticController()))


class WallPlant(Plant):
    """A non-simulated plant: its clock is the (fake) wall clock."""

    def __init__(self, clock):
        self.clock = clock
        self.limits = Limits(power_cap_min_w=100, power_cap_max_w=400, power_cap_default_w=400)
        self.dt_s = 2.0
        self.info = PlantInfo(model="m", gpu="g", num_gpus=1, simulated=False)
        self.cap = 400.0
        self.e = 0.0

    def read(self):
        self.e += 500.0
        return Measurement(t_s=self.clock.now, window_s=2.0, power_w=250.0, energy_j=self.e,
                           throughput_tok_s=10.0, power_cap_w=self.cap)

    def apply(self, action):
        self.cap = action.power_cap_w
        self.clock.now += 0.25  # applying takes a while
        return Action(power_cap_w=self.cap, max_batch=action.max_batch)


class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.sleeps = []

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s


def test_wall_clock_mode_sleeps_until_each_period_and_stops():
    clock = FakeClock()
    plant = WallPlant(clock)
    rec = run_loop(plant, StaticController(), duration_s=6.0,
                   schedule=SetpointSchedule(power_budget_w=300), monotonic=clock.monotonic,
                   sleep=clock.sleep)
    assert len(rec.steps) == 3
    # period deadlines 102, 104, 106: first sleep 2 s, then 2 - 0.25 s (apply took 0.25 s)
    assert clock.sleeps == pytest.approx([2.0, 1.75, 1.75])
    assert [s.applied.power_cap_w for s in rec.steps] == [300.0] * 3
    # unbounded run ends when should_stop says so
    clock2 = FakeClock()
    n = {"k": 0}

    def stop():
        n["k"] += 1
        return n["k"] > 4

    rec = run_loop(WallPlant(clock2), StaticController(), duration_s=None,
                   schedule=SetpointSchedule(), should_stop=stop, monotonic=clock2.monotonic,
                   sleep=clock2.sleep)
    assert len(rec.steps) == 4
    with pytest.raises(ConfigError, match="finite duration"):
        run_loop(SimPlant("llama-3.1-8b", "h100-sxm", 1), StaticController(), duration_s=None,
                 schedule=SetpointSchedule())


def test_stale_and_crashing_controller_inside_the_loop():
    class Crash(Controller):
        def step(self, m, sp):
            raise ZeroDivisionError

    plant = SimPlant("llama-3.1-8b", "h100-sxm", 1, seed=2)
    rec = run_loop(plant, Crash(), duration_s=4, schedule=SetpointSchedule(power_budget_w=500),
                   workload=workload())
    assert all("ZeroDivisionError" in s.guard_note for s in rec.steps)
    assert all(s.applied.power_cap_w <= 500 for s in rec.steps)
    assert rec.meta["guard_faults"] == 4 and math.isfinite(summarize(rec)["energy_j"])


def test_a_plant_that_already_ran_is_driven_from_its_clock():
    plant = SimPlant("llama-3.1-8b", "h100-sxm", 1, seed=3)
    plant.advance(100.0)
    plant.read()
    rec = run_loop(plant, StaticController(), duration_s=20, schedule=SetpointSchedule(),
                   workload=workload(rate=5.0))
    assert plant.now_s == pytest.approx(120.0)
    assert rec.steps[0].t_s == 1.0 and rec.steps[-1].t_s == 20.0
    assert rec.requests and all(0 <= r.arrival_s < 20 and r.finish_s <= 20 + 1e-9
                                for r in rec.requests)


# -- faults never end the loop ----------------------------------------------------------------
def test_sensor_and_actuator_faults_are_steps_with_notes_and_the_loop_goes_on(caplog):
    from tests.support.chaos import FaultyPlant

    sim = SimPlant("llama-3.1-8b", "h100-sxm", 1, seed=5)
    plant = FaultyPlant(sim, sensor_script={2: "raise", 3: "none", 4: "nan", 6: "stale"},
                        actuator_script={8: "raise", 9: "raise", 10: "raise", 11: "raise"})
    seen = []
    with caplog.at_level("WARNING", logger="palsctl.loop"):
        rec = run_loop(plant, CapToBudget(), duration_s=14,
                       schedule=SetpointSchedule(power_budget_w=500), workload=workload(),
                       on_step=[seen.append], alarm_after=3)
    assert len(rec.steps) == 14 and seen == rec.steps
    faults = [s.fault for s in rec.steps]
    assert faults[2].startswith("sensor: SensorError: injected") and "stale" in faults[2]
    assert faults[3].startswith("sensor: TypeError: plant.read() returned NoneType")
    assert faults[4] == "invalid measurement" and faults[6].startswith("stale measurement (time")
    assert rec.steps[2].measurement.stale and rec.steps[3].measurement.stale
    assert all("actuator: ActuatorError: injected" in f for f in faults[8:12])
    assert all(s.applied == Action() for s in rec.steps[8:12])
    assert faults[12] == faults[13] == "" and rec.steps[12].applied.power_cap_w == 500.0
    assert all(s.applied.power_cap_w in (None, 500.0) for s in rec.steps)
    meta = rec.meta
    assert (meta["sensor_faults"], meta["actuator_faults"], meta["actuator_alarms"]) == (2, 4, 1)
    text = caplog.text
    assert text.count("sensor read failed") == 1 and text.count("actuator failed (") == 1
    assert text.count("ALARM") == 1 and "recovered after 4 failed steps" in text


def test_on_step_callbacks_and_unkept_steps(tmp_path, caplog):
    from palsctl.loop import StepsWriter

    def broken(rec):
        raise OSError("disk full")

    plant = SimPlant("llama-3.1-8b", "h100-sxm", 1, seed=6)
    with StepsWriter(tmp_path / "steps.csv", fsync_every=4) as w:
        rec = run_loop(plant, Recorder(), duration_s=6, schedule=SetpointSchedule(),
                       workload=workload(), on_step=[broken, w], keep_steps=False)
        assert w.rows == 6
    assert rec.steps == [] and rec.meta["callback_errors"] == 6
    assert caplog.text.count("step callback") == 1
    plant = SimPlant("llama-3.1-8b", "h100-sxm", 1, seed=6)
    kept = run_loop(plant, Recorder(), duration_s=6, schedule=SetpointSchedule(),
                    workload=workload())
    kept.write_csv(tmp_path / "whole.csv")
    streamed = (tmp_path / "steps.csv").read_text().splitlines()
    whole = (tmp_path / "whole.csv").read_text().splitlines()
    assert len(streamed) == 7 and streamed[0] == whole[0] and streamed[0].endswith(",fault")
    # the same rows but the wall-clock step latency (column 27)
    assert [r.split(",")[:26] for r in streamed] == [r.split(",")[:26] for r in whole]
