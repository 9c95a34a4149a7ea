"""The safety layer between any controller and a plant.

`SafetyGuard` is itself a `Controller` that wraps another one. Every action it returns

* lies within the plant's `Limits` (cap clamped and rounded *down* to the cap step, batch
  clamped to ``[max_batch_min, max_batch_max]``);
* keeps the sum of the GPUs' caps (``power_cap_w × num_gpus``) at or below the setpoint's power
  budget. When even the minimum cap on every GPU exceeds the budget it commands the minimum cap
  and says so in its note (nothing lower exists);
* changes the cap and the batch by at most ``max_cap_change_w`` / ``max_batch_change`` per step
  when those are set — except that *lowering* the cap to fit the budget is never rate-limited:
  the budget always wins;
* when the measurement is stale or invalid (NaN, negative, energy counter going backwards) or the
  wrapped controller raises or returns garbage, it holds a *safe action* instead: the cap that
  fits the budget, never higher than the last cap it commanded, and the last batch. The wrapped
  controller's exception is logged once (``logging``), then counted.

What the guard did in the last step is in ``last_note`` (empty when it changed nothing) and the
wrapped controller's raw output in ``last_requested``; the loop records both.

>>> from palsctl.types import Limits, Measurement, Setpoint
>>> from palsctl.controllers.baselines import StaticController
>>> g = SafetyGuard(StaticController())
>>> lim = Limits(power_cap_min_w=100, power_cap_max_w=400, power_cap_default_w=400,
...              power_cap_step_w=1, num_gpus=4)
>>> g.setup(limits=lim, dt_s=1.0, plant_info=None)
>>> m = Measurement(t_s=1, window_s=1, power_w=1000, energy_j=1000, throughput_tok_s=50)
>>> g.step(m, Setpoint(power_budget_w=900)).power_cap_w
225.0
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from typing import Annotated, Any, ClassVar

from pydantic import Field

from palsctl.interfaces import Controller, ControllerConfig
from palsctl.types import Action, Limits, Measurement, PlantInfo, Setpoint

log = logging.getLogger(__name__)

# A cumulative energy counter may jitter by rounding; a drop larger than this is a reset.
_ENERGY_DROP_TOLERANCE_J = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class GuardConfig(ControllerConfig):
    """Tunables of the safety guard (the ``[guard]`` table of an experiment).

    ``max_cap_change_w``: largest per-GPU cap change per control step, watts, > 0 (None:
    unbounded). Decreases needed to fit the budget are exempt.
    ``max_batch_change``: largest batch-limit change per step, >= 1 (None: unbounded).
    """

    section: ClassVar[str] = "guard"

    max_cap_change_w: Annotated[float, Field(gt=0)] | None = None
    max_batch_change: Annotated[int, Field(ge=1)] | None = None


def budget_cap_w(limits: Limits, power_budget_w: float | None) -> tuple[float, bool]:
    """Highest per-GPU cap on the cap grid whose sum over the GPUs fits ``power_budget_w``.

    Returns ``(cap_w, feasible)``; ``feasible`` is False when even the minimum cap on every GPU
    exceeds the budget (the minimum cap is returned then). No budget: the maximum cap.
    """
    if power_budget_w is None or not _finite(power_budget_w):
        return limits.power_cap_max_w, True
    per_gpu = limits.per_gpu_w(power_budget_w)
    if per_gpu < limits.power_cap_min_w:
        return limits.power_cap_min_w, False
    return limits.clamp_cap_w(per_gpu), True


def _finite(x: Any) -> bool:
    t = type(x)
    if t is float or t is int:  # fast path for the common case
        return math.isfinite(x)
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


class SafetyGuard(Controller):
    """A `Controller` that wraps a controller and makes its actions safe (see module doc)."""

    Config = GuardConfig
    name = "guard"

    def __init__(self, controller: Controller, config: GuardConfig | None = None, /,
                 **params: Any) -> None:
        super().__init__(config, **params)
        if not isinstance(controller, Controller):
            raise TypeError(f"SafetyGuard wraps a Controller, got {type(controller).__name__}")
        self.controller = controller
        self.last_note = ""
        self.last_requested = Action()
        self.faults = 0
        self._logged_exception = False
        self._last_cap_w: float | None = None
        self._last_batch: int | None = None
        self._last_energy_j: float | None = None
        self._fit_cache: tuple | None = None

    @property
    def expected_dt_s(self) -> float | None:
        return self.controller.expected_dt_s

    def setup(self, *, limits: Limits, dt_s: float, plant_info: PlantInfo) -> None:
        super().setup(limits=limits, dt_s=dt_s, plant_info=plant_info)
        self.controller.setup(limits=limits, dt_s=dt_s, plant_info=plant_info)

    def reset(self) -> None:
        self.last_note = ""
        self.last_requested = Action()
        self.faults = 0
        self._last_cap_w = None
        self._last_batch = None
        self._last_energy_j = None
        self._fit_cache = None

    def diagnostics(self) -> dict[str, Any]:
        return self.controller.diagnostics()

    # -- the step -----------------------------------------------------------------------------
    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action:
        if self.limits is None:
            raise RuntimeError("SafetyGuard.setup() must be called before step()")
        lim = self.limits
        notes: list[str] = []
        budget = setpoint.power_budget_w
        if self._fit_cache is not None and self._fit_cache[0] == budget:
            cap_fit_w, feasible = self._fit_cache[1]
        else:
            cap_fit_w, feasible = budget_cap_w(lim, budget)
            self._fit_cache = (budget, (cap_fit_w, feasible))
        if not feasible:
            notes.append(f"budget {setpoint.power_budget_w:g} W below {lim.num_gpus} x min cap "
                         f"{lim.power_cap_min_w:g} W: min cap")

        fault = self._measurement_fault(measurement)
        requested = Action()
        if fault is None:
            try:
                requested = self.controller.step(measurement, setpoint)
                if not isinstance(requested, Action):
                    fault = f"controller returned {type(requested).__name__}, not Action"
                    requested = Action()
            except Exception as exc:  # noqa: BLE001 - any controller failure must be contained
                fault = f"controller raised {type(exc).__name__}"
                self.faults += 1
                if not self._logged_exception:
                    self._logged_exception = True
                    log.warning("controller %s raised; holding a safe action (logged once)",
                                type(self.controller).__name__, exc_info=True)
        self.last_requested = requested

        if fault is not None:
            cap_w, batch = self._safe_action(cap_fit_w, measurement)
            notes.append(f"{fault}: hold safe cap {cap_w:g} W")
        else:
            cap_w, batch = self._guard_action(requested, cap_fit_w, measurement, notes)

        cap_w, batch = float(cap_w), int(batch)
        self._last_cap_w, self._last_batch = cap_w, batch
        self.last_note = "; ".join(notes)
        return Action(power_cap_w=cap_w, max_batch=batch)

    def _measurement_fault(self, m: Measurement) -> str | None:
        if not isinstance(m, Measurement):
            return "no measurement"
        if m.stale:
            return "stale measurement"
        if not m.is_valid():
            return "invalid measurement"
        last_e = self._last_energy_j
        self._last_energy_j = m.energy_j
        if last_e is not None and m.energy_j < last_e - _ENERGY_DROP_TOLERANCE_J:
            return "energy counter went backwards"
        return None

    def _in_force_cap_w(self, m: Measurement) -> float:
        if self._last_cap_w is not None:
            return self._last_cap_w
        c = getattr(m, "power_cap_w", None)
        if _finite(c) and c > 0:
            return self.limits.clamp_cap_w(c)
        return self.limits.power_cap_default_w

    def _in_force_batch(self, m: Measurement) -> int:
        if self._last_batch is not None:
            return self._last_batch
        b = getattr(m, "max_batch", None)
        if _finite(b):
            return self.limits.clamp_batch(int(b))
        return self.limits.max_batch_max

    def _safe_action(self, cap_fit_w: float, m: Measurement) -> tuple[float, int]:
        cap = min(cap_fit_w, self._in_force_cap_w(m))
        return self.limits.clamp_cap_w(cap), self._in_force_batch(m)

    def _guard_action(self, a: Action, cap_fit_w: float, m: Measurement,
                      notes: list[str]) -> tuple[float, int]:
        lim, cfg = self.limits, self.config
        prev_cap = self._in_force_cap_w(m)
        prev_batch = self._in_force_batch(m)

        # cap: None keeps the cap in force; garbage keeps it too (and says so)
        cap = a.power_cap_w
        if cap is None:
            cap = prev_cap
        elif not _finite(cap):
            notes.append(f"invalid cap {cap!r}: keep {prev_cap:g} W")
            cap = prev_cap
        else:
            cap = float(cap)
            if cap < lim.power_cap_min_w or cap > lim.power_cap_max_w:
                notes.append(f"cap {cap:g} W clamped to [{lim.power_cap_min_w:g}, "
                             f"{lim.power_cap_max_w:g}] W")
        if cfg.max_cap_change_w is not None and self._last_cap_w is not None:
            lo, hi = prev_cap - cfg.max_cap_change_w, prev_cap + cfg.max_cap_change_w
            if cap > hi or cap < lo:
                limited = min(max(cap, lo), hi)
                notes.append(f"cap change {cap - prev_cap:+g} W limited to {limited - prev_cap:+g} W")
                cap = limited
        cap = lim.clamp_cap_w(cap)
        if cap > cap_fit_w:  # the budget always wins, whatever the rate limit said
            notes.append(f"cap {cap:g} W lowered to {cap_fit_w:g} W to fit budget")
            cap = cap_fit_w

        # batch
        batch = a.max_batch
        if batch is None:
            batch = prev_batch
        elif isinstance(batch, bool) or not _finite(batch):
            notes.append(f"invalid batch {batch!r}: keep {prev_batch}")
            batch = prev_batch
        else:
            b = int(batch)
            clamped = lim.clamp_batch(b)
            if clamped != b or b != batch:
                notes.append(f"batch {batch!r} clamped to {clamped}")
            batch = clamped
        if cfg.max_batch_change is not None and self._last_batch is not None:
            lo_b, hi_b = prev_batch - cfg.max_batch_change, prev_batch + cfg.max_batch_change
            if batch > hi_b or batch < lo_b:
                limited_b = min(max(batch, lo_b), hi_b)
                notes.append(f"batch change {batch - prev_batch:+d} limited to "
                             f"{limited_b - prev_batch:+d}")
                batch = lim.clamp_batch(limited_b)
        return cap, int(batch)
