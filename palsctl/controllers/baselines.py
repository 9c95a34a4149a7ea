"""Baseline controllers, re-implemented so every method is compared on the same runs.

* `StaticController` (``static``): what vLLM users run today — the GPU's default power limit and
  a fixed ``max_num_seqs`` (256), whatever the load or the budget.
* `CapToBudgetController` (``cap-to-budget``): facility power capping — every GPU capped at
  ``budget / num_gpus`` (the default limit when no budget is set), fixed batch.

Each class is self-contained (its Config, then the controller) so that more baselines can be
appended below.
"""
from __future__ import annotations

import dataclasses

from palsctl.errors import ConfigError
from palsctl.interfaces import Controller, ControllerConfig
from palsctl.types import Action, Measurement, Setpoint


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
    """Default power limit and a fixed batch limit; ignores measurements and setpoints."""

    Config = StaticConfig
    name = "static"

    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action:
        lim = self.limits
        if lim is None:
            return Action(max_batch=self.config.max_batch)
        return Action(power_cap_w=lim.power_cap_default_w,
                      max_batch=lim.clamp_batch(self.config.max_batch))

    def diagnostics(self) -> dict:
        return {}


# -- cap-to-budget ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class CapToBudgetConfig(ControllerConfig):
    """``max_batch``: the fixed running-sequence limit. The cap follows the budget (or, in
    power-target mode with no budget, the power target)."""

    max_batch: int = 256

    def __post_init__(self) -> None:
        _check_batch(self.max_batch, "controller.max_batch")


class CapToBudgetController(Controller):
    """Per-GPU cap = power budget / number of GPUs (rounded down to the cap step), fixed batch."""

    Config = CapToBudgetConfig
    name = "cap-to-budget"

    def __init__(self, config: CapToBudgetConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self._cap_w: float | None = None

    def reset(self) -> None:
        self._cap_w = None

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
            cap_w = lim.clamp_cap_w(total_w / lim.num_gpus)
        self._cap_w = cap_w
        return Action(power_cap_w=cap_w, max_batch=lim.clamp_batch(self.config.max_batch))

    def diagnostics(self) -> dict:
        return {"cap_w": self._cap_w}
