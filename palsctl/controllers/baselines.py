"""Baseline controllers, re-implemented so every method is compared on the same runs.

* `StaticController` (``static``): what vLLM users run today — the GPU's default power limit and
  a fixed ``max_num_seqs`` (256), whatever the load or the budget. It declares
  ``guarded = False``: experiments on the simulated plant run it without the `SafetyGuard`
  (see `palsctl.experiment.run_experiment`), so it shows what ignoring the budget costs.
* `CapToBudgetController` (``cap-to-budget``): facility power capping — every GPU capped at
  ``budget / num_gpus`` (the default limit when no budget is set), fixed batch.

Each class is self-contained (its Config, then the controller) so that more baselines can be
appended below.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from typing_extensions import override

from palsctl.errors import ConfigError
from palsctl.interfaces import Controller, ControllerConfig
from palsctl.types import Action, Measurement, Setpoint

__all__ = ["BatchOnlyConfig", "BatchOnlyController", "CapToBudgetConfig", "CapToBudgetController",
           "FixedConfig", "FixedController", "StaticConfig", "StaticController", "ZeusConfig",
           "ZeusController"]


def _check_batch(value: object, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError("must be an integer >= 1", key=key, value=value)


# -- static ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class StaticConfig(ControllerConfig):
    """``max_batch``: the fixed running-sequence limit (clamped to the plant's limits)."""

    max_batch: int = 256

    def __post_init__(self) -> None:
        _check_batch(self.max_batch, "controller.max_batch")


class StaticController(Controller):
    """Default power limit and a fixed batch limit; ignores measurements and setpoints.

    ``guarded = False``: a deployment without power management has no safety layer either, so
    `palsctl.experiment.run_experiment` runs it unguarded on the simulated plant (a power budget is
    then exceeded whenever the plant draws more than it). On a real plant the guard stays.

    Parameters
    ----------
    config : StaticConfig, optional
        The tunables (positional only).
    **params
        Or `StaticConfig`'s fields as keyword parameters (``max_batch``).
    """

    Config = StaticConfig
    config: StaticConfig
    name = "static"
    guarded = False

    @override
    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action:
        lim = self.limits
        if lim is None:
            return Action(max_batch=self.config.max_batch)
        return Action(power_cap_w=lim.power_cap_default_w,
                      max_batch=lim.clamp_batch(self.config.max_batch))

    @override
    def diagnostics(self) -> dict[str, Any]:
        return {}


# -- cap-to-budget ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class CapToBudgetConfig(ControllerConfig):
    """``max_batch``: the fixed running-sequence limit. The cap follows the budget (or, in
    power-target mode with no budget, the power target) less ``budget_margin`` (a fraction;
    0 by default: facility capping puts the caps at the budget itself)."""

    max_batch: int = 256
    budget_margin: float = 0.0

    def __post_init__(self) -> None:
        _check_batch(self.max_batch, "controller.max_batch")
        m = self.budget_margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 0.5:
            raise ConfigError("must be a number in [0, 0.5]", key="controller.budget_margin",
                              value=m)


class CapToBudgetController(Controller):
    """Per-GPU cap = power budget / number of GPUs (rounded down to the cap step), fixed batch.

    Parameters
    ----------
    config : CapToBudgetConfig, optional
        The tunables (positional only).
    **params
        Or `CapToBudgetConfig`'s fields as keyword parameters (``max_batch``,
        ``budget_margin``).
    """

    Config = CapToBudgetConfig
    config: CapToBudgetConfig
    name = "cap-to-budget"

    def __init__(self, config: CapToBudgetConfig | None = None, /, **params: Any) -> None:
        super().__init__(config, **params)
        self._cap_w: float | None = None

    @override
    def reset(self) -> None:
        self._cap_w = None

    @override
    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action:
        lim = self.limits
        if lim is None:
            return Action(max_batch=self.config.max_batch)
        total_w = setpoint.power_budget_w
        if total_w is None:
            total_w = setpoint.power_target_w
        if total_w is None:
            cap_w = lim.power_cap_default_w
        else:
            cap_w = lim.clamp_cap_w(lim.per_gpu_w(total_w * (1.0 - self.config.budget_margin)))
        self._cap_w = cap_w
        return Action(power_cap_w=cap_w, max_batch=lim.clamp_batch(self.config.max_batch))

    @override
    def diagnostics(self) -> dict[str, Any]:
        return {"cap_w": self._cap_w}


# -- zeus ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class ZeusConfig(ControllerConfig):
    """Zeus's GlobalPowerLimitOptimizer (NSDI'23), re-implemented from its description.

    ``eta``: energy/time trade-off η in the cost η·E + (1 − η)·MaxPower·T (0.5 by default);
    ``power_limit_step_w``: profiling step from the maximum limit downwards (25 W);
    ``warmup_s`` / ``profile_s``: settling time discarded and measuring time per limit;
    ``max_batch``: the fixed batch (Zeus does not touch it; vLLM's default 256)."""

    eta: float = 0.5
    power_limit_step_w: float = 25.0
    warmup_s: float = 2.0
    profile_s: float = 8.0
    max_batch: int = 256

    def __post_init__(self) -> None:
        import math as _math

        for key, lo in (("eta", 0.0), ("power_limit_step_w", 0.0), ("warmup_s", 0.0),
                        ("profile_s", 0.0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _math.isfinite(v) \
                    or v < lo or (key in ("power_limit_step_w", "profile_s") and v <= 0):
                raise ConfigError("must be a finite number >= 0 (> 0 for steps and windows)",
                                  key=f"controller.{key}", value=v)
        if self.eta > 1:
            raise ConfigError("must be in [0, 1]", key="controller.eta", value=self.eta)
        _check_batch(self.max_batch, "controller.max_batch")


class ZeusController(Controller):
    """Profile every power limit from the maximum down in ``power_limit_step_w`` steps (each for
    ``warmup_s`` + ``profile_s``), measuring energy and time per generated token, then hold the
    limit minimising η·E_tok + (1 − η)·MaxPower·T_tok (MaxPower = maximum limit × GPUs). The
    batch stays fixed. A power budget only clamps the limit (the guard would anyway).

    Parameters
    ----------
    config : ZeusConfig, optional
        The tunables (positional only).
    **params
        Or `ZeusConfig`'s fields as keyword parameters (``eta``, ``power_limit_step_w``, ...).
    """

    Config = ZeusConfig
    config: ZeusConfig
    name = "zeus"

    def __init__(self, config: ZeusConfig | None = None, /, **params: Any) -> None:
        super().__init__(config, **params)
        self.reset()

    @override
    def reset(self) -> None:
        self._limits_w: list[float] = []
        self._i = 0
        self._t_in_limit_s = 0.0
        self._energy_j = 0.0
        self._tokens = 0.0
        self._time_s = 0.0
        self._costs: dict[float, float] = {}
        self._chosen_w: float | None = None
        if self.limits is not None:
            lim, step = self.limits, self.config.power_limit_step_w
            c = lim.power_cap_max_w
            while c >= lim.power_cap_min_w - 1e-9:
                self._limits_w.append(lim.clamp_cap_w(c))
                c -= step
            if not self._limits_w:
                self._limits_w = [lim.power_cap_max_w]

    def _cost(self) -> float:
        if self._tokens <= 0:
            return float("inf")
        lim = self.bound_limits
        e_tok = self._energy_j / self._tokens
        t_tok = self._time_s / self._tokens
        eta = self.config.eta
        return float(eta * e_tok + (1 - eta) * lim.power_cap_max_w * lim.num_gpus * t_tok)

    @override
    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action:
        lim, cfg, m = self.limits, self.config, measurement
        if lim is None:
            return Action(max_batch=cfg.max_batch)
        dt = float(self.dt_s or m.window_s or 1.0)
        if self._chosen_w is None:
            self._t_in_limit_s += dt
            if self._t_in_limit_s > cfg.warmup_s + 1e-9 and not m.stale:
                self._energy_j += m.power_w * m.window_s
                self._tokens += m.throughput_tok_s * m.window_s
                self._time_s += m.window_s
            if self._t_in_limit_s >= cfg.warmup_s + cfg.profile_s - 1e-9:
                self._costs[self._limits_w[self._i]] = self._cost()
                self._i += 1
                self._t_in_limit_s = self._energy_j = self._tokens = self._time_s = 0.0
                if self._i >= len(self._limits_w):
                    self._chosen_w = min(self._costs, key=lambda c: (self._costs[c], -c))
        cap = self._chosen_w if self._chosen_w is not None else self._limits_w[self._i]
        total = setpoint.power_budget_w
        if total is not None:
            cap = min(cap, lim.per_gpu_w(total))
        return Action(power_cap_w=lim.clamp_cap_w(cap), max_batch=lim.clamp_batch(cfg.max_batch))

    @override
    def diagnostics(self) -> dict[str, Any]:
        phase = "optimal" if self._chosen_w is not None else "profiling"
        d: dict[str, Any] = {"phase": phase, "chosen_w": self._chosen_w,
                             "profiled_limits": len(self._costs)}
        if self._chosen_w is not None and self._costs.get(self._chosen_w) is not None:
            d["cost"] = self._costs[self._chosen_w]
        return d


# -- batch-only ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchOnlyConfig(ControllerConfig):
    """Batch feedback at full power (the cap stays at the maximum limit, or budget / GPUs).

    Velocity-form PI on the capacity margin ``e = r·(1 + margin) − ŷ`` (tok/s; ŷ the capacity
    estimate of `palsctl.controllers.common.capacity_estimate`, r the target or the measured
    demand): the smallest batch that keeps the margin. ``kp_batch_per_tok_s`` (sequences per
    tok/s), ``ki_batch_per_tok`` (sequences per token); a p90 TPOT over the objective shrinks the
    batch. Without a target or demand the batch stays at ``max_batch``."""

    kp_batch_per_tok_s: float = 0.01
    ki_batch_per_tok: float = 0.01
    margin: float = 0.10
    max_batch: int = 256

    def __post_init__(self) -> None:
        import math as _math

        for key in ("kp_batch_per_tok_s", "ki_batch_per_tok", "margin"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _math.isfinite(v) \
                    or v < 0:
                raise ConfigError("must be a finite number >= 0", key=f"controller.{key}",
                                  value=v)
        _check_batch(self.max_batch, "controller.max_batch")


class BatchOnlyController(Controller):
    """Batch-size feedback at full cap (see `BatchOnlyConfig`).

    Parameters
    ----------
    config : BatchOnlyConfig, optional
        The tunables (positional only).
    **params
        Or `BatchOnlyConfig`'s fields as keyword parameters (``margin``, ``max_batch``, ...).
    """

    Config = BatchOnlyConfig
    config: BatchOnlyConfig
    name = "batch-only"

    def __init__(self, config: BatchOnlyConfig | None = None, /, **params: Any) -> None:
        super().__init__(config, **params)
        self.reset()

    @override
    def reset(self) -> None:
        self._batch: float | None = None
        self._e_prev: float | None = None
        self._diag: dict[str, Any] = {}

    @override
    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action:
        from palsctl.controllers.common import capacity_estimate

        lim, cfg, m = self.limits, self.config, measurement
        if lim is None:
            return Action(max_batch=cfg.max_batch)
        dt = float(self.dt_s or m.window_s or 1.0)
        hi = float(lim.clamp_batch(cfg.max_batch))
        b_now = float(m.max_batch) if m.max_batch is not None else (
            self._batch if self._batch is not None else hi)
        if self._batch is None or abs(round(self._batch) - b_now) >= 1:
            self._batch = b_now  # bumpless: continue from what is in force
        r = setpoint.throughput_tok_s if setpoint.throughput_tok_s is not None else m.demand_tok_s
        e = None
        if r is not None and not m.stale:
            e = r * (1 + cfg.margin) - capacity_estimate(m, b_now)
            slo, tpot = setpoint.tpot_slo_s, m.tpot_p90_s
            if slo and tpot is not None and tpot > slo:
                e = min(e, -r * (tpot - slo) / slo)
            prev = e if self._e_prev is None else self._e_prev
            self._batch += cfg.kp_batch_per_tok_s * (e - prev) + cfg.ki_batch_per_tok * dt * e
            self._batch = min(max(self._batch, float(lim.max_batch_min)), hi)
        self._e_prev = e
        cap = lim.power_cap_max_w
        if setpoint.power_budget_w is not None:
            cap = min(cap, lim.per_gpu_w(setpoint.power_budget_w))
        self._diag = {"e_tok_s": e, "batch_continuous": self._batch}
        return Action(power_cap_w=lim.clamp_cap_w(cap),
                      max_batch=lim.clamp_batch(round(self._batch)))

    @override
    def diagnostics(self) -> dict[str, Any]:
        return dict(self._diag)


# -- fixed -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedConfig(ControllerConfig):
    """``power_cap_w``: the per-GPU cap held (None: the plant's default limit);
    ``max_batch``: the batch limit held. A budget lowers the cap (the guard would anyway)."""

    power_cap_w: float | None = None
    max_batch: int = 256

    def __post_init__(self) -> None:
        import math as _math

        v = self.power_cap_w
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not _math.isfinite(v) or v <= 0):
            raise ConfigError("must be a positive number of watts", key="controller.power_cap_w",
                              value=v)
        _check_batch(self.max_batch, "controller.max_batch")


class FixedController(Controller):
    """One fixed configuration (cap, batch limit), the cap lowered to budget / GPUs when a budget
    is set: the candidates `hindsight` and the Pareto sweep of ``palsctl compare`` simulate.

    Parameters
    ----------
    config : FixedConfig, optional
        The tunables (positional only).
    **params
        Or `FixedConfig`'s fields as keyword parameters (``power_cap_w``, ``max_batch``).
    """

    Config = FixedConfig
    config: FixedConfig
    name = "fixed"

    @override
    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action:
        lim, cfg = self.limits, self.config
        if lim is None:
            return Action(power_cap_w=cfg.power_cap_w, max_batch=cfg.max_batch)
        cap = lim.power_cap_default_w if cfg.power_cap_w is None else cfg.power_cap_w
        if setpoint.power_budget_w is not None:
            cap = min(cap, lim.per_gpu_w(setpoint.power_budget_w))
        return Action(power_cap_w=lim.clamp_cap_w(cap), max_batch=lim.clamp_batch(cfg.max_batch))
