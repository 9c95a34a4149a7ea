"""`oracle` — the best configuration per control window with perfect knowledge of the plant.

Simulated plants only (``plant_info.simulated`` must be True): at setup the ground-truth
saturated steady state of the simulator (`palsctl.plants.sim.steady_state`) is evaluated for
every (cap, batch) candidate (memoised per plant and workload). Each window it takes the
candidate with the highest true operating tokens/J (see `palsctl.controllers.common.rank`) whose
true throughput meets the window's requirement
(target, or the measured demand without one, × (1 + ``margin``), plus the queue-drain rate —
the same requirement `search` uses), whose power and cap fit the budget and whose p90 ITL meets
the TPOT objective; when nothing fits it degrades in the same order as `search`. No hysteresis,
no dwell: it is the limit the other controllers are measured against, not a deployable method.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from palsctl.controllers import common
from palsctl.controllers.model_source import DEFAULT_OUTPUT_TOKENS, DEFAULT_PROMPT_TOKENS
from palsctl.errors import ConfigError
from palsctl.interfaces import Controller, ControllerConfig
from palsctl.types import Action, Limits, Measurement, PlantInfo, Setpoint


@dataclasses.dataclass(frozen=True, kw_only=True)
class OracleConfig(ControllerConfig):
    """``margin``: throughput headroom over the target (the same default as `search`);
    ``cap_step_w``: grid spacing of per-GPU caps; ``drain_s``: queue-drain time;
    ``max_batch``: largest batch considered (None: the plant's launch limit)."""

    margin: float = 0.15
    cap_step_w: float = 10.0
    drain_s: float = 30.0
    max_batch: int | None = None

    def __post_init__(self) -> None:
        common.check_number(self.margin, "margin", lo=0, hi=2)
        common.check_number(self.cap_step_w, "cap_step_w", lo=0, lo_open=True)
        common.check_number(self.drain_s, "drain_s", lo=0)
        common.check_int(self.max_batch, "max_batch", allow_none=True)


@functools.lru_cache(maxsize=8)
def _truth(model: str, gpu: str, num_gpus: int, caps: tuple[float, ...],
           batches: tuple[float, ...], prompt: float, output: float) -> tuple[np.ndarray, ...]:
    from palsctl.plants.sim import steady_state

    n = len(caps) * len(batches)
    thr, pw, itl = np.empty(n), np.empty(n), np.empty(n)
    i = 0
    for c in caps:
        for b in batches:
            s = steady_state(model, gpu, num_gpus, int(b), power_cap_w=c,
                             prompt_tokens=prompt, output_tokens=output)
            thr[i], pw[i] = s.throughput_tok_s, s.power_w
            itl[i] = getattr(s, "itl_p90_s", np.nan)
            i += 1
    return thr, pw, itl


def truth_grid(plant_info: PlantInfo, limits: Limits, *, cap_step_w: float = 10.0,
               max_batch: int | None = None) -> common.Grid:
    """The simulator's ground truth over the candidate grid (same layout as `model_grid`)."""
    caps = common.cap_values(limits, cap_step_w)
    hi = limits.max_batch_max if max_batch is None else min(max_batch, limits.max_batch_max)
    batches = common.batch_values(limits.max_batch_min, max(hi, limits.max_batch_min))
    prompt = plant_info.prompt_tokens_mean or DEFAULT_PROMPT_TOKENS
    output = plant_info.output_tokens_mean or DEFAULT_OUTPUT_TOKENS
    thr, pw, itl = _truth(plant_info.model, plant_info.gpu, int(plant_info.num_gpus),
                          tuple(float(c) for c in caps), tuple(float(b) for b in batches),
                          float(round(prompt)), float(round(output)))
    cc, bb = np.meshgrid(caps, batches, indexing="ij")
    return common.Grid(cap_w=cc.ravel(), batch=bb.ravel(), throughput_tok_s=thr, power_w=pw,
                       itl_p90_s=itl, shape=(caps.size, batches.size))


class OracleController(Controller):
    """Per-window best configuration from the simulator's ground truth (simulated plants only)."""

    Config = OracleConfig
    name = "oracle"

    def __init__(self, config: OracleConfig | None = None, /, **params: Any) -> None:
        super().__init__(config, **params)
        self._grid: common.Grid | None = None
        self._diag: dict[str, Any] = {}

    def setup(self, *, limits: Limits, dt_s: float, plant_info: PlantInfo) -> None:
        if plant_info is None or not plant_info.simulated:
            raise ConfigError("the oracle controller needs the simulated plant (it reads the "
                              "simulator's ground truth); this plant is not simulated",
                              key="controller.name", value="oracle")
        self._grid = truth_grid(plant_info, limits, cap_step_w=self.config.cap_step_w,
                                max_batch=self.config.max_batch)
        super().setup(limits=limits, dt_s=dt_s, plant_info=plant_info)

    def reset(self) -> None:
        self._diag = {}

    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action:
        if self._grid is None or self.limits is None:
            raise RuntimeError("OracleController.step() called before setup()")
        g, lim = self._grid, self.limits
        required = common.required_throughput(
            measurement, setpoint, margin=self.config.margin, drain_s=self.config.drain_s,
            output_tokens_mean=self.plant_info.output_tokens_mean)
        operating = common.required_throughput(
            measurement, setpoint, margin=0.0, drain_s=self.config.drain_s,
            output_tokens_mean=self.plant_info.output_tokens_mean)
        budget = setpoint.power_budget_w
        if budget is None:
            budget = setpoint.power_target_w
        choice = common.rank(g.cap_w, g.throughput_tok_s, g.power_w, g.itl_p90_s,
                             shape=g.shape, num_gpus=lim.num_gpus, required_tok_s=required,
                             budget_w=budget,
                             tpot_slo_s=setpoint.tpot_slo_s, operating_tok_s=operating)
        i = choice.index
        cap = float(g.cap_w[i])
        if budget is not None:
            cap = min(cap, budget / lim.num_gpus)
        self._diag = {"mode": choice.mode, "required_tok_s": required,
                      "true_throughput_tok_s": float(g.throughput_tok_s[i]),
                      "true_power_w": float(g.power_w[i])}
        return Action(power_cap_w=lim.clamp_cap_w(cap),
                      max_batch=lim.clamp_batch(int(round(g.batch[i]))))

    def diagnostics(self) -> dict[str, Any]:
        return dict(self._diag)
