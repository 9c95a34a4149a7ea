"""`oracle` — the best configuration per control window with perfect knowledge of the plant.

Simulated plants only (``plant_info.simulated`` must be True): at setup the ground-truth
saturated steady state of the simulator (`palsctl.plants.sim.steady_state`) is evaluated for
every (cap, batch) candidate (memoised per plant and workload). Each window it runs exactly
`search`'s decision rule on that ground truth instead of an offline model: the candidate with
the highest true operating tokens/J whose throughput meets the requirement with the same
headroom (target × (1 + ``margin``) plus the queue-drain rate), whose power and cap fit the
budget and whose p90 ITL meets the TPOT objective, with the largest such batch limit; the same
online residual correction (the steady state at mean lengths is not the bursty workload) and
the same cap trim on a backlog below the target, hysteresis and dwell (without them it flaps
between configurations on the noisy one-second windows and pays in QoS). So it is held to the
same QoS rules as the controllers measured against it, and the fraction of its tokens/J a
controller reaches measures what that controller loses to its model's errors. It is a limit
for the steady state it knows: the ground truth is the saturated steady state at the
workload's *mean* lengths, so on a bursty, heavy-tailed workload it is not a bound on QoS.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from palsctl.controllers import common
from palsctl.controllers.model_source import DEFAULT_OUTPUT_TOKENS, DEFAULT_PROMPT_TOKENS
from palsctl.controllers.search import SearchConfig, SearchController
from palsctl.errors import ConfigError
from palsctl.interfaces import Controller
from palsctl.types import Limits, PlantInfo


@dataclasses.dataclass(frozen=True, kw_only=True)
class OracleConfig(SearchConfig):
    """`search`'s Config with the same defaults (throughput headroom ``margin``, budget and
    latency margins, residual correction, cap trim, hysteresis and dwell), so the oracle is held
    to the same QoS rules and differs from `search` only in its knowledge of the plant.
    ``model_path`` is ignored: the oracle reads the simulator's ground truth."""


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


class OracleController(SearchController):
    """`search` with perfect knowledge: its candidate grid is the simulator's ground truth
    (`truth_grid`) instead of an offline model's prediction (simulated plants only)."""

    Config = OracleConfig
    name = "oracle"
    needs_model = False

    def setup(self, *, limits: Limits, dt_s: float, plant_info: PlantInfo) -> None:
        if plant_info is None or not plant_info.simulated:
            raise ConfigError("the oracle controller needs the simulated plant (it reads the "
                              "simulator's ground truth); this plant is not simulated",
                              key="controller.name", value="oracle")
        self._grid = truth_grid(plant_info, limits, cap_step_w=self.config.cap_step_w,
                                max_batch=self.config.max_batch)
        Controller.setup(self, limits=limits, dt_s=dt_s, plant_info=plant_info)
