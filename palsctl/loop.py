"""The closed loop: plant + (guarded) controller, one step per control period ``dt_s``.

The loop owns the clock. Per step ``k`` (``t = k·dt_s`` since the start):

1. submit the workload's arrivals in ``[t, t + dt_s)`` (``plant.submit``);
2. let the plant run for ``dt_s``: ``plant.advance(dt_s)`` for a simulated plant (no sleep), or
   sleep on the wall clock (``time.monotonic``) until the end of the period for a real plant;
3. ``m = plant.read()``; ``sp = schedule(t + dt_s)`` — the setpoint in force from now on, i.e.
   during the period the new action will govern;
4. ``g = guard.step(m, sp)`` (timed with ``perf_counter``), ``applied = plant.apply(g.action)``;
5. record a `StepRecord` and hand it to the ``on_step`` callbacks (a steps file, a status line,
   an exporter).

So step ``i``'s measurement covers the period *before* its decision, produced under step
``i-1``'s action and setpoint; `palsctl.metrics` scores each window against the setpoint that was
in force during it.

**Faults never end the loop.** A ``plant.read()`` that raises (or returns something other than a
`Measurement`) gives a stale step: the last good measurement repeated with ``stale=True``, so the
guard holds a safe action. A ``plant.apply()`` that raises is recorded (``applied`` is what the
`ActuatorError` says is known, else empty) and retried on the next step; after ``alarm_after``
consecutive failures the loop raises an alarm (an ERROR log line and ``record.meta
["actuator_alarms"]``) and keeps trying. Every step is recorded with its ``fault`` note; the
counts are in ``record.meta`` (``sensor_faults``, ``actuator_faults``, ``actuator_alarms``,
``guard_faults``, ``guard_tightenings``).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from palsctl.errors import ConfigError
from palsctl.interfaces import Controller, Plant, SimulatedPlant
from palsctl.safety import Guard, GuardConfig, PassThrough, SafetyGuard
from palsctl.types import (
    SETPOINT_FIELDS,
    Action,
    Limits,
    Measurement,
    PlantInfo,
    RequestResult,
    Setpoint,
)

__all__ = ["ClosedLoop", "RunRecord", "StepRecord", "StepsWriter", "STEP_COLUMNS", "run_loop",
           "step_row"]

log = logging.getLogger(__name__)

Schedule = Callable[[float], Setpoint]
Progress = Callable[[int, int], None]
OnStep = Callable[["StepRecord"], None]

# Controller and plant periods must agree to this relative tolerance.
_DT_RTOL = 1e-6


@dataclass(frozen=True, kw_only=True, slots=True)
class StepRecord:
    """One control step. ``t_s`` is the time of the decision (end of the measured window,
    seconds since the start of the run); ``requested`` is the controller's raw output,
    ``applied`` what the plant applied after the guard (read back; knobs ``None`` when the
    actuator failed and left them unknown); ``guard_note`` says what the guard changed (empty:
    nothing); ``fault`` what went wrong in this step (sensor, actuator, stale or invalid data,
    controller failure; empty: nothing); ``step_latency_s`` the wall time of the guarded
    controller step."""

    t_s: float
    measurement: Measurement
    setpoint: Setpoint
    requested: Action
    applied: Action
    guard_note: str = ""
    diagnostics: dict[str, Any] = field(default_factory=dict)
    step_latency_s: float = 0.0
    fault: str = ""


#: The columns of a steps CSV file (`RunRecord.write_csv`, `StepsWriter`), SI units.
STEP_COLUMNS = ("t_s", "window_s", "power_w", "energy_j", "throughput_tok_s", "prompt_tok_s",
                "demand_tok_s", "running", "waiting", "kv_usage", "ttft_p90_s", "tpot_p90_s",
                "power_cap_w", "max_batch", "sm_clock_mhz", "stale",
                *(f"setpoint_{name}" for name in SETPOINT_FIELDS),
                "requested_cap_w", "requested_batch", "applied_cap_w", "applied_batch",
                "guard_note", "step_latency_s", "diagnostics", "fault")


def step_row(s: StepRecord) -> list[Any]:
    """One CSV row (`STEP_COLUMNS`) for a step: SI units, the setpoint in force as
    ``setpoint_<field>``, diagnostics as a JSON object."""
    m, sp = s.measurement, s.setpoint
    return [
        _fmt(s.t_s), _fmt(m.window_s), _fmt(m.power_w), _fmt(m.energy_j),
        _fmt(m.throughput_tok_s), _fmt(m.prompt_tok_s), _fmt(m.demand_tok_s),
        m.running, m.waiting, _fmt(m.kv_usage), _fmt(m.ttft_p90_s),
        _fmt(m.tpot_p90_s), _fmt(m.power_cap_w), _fmt(m.max_batch),
        _fmt(m.sm_clock_mhz), int(m.stale),
        *(_fmt(getattr(sp, name)) for name in SETPOINT_FIELDS),
        _fmt(s.requested.power_cap_w), _fmt(s.requested.max_batch),
        _fmt(s.applied.power_cap_w), _fmt(s.applied.max_batch),
        s.guard_note, _fmt(s.step_latency_s),
        json.dumps(s.diagnostics, default=str, separators=(",", ":")), s.fault,
    ]


@dataclass(kw_only=True)
class RunRecord:
    """Everything a run produced; `palsctl.metrics.summarize` scores it.

    Parameters
    ----------
    steps : list of StepRecord
        One record per control period; times in s since the start of the run.
    requests : list of RequestResult
        The requests finished during the run; times in s since its start.
    limits : Limits
        The plant's bounds.
    dt_s : float
        The control period, s.
    plant_info : PlantInfo or None
        The plant's description.
    controller : str
        The controller's registered name.
    meta : dict
        Counts and settings of the run (``sensor_faults``, ``guard_interventions``, ...).
    """

    steps: list[StepRecord]
    requests: list[RequestResult]
    limits: Limits
    dt_s: float
    plant_info: PlantInfo | None = None
    controller: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def write_csv(self, path: str | Path) -> Path:
        """Write one row per step (`STEP_COLUMNS`, see `step_row`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(STEP_COLUMNS)
            w.writerows(step_row(s) for s in self.steps)
        return path


class StepsWriter:
    """Appends each step to a CSV file as it happens (an ``on_step`` callback): the header at
    open, then one row per call, each flushed to the operating system, the file ``fsync``-ed
    every ``fsync_every`` rows and at `close`. ``rows`` counts the rows written.

    Parameters
    ----------
    path : str or Path
        The steps file (created or truncated; its folder is created).
    fsync_every : int
        Rows between ``fsync`` calls (a crash of the machine loses at most these; a crash of
        the process loses nothing flushed).
    """

    def __init__(self, path: str | Path, *, fsync_every: int = 10) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync_every = max(1, int(fsync_every))
        self._fh: TextIO | None = self.path.open("w", newline="")
        self._w = csv.writer(self._fh)
        self._w.writerow(STEP_COLUMNS)
        self.rows = 0
        self._sync()

    def __call__(self, rec: StepRecord) -> None:
        """Append one step's row (flushed; ``fsync``-ed every ``fsync_every`` rows)."""
        if self._fh is None:
            raise ValueError(f"steps file {self.path} is closed")
        self._w.writerow(step_row(rec))
        self.rows += 1
        if self.rows % self.fsync_every == 0:
            self._sync()
        else:
            self._fh.flush()

    def _sync(self) -> None:
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Flush, fsync and close (idempotent)."""
        if self._fh is not None:
            try:
                self._sync()
            finally:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> "StepsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(x) if math.isfinite(x) else str(x)
    return str(x)


def _make_guard(controller: Controller | Guard, guard: Any) -> Guard:
    if isinstance(controller, Guard):     # an already guarded controller
        if guard not in (None, True) and guard is not controller:
            raise ValueError("pass either a guarded controller or a guard, not both")
        return controller
    if guard is None or guard is True:
        return SafetyGuard(controller)
    if guard is False:
        return PassThrough(controller)
    if isinstance(guard, GuardConfig):
        return SafetyGuard(controller, guard)
    if isinstance(guard, Guard):
        if guard.controller is not controller:
            raise ValueError("the guard passed must wrap the controller passed")
        return guard
    raise TypeError(f"guard must be None, a bool, a GuardConfig or a Guard, got {guard!r}")


class ClosedLoop:
    """A plant and a (guarded) controller closed by a setpoint schedule, stepped one control
    period at a time. `run_loop` drives one to the end; a fleet coordinator steps many side by
    side (changing each replica's budget between steps through its ``schedule``).

    ``step()`` runs one period: submit the workload's arrivals, advance the simulated plant (a
    real plant's period is waited for by the caller, see `run_loop`), read, decide, apply and
    record. ``record`` is the `RunRecord` so far (the same object grows as steps are taken;
    with ``keep_steps=False`` its step list stays empty — for unbounded runs whose steps go to
    an ``on_step`` callback such as `StepsWriter`). ``on_step``: callables given each
    `StepRecord` after it is recorded (a failing callback is logged once and counted in
    ``record.meta["callback_errors"]``, never ends the loop). ``alarm_after``: consecutive
    actuator failures that raise the alarm. Other arguments as in `run_loop`.
    """

    def __init__(self, plant: Plant, controller: Controller | Guard, *, schedule: Schedule,
                 workload: Any = None,
                 guard: Guard | GuardConfig | bool | None = None,
                 on_step: Sequence[OnStep] = (), keep_steps: bool = True,
                 alarm_after: int = 3) -> None:
        dt = float(plant.dt_s)
        if not (dt > 0 and math.isfinite(dt)):
            raise ConfigError(f"plant dt_s must be a positive number of seconds, "
                              f"got {plant.dt_s!r}")
        expected = controller.expected_dt_s
        if expected is not None and abs(expected - dt) > _DT_RTOL * dt:
            inner = getattr(controller, "controller", controller)
            raise ConfigError(f"controller {type(inner).__name__} was tuned for "
                              f"dt_s={expected:g} s but the plant runs at dt_s={dt:g} s",
                              key="dt_s", value=dt)
        self.plant, self.schedule, self.workload, self.dt_s = plant, schedule, workload, dt
        self.simulated = isinstance(plant, SimulatedPlant)
        self.guard = _make_guard(controller, guard)
        info = plant.info
        if workload is not None and info is not None and info.prompt_tokens_mean is None:
            # tell the controller the offered load's mean lengths (for its models)
            info = replace(info, prompt_tokens_mean=float(workload.mean_prompt_tokens),
                           output_tokens_mean=float(workload.mean_output_tokens))
        self.guard.setup(limits=plant.limits, dt_s=dt, plant_info=info)
        inner = self.guard.controller
        self.record = RunRecord(steps=[], requests=[], limits=plant.limits, dt_s=dt,
                                plant_info=info,
                                controller=getattr(inner, "name", type(inner).__name__),
                                meta={"simulated": self.simulated, "guard_faults": 0,
                                      "guard_tightenings": 0, "sensor_faults": 0,
                                      "actuator_faults": 0, "actuator_alarms": 0})
        self.on_step: list[OnStep] = list(on_step)
        self.keep_steps = keep_steps
        self.alarm_after = max(1, int(alarm_after))
        #: consecutive failed reads / applies so far (0: the last one worked)
        self.sensor_failures_in_row = 0
        self.actuator_failures_in_row = 0
        self._last_m: Measurement | None = None
        self._last_m_k = 0
        self._failed_callbacks: set[int] = set()
        self._t0_plant = plant.now_s if isinstance(plant, SimulatedPlant) else 0.0
        self.k = 0

    @property
    def ctl(self) -> Guard:
        """The guard (or pass-through) the loop steps."""
        return self.guard

    @property
    def t_s(self) -> float:
        """Seconds since the start of the run at the end of the steps taken so far."""
        return self.k * self.dt_s

    def step(self) -> StepRecord:
        """Run one control period and return its record (also appended to ``record``)."""
        plant, dt, k = self.plant, self.dt_s, self.k
        t = k * dt
        if self.workload is not None:
            arrivals = self.workload.requests_between(t, t + dt)
            if arrivals:
                if self._t0_plant:
                    arrivals = [_shift(r, self._t0_plant) for r in arrivals]
                plant.submit(arrivals)
        if isinstance(plant, SimulatedPlant):
            plant.advance(dt)
        sensor_fault = ""
        try:
            m = plant.read()
            if m.__class__ is not Measurement and not isinstance(m, Measurement):
                raise TypeError(f"plant.read() returned {type(m).__name__}, not a Measurement")
        except Exception as exc:  # noqa: BLE001 - a sensor fault is a stale step, never the end
            m, sensor_fault = self._sensor_fault(exc, k)
        else:
            self._last_m, self._last_m_k = m, k
            if self.sensor_failures_in_row:
                log.info("sensor recovered after %d failed reads", self.sensor_failures_in_row)
                self.sensor_failures_in_row = 0
        t_next = (k + 1) * dt
        sp = self.schedule(t_next)
        guard = self.guard
        c0 = time.perf_counter()
        g = guard.step(m, sp)
        latency = time.perf_counter() - c0
        actuator_fault = ""
        try:
            applied = plant.apply(g.action)
            if applied.__class__ is not Action and not isinstance(applied, Action):
                raise TypeError(f"plant.apply() returned {type(applied).__name__}, not an Action")
        except Exception as exc:  # noqa: BLE001 - an actuator fault is retried next step
            applied, actuator_fault = self._actuator_fault(exc)
        else:
            if self.actuator_failures_in_row:
                log.warning("actuator recovered after %d failed steps",
                            self.actuator_failures_in_row)
                self.actuator_failures_in_row = 0
        fault = g.fault
        if sensor_fault or actuator_fault:
            fault = "; ".join(f for f in (sensor_fault, fault, actuator_fault) if f)
        rec = StepRecord(t_s=t_next, measurement=m, setpoint=sp, requested=g.requested,
                         applied=applied, guard_note=g.note, diagnostics=guard.diagnostics(),
                         step_latency_s=latency, fault=fault)
        record = self.record
        if self.keep_steps:
            record.steps.append(rec)
        meta = record.meta
        if guard.faults != meta["guard_faults"]:
            meta["guard_faults"] = guard.faults
        if guard.tightenings != meta["guard_tightenings"]:
            meta["guard_tightenings"] = guard.tightenings
        done = plant.completed()
        if done:
            t0 = self._t0_plant
            if t0:  # report times since the start of the run, like the steps
                done = [replace(r, arrival_s=r.arrival_s - t0, first_token_s=r.first_token_s - t0,
                                finish_s=r.finish_s - t0) for r in done]
            record.requests.extend(done)
        self.k = k + 1
        for cb in self.on_step:
            try:
                cb(rec)
            except Exception:  # noqa: BLE001 - a record consumer must not stop the control
                self._callback_failed(cb)
        return rec

    def run(self, duration_s: float | None, *, progress: Progress | None = None,
            should_stop: Callable[[], bool] | None = None,
            monotonic: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> RunRecord:
        """Step until ``duration_s`` seconds (simulated or wall) have run and return ``record``.

        ``duration_s=None`` runs until ``should_stop()`` is true or Ctrl-C (wall-clock plants
        only). A real plant's step waits until the end of its period on ``monotonic``/``sleep``
        (injectable for tests). ``progress(done_steps, total_steps)`` is called after each step
        (total 0 when unbounded)."""
        dt, simulated = self.dt_s, self.simulated
        if duration_s is None:
            if simulated:
                raise ConfigError("a simulated run needs a finite duration_s")
            n_steps = 0
        else:
            if not (duration_s > 0 and math.isfinite(duration_s)):
                raise ConfigError("duration_s must be a positive number of seconds",
                                  key="duration_s", value=duration_s)
            n_steps = self.k + max(1, round(duration_s / dt))
        start_wall = monotonic() - self.k * dt
        try:
            while n_steps == 0 or self.k < n_steps:
                if should_stop is not None and should_stop():
                    break
                if not simulated:
                    wait_s = start_wall + (self.k + 1) * dt - monotonic()
                    if wait_s > 0:
                        sleep(wait_s)
                self.step()
                if progress is not None:
                    progress(self.k, n_steps)
        except KeyboardInterrupt:
            if simulated or duration_s is not None:
                raise  # only an unbounded wall-clock run ends on Ctrl-C with its record
        return self.record

    def _sensor_fault(self, exc: Exception, k: int) -> tuple[Measurement, str]:
        self.record.meta["sensor_faults"] += 1
        self.sensor_failures_in_row += 1
        if self.sensor_failures_in_row == 1:
            log.warning("sensor read failed (%s: %s); recording stale steps until it recovers "
                        "(logged once per episode)", type(exc).__name__, exc)
        last, dt = self._last_m, self.dt_s
        if last is not None:
            m = replace(last, t_s=last.t_s + (k - self._last_m_k) * dt, window_s=dt, stale=True)
        else:
            m = Measurement(t_s=self._t0_plant + (k + 1) * dt, window_s=dt, power_w=0.0,
                            energy_j=0.0, throughput_tok_s=0.0, stale=True)
        return m, f"sensor: {type(exc).__name__}: {exc}"

    def _actuator_fault(self, exc: Exception) -> tuple[Action, str]:
        meta = self.record.meta
        meta["actuator_faults"] += 1
        self.actuator_failures_in_row += 1
        n = self.actuator_failures_in_row
        if n == 1:
            log.warning("actuator failed (%s: %s); retrying every step (logged once per episode)",
                        type(exc).__name__, exc)
        if n == self.alarm_after:
            meta["actuator_alarms"] += 1
            log.error("ALARM: the actuator failed %d steps in a row (%s: %s); the settings in "
                      "force are unknown; still retrying every step", n, type(exc).__name__, exc)
        applied = getattr(exc, "applied", None)
        if not isinstance(applied, Action):
            applied = Action()
        return applied, f"actuator: {type(exc).__name__}: {exc}"

    def _callback_failed(self, cb: OnStep) -> None:
        meta = self.record.meta
        meta["callback_errors"] = meta.get("callback_errors", 0) + 1
        if id(cb) not in self._failed_callbacks:
            self._failed_callbacks.add(id(cb))
            log.error("step callback %r failed (logged once; the loop goes on)", cb,
                      exc_info=True)


def run_loop(plant: Plant, controller: Controller | Guard, *, duration_s: float | None,
             schedule: Schedule, workload: Any = None,
             guard: Guard | GuardConfig | bool | None = None,
             progress: Progress | None = None,
             should_stop: Callable[[], bool] | None = None,
             monotonic: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep,
             on_step: Sequence[OnStep] = (), keep_steps: bool = True,
             alarm_after: int = 3) -> RunRecord:
    """Run the closed loop for ``duration_s`` seconds (simulated or wall) and record every step.

    ``guard``: None/True wraps the controller in a default `SafetyGuard`; a `GuardConfig` or a
    guard instance chooses its settings; False runs the controller unguarded (a `PassThrough`;
    experiments only). ``on_step``, ``keep_steps``, ``alarm_after``: see `ClosedLoop`; the other
    arguments: see `ClosedLoop.run`. Raises `ConfigError` when the controller was tuned for
    another control period than the plant's ``dt_s``.
    """
    loop = ClosedLoop(plant, controller, schedule=schedule, workload=workload, guard=guard,
                      on_step=on_step, keep_steps=keep_steps, alarm_after=alarm_after)
    return loop.run(duration_s, progress=progress, should_stop=should_stop, monotonic=monotonic,
                    sleep=sleep)


def _shift(r, offset_s: float):
    return replace(r, arrival_s=r.arrival_s + offset_s)
