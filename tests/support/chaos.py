"""Fault injection around a simulated plant, for the loop and chaos tests.

`FaultyPlant` wraps a `SimPlant` and, step by step, lets its sensor or its actuator misbehave the
way real ones do. The fault in force is an attribute the test sets before a step (or a script
keyed by step index):

sensor faults (``sensor``):
  ``"nan"``   — the reading's power is NaN;
  ``"none"``  — ``read()`` returns None;
  ``"raise"`` — ``read()`` raises `SensorError` (nothing read: the next read covers the gap);
  ``"stale"`` — ``read()`` repeats the last good reading it gave, without flagging it;
actuator faults (``actuator``):
  ``"raise"``  — ``apply()`` raises `ActuatorError` and applies nothing;
  ``"ignore"`` — cap writes are dropped (the batch still applies); read-back tells the truth;
  ``"lie"``    — the firmware enforces ``lie_factor`` × the commanded cap but reads back and
  reports the commanded one (only the measured power shows it).

``true_cap_w`` is the cap the simulated GPUs really enforce.
"""
from __future__ import annotations

import math
from dataclasses import replace

from palsctl.errors import ActuatorError, SensorError
from palsctl.interfaces import SimulatedPlant
from palsctl.types import Action

SENSOR_FAULTS = ("nan", "none", "raise", "stale")
ACTUATOR_FAULTS = ("raise", "ignore", "lie")


class FaultyPlant(SimulatedPlant):
    def __init__(self, plant, *, sensor_script=None, actuator_script=None, lie_factor=1.3):
        self.inner = plant
        self.limits, self.dt_s, self.info = plant.limits, plant.dt_s, plant.info
        self.sensor: str | None = None
        self.actuator: str | None = None
        self.sensor_script = dict(sensor_script or {})
        self.actuator_script = dict(actuator_script or {})
        self.lie_factor = lie_factor
        self.reads = 0          # read() calls so far
        self.applies = 0        # apply() calls so far
        self._last = None
        self._commanded_cap_w: float | None = None

    @property
    def now_s(self) -> float:
        return self.inner.now_s

    @property
    def true_cap_w(self) -> float:
        return self.inner.engine.cap_set_w

    def submit(self, requests) -> None:
        self.inner.submit(requests)

    def advance(self, dt_s: float) -> None:
        self.inner.advance(dt_s)

    def completed(self):
        return self.inner.completed()

    def close(self) -> None:
        self.inner.close()

    def read(self):
        k = self.reads
        self.reads += 1
        fault = self.sensor_script.get(k, self.sensor)
        if fault == "raise":
            raise SensorError("injected: power endpoint unreachable")
        if fault == "none":
            return None
        if fault == "stale" and self._last is not None:
            return self._last
        m = self.inner.read()
        if self._commanded_cap_w is not None:     # lying firmware
            m = replace(m, power_cap_w=self._commanded_cap_w)   # the read-back lies too
        if fault == "nan":
            return replace(m, power_w=math.nan)
        self._last = m          # what a stale sensor repeats: the last good reading it gave
        return m

    def apply(self, action: Action) -> Action:
        k = self.applies
        self.applies += 1
        fault = self.actuator_script.get(k, self.actuator)
        if fault == "raise":
            raise ActuatorError("injected: power limit write refused")
        if fault == "ignore":
            out = self.inner.apply(Action(max_batch=action.max_batch))
            self._commanded_cap_w = None
            return out
        if fault == "lie" and action.power_cap_w is not None:
            cap = self.limits.clamp_cap_w(action.power_cap_w)
            out = self.inner.apply(Action(power_cap_w=min(cap * self.lie_factor,
                                                          self.limits.power_cap_max_w),
                                          max_batch=action.max_batch))
            self._commanded_cap_w = cap
            return Action(power_cap_w=cap, max_batch=out.max_batch)
        self._commanded_cap_w = None
        return self.inner.apply(action)


# ----------------------------------------------------------------------------- the harness
CONTROLLERS = ("cap-to-budget", "pi", "search")


class InvariantError(AssertionError):
    """A chaos invariant did not hold (the message says which, at which step)."""


class ChaosLoop:
    """A guarded closed loop under injected faults that checks four invariants every step.

    A `ClosedLoop` (default `SafetyGuard`) on a `FaultyPlant` around a seeded `SimPlant` under a
    Poisson load, with a budget the test moves (``budget_w``; None: no budget). After every step:

    1. the loop survives (``step`` raises nothing) and records the step: a `StepRecord` with a
       `Measurement` and an `Action`, handed to the ``on_step`` callbacks (``recorded`` counts
       them) and noted with the injected fault (sensor: ``sensor:``, ``invalid`` or ``stale``;
       actuator raise: ``actuator:``);
    2. the commanded action (what the guard sent) lies within the limits and its total cap fits
       the budget of the step (the minimum cap when the budget is below the plant's floor);
    3. measured power over the budget in force during its window by more than the guard's
       tolerance, in two consecutive windows the guard judged, makes the second step command a
       tighter action than the step before (lower cap or lower batch; both at the minimum
       already excepted; a step whose budget rose excepted);
    4. stale or invalid data never raises the commanded cap.

    ``guard_config``: a `GuardConfig` for the guard (None: the default one).
    ``strict``: raise `InvariantError` at the first broken invariant (tests); else count them
    in ``violations`` (the benchmark). ``over_runs`` lists, per step, how many consecutive
    windows so far were over the budget by more than ``band_frac``.
    """

    def __init__(self, controller: str, *, seed: int = 0, rate_req_s: float = 12.0,
                 budget_frac: float | None = 0.6, strict: bool = True, band_frac: float = 0.03,
                 model: str = "llama-3.1-8b", gpu: str = "h100-sxm", num_gpus: int = 1,
                 on_step=(), guard_config=None) -> None:
        from palsctl.loop import ClosedLoop
        from palsctl.plants.sim import SimPlant
        from palsctl.registry import make_controller
        from palsctl.types import Setpoint
        from palsctl.workloads import PoissonWorkload
        from palsctl.workloads.synthetic import LogNormalLengths

        sim = SimPlant(model, gpu, num_gpus, seed=seed, max_batch_launch=64)
        self.plant = FaultyPlant(sim)
        lim = self.limits = sim.limits
        self.max_total_w = lim.power_cap_max_w * lim.num_gpus
        self.budget_w = None if budget_frac is None else budget_frac * self.max_total_w
        wl = PoissonWorkload(rate_req_s, prompt=LogNormalLengths.from_mean(300, 0.5),
                             output=LogNormalLengths.from_mean(150, 0.5), seed=seed)
        self.recorded = 0

        def count(rec):
            self.recorded += 1

        self.loop = ClosedLoop(self.plant, make_controller(controller),
                               schedule=lambda t: Setpoint(power_budget_w=self.budget_w),
                               workload=wl, on_step=[count, *on_step], guard=guard_config)
        guard = self.loop.guard
        self.tol = guard.config.power_tolerance_frac
        step = guard.step
        self.commanded = []

        def recording_step(m, sp):
            g = step(m, sp)
            self.commanded.append(g)
            return g

        guard.step = recording_step
        self.strict, self.band = strict, band_frac
        self.violations: list[str] = []
        self.over_runs: list[int] = []
        self._over = 0          # consecutive judged windows over (guard's tolerance)
        self._band_run = 0      # consecutive windows over the reporting band
        self._prev_budget: float | None = None
        self._before_budget: float | None = None   # in force during the window before it
        self.steps = 0

    def _fail(self, what: str) -> None:
        msg = f"step {self.steps}: {what}"
        if self.strict:
            raise InvariantError(msg)
        self.violations.append(msg)

    def step(self):
        """One step with the faults set on ``plant``; checks the invariants; returns the record."""
        from palsctl.loop import StepRecord
        from palsctl.safety import budget_cap_w
        from palsctl.types import Action, Measurement

        plant, lim = self.plant, self.limits
        sensor = plant.sensor_script.get(plant.reads, plant.sensor)
        if sensor == "stale" and plant._last is None:
            sensor = None               # nothing to repeat yet: the sensor reads afresh
        actuator = plant.actuator_script.get(plant.applies, plant.actuator)
        n_before = self.recorded
        rec = self.loop.step()                                   # 1. survives
        self.steps += 1
        g, prev = self.commanded[-1], (self.commanded[-2] if len(self.commanded) > 1 else None)
        if not (isinstance(rec, StepRecord) and isinstance(rec.measurement, Measurement)
                and isinstance(rec.applied, Action)) or self.recorded != n_before + 1:
            self._fail("step not recorded")
        expect = {"raise": "sensor:", "none": "sensor:", "nan": "invalid measurement",
                  "stale": "stale measurement"}.get(sensor)
        if expect and expect not in rec.fault:
            self._fail(f"sensor fault {sensor!r} not noted: {rec.fault!r}")
        if actuator == "raise" and "actuator:" not in rec.fault:
            self._fail(f"actuator fault not noted: {rec.fault!r}")
        a = g.action                                              # 2. limits and budget
        cap, batch = a.power_cap_w, a.max_batch
        if not (lim.power_cap_min_w <= cap <= lim.power_cap_max_w
                and lim.max_batch_min <= batch <= lim.max_batch_max):
            self._fail(f"commanded {a} outside the limits")
        b = rec.setpoint.power_budget_w
        if b is not None:
            fit, feasible = budget_cap_w(lim, b)
            if (feasible and cap * lim.num_gpus > b + 1e-6) or (not feasible and cap != fit):
                self._fail(f"commanded cap {cap} W x {lim.num_gpus} over the budget {b} W")
        wb, p = self._prev_budget, rec.measurement.power_w     # 3. closed-loop enforcement
        judged = g.fault == ""
        if judged:
            if wb is None:
                self._over = 0
            elif p > wb * (1 + self.tol) and self._before_budget is not None \
                    and wb < self._before_budget:
                pass        # the first window under a cut still settles: not counted
            elif p > wb * (1 + self.tol):
                self._over += 1
                floor = (prev is not None and prev.action.power_cap_w == lim.power_cap_min_w
                         and prev.action.max_batch == lim.max_batch_min)
                rose = b is not None and b > wb
                if self._over >= 2 and prev is not None and not floor and not rose and not (
                        cap < prev.action.power_cap_w or batch < prev.action.max_batch):
                    self._fail(f"measured {p:.0f} W over the budget {wb:g} W for "
                               f"{self._over} windows but {a} is not tighter than "
                               f"{prev.action}")
            else:
                self._over = 0
        elif prev is not None and cap > prev.action.power_cap_w:   # 4. bad data
            self._fail(f"cap raised from {prev.action.power_cap_w} to {cap} on bad data "
                       f"({g.fault})")
        over_band = wb is not None and p == p and p > wb * (1 + self.band)
        self._band_run = self._band_run + 1 if over_band else 0
        self.over_runs.append(self._band_run)
        self._before_budget, self._prev_budget = self._prev_budget, b
        return rec
