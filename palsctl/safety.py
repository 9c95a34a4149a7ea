"""The safety layer between any controller and a plant.

`SafetyGuard` wraps a controller. Every action it commands

* lies within the plant's `Limits` (cap clamped and rounded *down* to the cap step, batch
  clamped to ``[max_batch_min, max_batch_max]``);
* keeps the sum of the GPUs' caps (``power_cap_w × num_gpus``) at or below the setpoint's power
  budget. When even the minimum cap on every GPU exceeds the budget it commands the minimum cap
  and says so in its note (nothing lower exists);
* changes the cap and the batch by at most ``max_cap_change_w`` / ``max_batch_change`` per step
  when those are set — except that *lowering* the cap to fit the budget is never rate-limited:
  the budget always wins;
* when the measurement is stale or invalid (flagged stale, NaN, negative, energy counter going
  backwards, time not advancing, energy counter standing still while power is drawn) or the
  wrapped controller raises or returns garbage, it holds a *safe action* instead: the cap that
  fits the budget, never higher than the last cap it commanded, and the last batch. The wrapped
  controller's exception is logged once (``logging``), then counted.

**Closed-loop budget enforcement.** A cap that fits the budget on paper does not guarantee the
power: an actuator may ignore or misreport a write, firmware may hold a cap loosely. So the guard
also compares the **measured** power of each window with the budget that was in force during it.
When it is over the budget by more than ``power_tolerance_frac`` (room for sensor noise and
firmware settling) for ``power_persist_steps`` consecutive windows (the first window under a
lower budget does not count: its caps were cut at its start and still settle), the devices draw
more than the caps commanded allow (those fitted the budget): they do not hold the cap as
commanded, by a factor nothing tells. The guard then falls to the safe cap: a cap ceiling at the
minimum cap (kept as a fraction of the cap that fits the budget, so it follows later budget
changes); when the cap was at the minimum already, or the cap read back from the devices shows
it is not obeyed at all, it also halves a batch ceiling (from what is running). It tightens
again on every further window over the band.
While measured power is under the budget the ceilings relax: the cap ceiling vanishes as soon
as a window shows the devices holding the cap commanded (the excess was transient); while they
draw more than commanded it moves halfway per step to where the window's power-to-budget ratio
puts the budget (less half the tolerance), and down to there at once from a window over the
budget but inside the band. The batch ceiling grows by a quarter per step; both vanish once
they no longer bind. Plants
marked ``dry_run`` in their `PlantInfo` (nothing is written, so power cannot respond) are not
enforced.

`SafetyGuard.step` returns a frozen `GuardStep`: the controller's raw output (``requested``), the
action the guard commands (``action``), a ``note`` saying what it changed (empty: nothing) and the
``fault`` that made it hold a safe action (empty: none). `PassThrough` has the same interface for
an unguarded run, so the loop treats both alike.

>>> from palsctl.types import Limits, Measurement, Setpoint
>>> from palsctl.controllers.baselines import StaticController
>>> g = SafetyGuard(StaticController())
>>> lim = Limits(power_cap_min_w=100, power_cap_max_w=400, power_cap_default_w=400,
...              power_cap_step_w=1, num_gpus=4)
>>> g.setup(limits=lim, dt_s=1.0, plant_info=None)
>>> m = Measurement(t_s=1, window_s=1, power_w=1000, energy_j=1000, throughput_tok_s=50)
>>> g.step(m, Setpoint(power_budget_w=900)).action.power_cap_w
225.0
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from abc import ABC, abstractmethod
from typing import Annotated, Any, ClassVar, TypeGuard

from pydantic import Field
from typing_extensions import override

from palsctl.interfaces import Controller, ControllerConfig
from palsctl.types import Action, Limits, Measurement, PlantInfo, Setpoint

__all__ = ["GuardConfig", "GuardStep", "Guard", "SafetyGuard", "PassThrough", "budget_cap_w"]

log = logging.getLogger(__name__)

# A cumulative energy counter may jitter by rounding; a drop larger than this is a reset.
_ENERGY_DROP_TOLERANCE_J = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class GuardConfig(ControllerConfig):
    """Tunables of the safety guard (the ``[guard]`` table of an experiment).

    Parameters
    ----------
    max_cap_change_w : float or None
        Largest per-GPU cap change per control step, W, > 0 (None: unbounded). Decreases
        needed to fit the budget are exempt.
    max_batch_change : int or None
        Largest batch-limit change per step, >= 1 (None: unbounded).
    enforce_measured_power : bool, default True
        Compare measured power with the budget and tighten when it is over (closed-loop budget
        enforcement, see the module doc).
    power_tolerance_frac : float, default 0.03
        Measured power counts as over the budget above ``budget × (1 + power_tolerance_frac)``
        (room for sensor noise and firmware settling), a fraction in [0, 1).
    power_persist_steps : int, default 2
        Consecutive windows over that band before the guard tightens, >= 1.
    """

    section: ClassVar[str] = "guard"

    max_cap_change_w: Annotated[float, Field(gt=0)] | None = None
    max_batch_change: Annotated[int, Field(ge=1)] | None = None
    enforce_measured_power: bool = True
    power_tolerance_frac: Annotated[float, Field(ge=0, lt=1)] = 0.03
    power_persist_steps: Annotated[int, Field(ge=1)] = 2


def budget_cap_w(limits: Limits, power_budget_w: float | None) -> tuple[float, bool]:
    """Find the highest per-GPU cap on the cap grid whose sum over the GPUs fits a budget.

    Parameters
    ----------
    limits : Limits
        The plant's bounds.
    power_budget_w : float or None
        Budget for all GPUs together, W (None: no budget, the maximum cap).

    Returns
    -------
    cap_w : float
        The cap per GPU, W (the minimum cap when even it does not fit).
    feasible : bool
        False when even the minimum cap on every GPU exceeds the budget.
    """
    if power_budget_w is None or not _finite(power_budget_w):
        return limits.power_cap_max_w, True
    per_gpu = limits.per_gpu_w(power_budget_w)
    if per_gpu < limits.power_cap_min_w:
        return limits.power_cap_min_w, False
    return limits.clamp_cap_w(per_gpu), True


def _finite(x: Any) -> TypeGuard[float]:
    t = type(x)
    if t is float or t is int:  # fast path for the common case
        return math.isfinite(x)
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GuardStep:
    """What a guard decided in one step.

    ``requested``: the wrapped controller's raw output (an empty `Action` when it was not asked
    or failed); ``action``: what the guard commands (both knobs set by `SafetyGuard`);
    ``note``: what the guard changed and why (empty: nothing); ``fault``: why it held a safe
    action instead of the controller's (empty: no fault).
    """

    requested: Action
    action: Action
    note: str = ""
    fault: str = ""


class Guard(ABC):
    """What the loop steps: a controller behind a guard. ``step(measurement, setpoint)`` returns
    a `GuardStep`; ``setup``/``reset``/``diagnostics`` reach the wrapped ``controller``;
    ``faults`` counts the steps the controller failed."""

    name: ClassVar[str] = "guard"
    #: times the guard tightened its ceilings on measured power (none for a pass-through)
    tightenings: int = 0

    def __init__(self, controller: Controller) -> None:
        if not isinstance(controller, Controller):
            raise TypeError(f"{type(self).__name__} wraps a Controller, "
                            f"got {type(controller).__name__}")
        self.controller = controller
        self.limits: Limits | None = None
        self.dt_s: float | None = None
        self.plant_info: PlantInfo | None = None
        self.faults = 0

    @property
    def expected_dt_s(self) -> float | None:
        """The control period the wrapped controller was tuned for, s (None: any)."""
        return self.controller.expected_dt_s

    @property
    def bound_limits(self) -> Limits:
        """The plant's `Limits` bound by `setup` (the wrapped controller's; `RuntimeError`
        before it)."""
        return self.controller.bound_limits

    def setup(self, *, limits: Limits, dt_s: float, plant_info: PlantInfo | None) -> None:
        """Bind the guard and the wrapped controller to a plant; resets both."""
        self.limits, self.dt_s, self.plant_info = limits, dt_s, plant_info
        self.reset()
        self.controller.setup(limits=limits, dt_s=dt_s, plant_info=plant_info)

    def reset(self) -> None:
        """Forget the guard's own state (not the controller's)."""
        self.faults = 0

    def diagnostics(self) -> dict[str, Any]:
        """The wrapped controller's diagnostics of its last step."""
        return self.controller.diagnostics()

    @abstractmethod
    def step(self, measurement: Measurement, setpoint: Setpoint) -> GuardStep:
        """Ask the controller and decide what goes to the plant.

        Parameters
        ----------
        measurement : Measurement
            What the plant measured over the last window.
        setpoint : Setpoint
            What the operator asks for now.

        Returns
        -------
        GuardStep
            The controller's request, the action commanded, the guard's note and fault.
        """


class PassThrough(Guard):
    """No guard: the controller's action goes to the plant as it is (experiments only)."""

    name = "none"

    @override
    def step(self, measurement: Measurement, setpoint: Setpoint) -> GuardStep:
        a = self.controller.step(measurement, setpoint)
        return GuardStep(requested=a, action=a)


class SafetyGuard(Guard):
    """Wraps a controller and makes its actions safe (see the module doc).

    Parameters
    ----------
    controller : Controller
        The controller to guard.
    config : GuardConfig, optional
        The guard's tunables (positional only).
    **params
        Or `GuardConfig`'s fields as keyword parameters.
    """

    Config = GuardConfig
    name = "guard"

    def __init__(self, controller: Controller, config: GuardConfig | None = None, /,
                 **params: Any) -> None:
        super().__init__(controller)
        if config is not None and params:
            raise TypeError("pass either a GuardConfig or keyword parameters, not both")
        if config is None:
            config = GuardConfig.from_dict(params, section="guard")
        elif not isinstance(config, GuardConfig):
            raise TypeError(f"SafetyGuard needs a GuardConfig, got {type(config).__name__}")
        self.config = config
        self._logged_exception = False
        self.reset()

    @override
    def setup(self, *, limits: Limits, dt_s: float, plant_info: PlantInfo | None) -> None:
        super().setup(limits=limits, dt_s=dt_s, plant_info=plant_info)
        extra = getattr(plant_info, "extra", None) or {}
        self._enforce = self.config.enforce_measured_power and not extra.get("dry_run")

    @override
    def reset(self) -> None:
        super().reset()
        self._last_cap_w: float | None = None
        self._last_batch: int | None = None
        self._last_energy_j: float | None = None
        self._last_t_s: float | None = None
        self._fit_cache: tuple | None = None
        self._window_budget_w: float | None = None   # budget in force during the next window
        self._before_w: float | None = None          # ... during the window before it
        self._over_steps = 0
        self._ceiling_frac: float | None = None       # cap ceiling / cap fitting the budget
        self._batch_ceiling: int | None = None        # batch ceiling from measured power
        self._enforce = self.config.enforce_measured_power
        self.tightenings = 0

    # -- the step -----------------------------------------------------------------------------
    @override
    def step(self, measurement: Measurement, setpoint: Setpoint) -> GuardStep:
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
        if fault is None and self._enforce:
            self._enforce_measured(measurement, notes)
        self._before_w, self._window_budget_w = self._window_budget_w, budget
        if self._ceiling_frac is not None:   # measured power said so: never rate-limited
            cap_fit_w = min(cap_fit_w, lim.clamp_cap_w(cap_fit_w * self._ceiling_frac))
        requested = Action()
        if fault is None:
            try:
                requested = self.controller.step(measurement, setpoint)
                if not isinstance(requested, Action):
                    fault = f"controller returned {type(requested).__name__}, not Action"
                    requested = Action()
            except Exception as exc:  # any controller failure must be contained
                fault = f"controller raised {type(exc).__name__}"
                self.faults += 1
                if not self._logged_exception:
                    self._logged_exception = True
                    log.warning("controller %s raised; holding a safe action (logged once)",
                                type(self.controller).__name__, exc_info=True)

        if fault is not None:
            cap_w, batch = self._safe_action(cap_fit_w, measurement)
            notes.append(f"{fault}: hold safe cap {cap_w:g} W")
        else:
            cap_w, batch = self._guard_action(requested, cap_fit_w, measurement, notes)

        cap_w, batch = float(cap_w), int(batch)
        self._last_cap_w, self._last_batch = cap_w, batch
        return GuardStep(requested=requested, action=Action(power_cap_w=cap_w, max_batch=batch),
                         note="; ".join(notes), fault=fault or "")

    def _measurement_fault(self, m: Measurement) -> str | None:
        if not isinstance(m, Measurement):
            return "no measurement"
        if m.stale:
            return "stale measurement"
        if not m.is_valid():
            return "invalid measurement"
        last_e, last_t = self._last_energy_j, self._last_t_s
        self._last_energy_j, self._last_t_s = m.energy_j, m.t_s
        if last_e is not None and m.energy_j < last_e - _ENERGY_DROP_TOLERANCE_J:
            return "energy counter went backwards"
        if last_t is not None and m.t_s <= last_t:
            return "stale measurement (time not advancing)"
        if last_e is not None and m.energy_j == last_e and m.power_w > 0 and m.window_s > 0:
            return "stale measurement (energy counter not advancing)"
        return None

    def _enforce_measured(self, m: Measurement, notes: list[str]) -> None:
        """Compare the window's measured power with the budget in force during it; tighten or
        relax the ceilings (module doc). The cap ceiling is kept as a fraction of the cap that
        fits the budget, so it follows the budget when the budget moves."""
        b = self._window_budget_w
        if b is None or not (0 < b < math.inf):     # (NaN fails both)
            self._over_steps = 0
            self._ceiling_frac = self._batch_ceiling = None
            return
        p = m.power_w
        lim, cfg = self.bound_limits, self.config
        if p <= b * (1.0 + cfg.power_tolerance_frac):
            self._over_steps = 0
            if self._ceiling_frac is None and self._batch_ceiling is None:
                return                               # the common case: nothing to relax
            if p < b:
                self._relax(b, p)
            elif self._ceiling_frac is not None:   # a device found loose, inside the band:
                self._ceiling_frac *= b / p * (1.0 - cfg.power_tolerance_frac / 2)  # trim
            return
        if self._before_w is not None and b < self._before_w:
            # the first window under a lower budget: its caps were cut at its start, and the
            # firmware's settling and the engine step in flight at the cut still draw the old
            # power for part of it; no evidence of devices that ignore their caps
            return
        self._over_steps += 1
        if self._over_steps < cfg.power_persist_steps:
            return
        self.tightenings += 1
        # The devices draw more than the caps commanded allow (the budget fitted them): they
        # do not hold the cap as commanded, by a factor nothing tells. Fall to the safe cap,
        # the minimum; `_relax` then raises the ceiling by what the next window measures.
        fit_w = budget_cap_w(lim, b)[0]
        last_cap = self._last_cap_w if self._last_cap_w is not None else self._in_force_cap_w(m)
        self._ceiling_frac = lim.power_cap_min_w / fit_w
        in_force = m.power_cap_w
        obeyed = in_force is None or in_force <= last_cap + max(lim.power_cap_step_w, 1.0)
        what = (f"measured power {p:.0f} W over budget {b:g} W for {self._over_steps} "
                f"steps: cap ceiling {lim.power_cap_min_w:g} W")
        if last_cap <= lim.power_cap_min_w or not obeyed:
            # the cap is at its floor already, or not obeyed at all: the batch is the lever
            last_b = self._last_batch if self._last_batch is not None else self._in_force_batch(m)
            running = m.running if m.running > 0 else last_b
            cut = max(lim.max_batch_min, min(last_b, running) // 2)
            self._batch_ceiling = cut if self._batch_ceiling is None \
                else max(lim.max_batch_min, min(self._batch_ceiling, cut))
            why = "" if obeyed else f", cap not obeyed ({in_force:g} W in force)"
            what += f"{why}; batch ceiling {self._batch_ceiling}"
        notes.append(what)

    def _relax(self, budget_w: float, power_w: float) -> None:
        tol, lim = self.config.power_tolerance_frac, self.bound_limits
        if self._ceiling_frac is not None:
            cap = self._last_cap_w
            if cap is not None and power_w <= cap * lim.num_gpus * (1.0 + tol):
                self._ceiling_frac = None       # the devices hold the cap commanded again
            else:
                # they draw more than commanded: go halfway to where this window's power-to-
                # budget ratio puts the budget (less half the tolerance), never overshooting
                # when power scales with the cap held
                est = self._ceiling_frac * budget_w / max(power_w, 1e-9) * (1.0 - tol / 2)
                if est > self._ceiling_frac:
                    f = self._ceiling_frac + 0.5 * (est - self._ceiling_frac)
                    self._ceiling_frac = None if f >= 1.0 - tol else f
        if self._batch_ceiling is not None and power_w < budget_w * (1.0 - tol):
            nb = self._batch_ceiling + max(1, self._batch_ceiling // 4)
            self._batch_ceiling = None if nb >= self.bound_limits.max_batch_max else nb

    def _in_force_cap_w(self, m: Measurement) -> float:
        if self._last_cap_w is not None:
            return self._last_cap_w
        c = getattr(m, "power_cap_w", None)
        if _finite(c) and c > 0:
            return self.bound_limits.clamp_cap_w(c)
        return self.bound_limits.power_cap_default_w

    def _in_force_batch(self, m: Measurement) -> int:
        if self._last_batch is not None:
            return self._last_batch
        b = getattr(m, "max_batch", None)
        if _finite(b):
            return self.bound_limits.clamp_batch(int(b))
        return self.bound_limits.max_batch_max

    def _safe_action(self, cap_fit_w: float, m: Measurement) -> tuple[float, int]:
        cap = min(cap_fit_w, self._in_force_cap_w(m))
        batch = self._in_force_batch(m)
        if self._batch_ceiling is not None:
            batch = min(batch, self._batch_ceiling)
        return self.bound_limits.clamp_cap_w(cap), batch

    def _guard_action(self, a: Action, cap_fit_w: float, m: Measurement,
                      notes: list[str]) -> tuple[float, int]:
        lim, cfg = self.bound_limits, self.config
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
                notes.append(f"cap change {cap - prev_cap:+g} W limited to "
                             f"{limited - prev_cap:+g} W")
                cap = limited
        cap = lim.clamp_cap_w(cap)
        if cap > cap_fit_w:  # the budget always wins, whatever the rate limit said
            why = "to fit budget" if self._ceiling_frac is None else \
                "to fit budget and measured power"
            notes.append(f"cap {cap:g} W lowered to {cap_fit_w:g} W {why}")
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
        bc = self._batch_ceiling
        if bc is not None and batch > bc:
            notes.append(f"batch {batch} lowered to {bc}: measured power over budget")
            batch = bc
        return cap, int(batch)
