"""The closed loop: plant + (guarded) controller, one step per control period ``dt_s``.

The loop owns the clock. Per step ``k`` (``t = k·dt_s`` since the start):

1. submit the workload's arrivals in ``[t, t + dt_s)`` (``plant.submit``);
2. let the plant run for ``dt_s``: ``plant.advance(dt_s)`` for a simulated plant (no sleep), or
   sleep on the wall clock (``time.monotonic``) until the end of the period for a real plant;
3. ``m = plant.read()``; ``sp = schedule(t + dt_s)`` — the setpoint in force from now on, i.e.
   during the period the new action will govern;
4. ``a = guard.step(m, sp)`` (timed with ``perf_counter``), ``applied = plant.apply(a)``;
5. record a `StepRecord`.

So step ``i``'s measurement covers the period *before* its decision, produced under step
``i-1``'s action and setpoint; `palsctl.metrics` scores each window against the setpoint that was
in force during it.
"""
from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from palsctl.errors import ConfigError
from palsctl.interfaces import Controller, Plant, SimulatedPlant
from palsctl.safety import GuardConfig, SafetyGuard
from palsctl.types import (
    SETPOINT_FIELDS,
    Action,
    Limits,
    Measurement,
    PlantInfo,
    RequestResult,
    Setpoint,
)

Schedule = Callable[[float], Setpoint]
Progress = Callable[[int, int], None]

# Controller and plant periods must agree to this relative tolerance.
_DT_RTOL = 1e-6


@dataclass(frozen=True, kw_only=True, slots=True)
class StepRecord:
    """One control step. ``t_s`` is the time of the decision (end of the measured window,
    seconds since the start of the run); ``requested`` is the controller's raw output,
    ``applied`` what the plant applied after the guard; ``guard_note`` says what the guard
    changed (empty: nothing); ``step_latency_s`` the wall time of the guarded controller step."""

    t_s: float
    measurement: Measurement
    setpoint: Setpoint
    requested: Action
    applied: Action
    guard_note: str = ""
    diagnostics: dict[str, Any] = field(default_factory=dict)
    step_latency_s: float = 0.0


@dataclass(kw_only=True)
class RunRecord:
    """Everything a run produced; `palsctl.metrics.summarize` scores it. Step and request
    times are seconds since the start of the run."""

    steps: list[StepRecord]
    requests: list[RequestResult]
    limits: Limits
    dt_s: float
    plant_info: PlantInfo | None = None
    controller: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def write_csv(self, path: str | Path) -> Path:
        """Write one row per step (SI units; the setpoint in force as ``setpoint_<field>``;
        diagnostics as a JSON object)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cols = ["t_s", "window_s", "power_w", "energy_j", "throughput_tok_s", "prompt_tok_s",
                "demand_tok_s", "running", "waiting", "kv_usage", "ttft_p90_s", "tpot_p90_s",
                "power_cap_w", "max_batch", "sm_clock_mhz", "stale",
                *(f"setpoint_{name}" for name in SETPOINT_FIELDS),
                "requested_cap_w", "requested_batch", "applied_cap_w", "applied_batch",
                "guard_note", "step_latency_s", "diagnostics"]
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for s in self.steps:
                m, sp = s.measurement, s.setpoint
                w.writerow([
                    _fmt(s.t_s), _fmt(m.window_s), _fmt(m.power_w), _fmt(m.energy_j),
                    _fmt(m.throughput_tok_s), _fmt(m.prompt_tok_s), _fmt(m.demand_tok_s),
                    m.running, m.waiting, _fmt(m.kv_usage), _fmt(m.ttft_p90_s),
                    _fmt(m.tpot_p90_s), _fmt(m.power_cap_w), _fmt(m.max_batch),
                    _fmt(m.sm_clock_mhz), int(m.stale),
                    *(_fmt(getattr(sp, name)) for name in SETPOINT_FIELDS),
                    _fmt(s.requested.power_cap_w), _fmt(s.requested.max_batch),
                    _fmt(s.applied.power_cap_w), _fmt(s.applied.max_batch),
                    s.guard_note, _fmt(s.step_latency_s),
                    json.dumps(s.diagnostics, default=str, separators=(",", ":")),
                ])
        return path


def _fmt(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(x) if math.isfinite(x) else str(x)
    return str(x)


def _make_guard(controller: Controller, guard: Any) -> Controller:
    if isinstance(controller, SafetyGuard) and guard in (None, True):
        return controller
    if guard is False:
        return controller
    if guard is None or guard is True:
        return SafetyGuard(controller)
    if isinstance(guard, GuardConfig):
        return SafetyGuard(controller, guard)
    if isinstance(guard, SafetyGuard):
        if guard.controller is not controller:
            raise ValueError("the SafetyGuard passed as guard must wrap the controller passed")
        return guard
    raise TypeError(f"guard must be None, a bool, a GuardConfig or a SafetyGuard, got {guard!r}")


class ClosedLoop:
    """A plant and a (guarded) controller closed by a setpoint schedule, stepped one control
    period at a time. `run_loop` drives one to the end; a fleet coordinator steps many side by
    side (changing each replica's budget between steps through its ``schedule``).

    ``step()`` runs one period: submit the workload's arrivals, advance the simulated plant (a
    real plant's period is waited for by the caller, see `run_loop`), read, decide, apply and
    record. ``record`` is the `RunRecord` so far (the same object grows as steps are taken).
    Arguments as in `run_loop`.
    """

    def __init__(self, plant: Plant, controller: Controller, *, schedule: Schedule,
                 workload: Any = None,
                 guard: SafetyGuard | GuardConfig | bool | None = None) -> None:
        dt = float(plant.dt_s)
        if not (dt > 0 and math.isfinite(dt)):
            raise ConfigError(f"plant dt_s must be a positive number of seconds, "
                              f"got {plant.dt_s!r}")
        expected = controller.expected_dt_s
        if expected is not None and abs(expected - dt) > _DT_RTOL * dt:
            raise ConfigError(f"controller {type(controller).__name__} was tuned for "
                              f"dt_s={expected:g} s but the plant runs at dt_s={dt:g} s",
                              key="dt_s", value=dt)
        self.plant, self.schedule, self.workload, self.dt_s = plant, schedule, workload, dt
        self.simulated = isinstance(plant, SimulatedPlant)
        self.ctl = _make_guard(controller, guard)
        info = plant.info
        if workload is not None and info is not None and info.prompt_tokens_mean is None:
            # tell the controller the offered load's mean lengths (for its models)
            info = replace(info, prompt_tokens_mean=float(workload.mean_prompt_tokens),
                           output_tokens_mean=float(workload.mean_output_tokens))
        self.ctl.setup(limits=plant.limits, dt_s=dt, plant_info=info)
        self._is_guard = isinstance(self.ctl, SafetyGuard)
        inner = self.ctl.controller if self._is_guard else self.ctl
        self.record = RunRecord(steps=[], requests=[], limits=plant.limits, dt_s=dt,
                                plant_info=info,
                                controller=getattr(inner, "name", type(inner).__name__),
                                meta={"simulated": self.simulated, "guard_faults": 0})
        self._t0_plant = plant.now_s if self.simulated else 0.0
        self.k = 0

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
        if self.simulated:
            plant.advance(dt)
        m = plant.read()
        t_next = (k + 1) * dt
        sp = self.schedule(t_next)
        ctl = self.ctl
        c0 = time.perf_counter()
        a = ctl.step(m, sp)
        latency = time.perf_counter() - c0
        applied = plant.apply(a)
        if self._is_guard:
            rec = StepRecord(t_s=t_next, measurement=m, setpoint=sp,
                             requested=ctl.last_requested, applied=applied,
                             guard_note=ctl.last_note, diagnostics=ctl.diagnostics(),
                             step_latency_s=latency)
            self.record.meta["guard_faults"] = ctl.faults
        else:
            rec = StepRecord(t_s=t_next, measurement=m, setpoint=sp, requested=a,
                             applied=applied, diagnostics=ctl.diagnostics(),
                             step_latency_s=latency)
        self.record.steps.append(rec)
        done = plant.completed()
        if done:
            t0 = self._t0_plant
            if t0:  # report times since the start of the run, like the steps
                done = [replace(r, arrival_s=r.arrival_s - t0, first_token_s=r.first_token_s - t0,
                                finish_s=r.finish_s - t0) for r in done]
            self.record.requests.extend(done)
        self.k = k + 1
        return rec


def run_loop(plant: Plant, controller: Controller, *, duration_s: float | None,
             schedule: Schedule, workload: Any = None,
             guard: SafetyGuard | GuardConfig | bool | None = None,
             progress: Progress | None = None,
             should_stop: Callable[[], bool] | None = None,
             monotonic: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> RunRecord:
    """Run the closed loop for ``duration_s`` seconds (simulated or wall) and record every step.

    ``guard``: None/True wraps the controller in a default `SafetyGuard`; a `GuardConfig` or a
    guard instance chooses its settings; False runs the controller unguarded (experiments only).
    ``duration_s=None`` runs until ``should_stop()`` is true or Ctrl-C (wall-clock plants only).
    ``progress(done_steps, total_steps)`` is called after each step (total 0 when unbounded).
    Raises `ConfigError` when the controller was tuned for another control period than the
    plant's ``dt_s``. ``monotonic``/``sleep`` are injectable for tests of the wall-clock path.
    """
    loop = ClosedLoop(plant, controller, schedule=schedule, workload=workload, guard=guard)
    dt, simulated = loop.dt_s, loop.simulated
    if duration_s is None:
        if simulated:
            raise ConfigError("a simulated run needs a finite duration_s")
        n_steps = 0
    else:
        if not (duration_s > 0 and math.isfinite(duration_s)):
            raise ConfigError("duration_s must be a positive number of seconds", key="duration_s",
                              value=duration_s)
        n_steps = max(1, round(duration_s / dt))
    start_wall = monotonic()
    try:
        while n_steps == 0 or loop.k < n_steps:
            if should_stop is not None and should_stop():
                break
            if not simulated:
                wait_s = start_wall + (loop.k + 1) * dt - monotonic()
                if wait_s > 0:
                    sleep(wait_s)
            loop.step()
            if progress is not None:
                progress(loop.k, n_steps)
    except KeyboardInterrupt:
        if simulated or duration_s is not None:
            raise  # only an unbounded wall-clock run ends on Ctrl-C with its record
    return loop.record


def _shift(r, offset_s: float):
    return replace(r, arrival_s=r.arrival_s + offset_s)
