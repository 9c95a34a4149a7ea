"""`search-truth` — `search`'s decision rule on the simulator's ground truth instead of a model.

Simulated plants only (``plant_info.simulated`` must be True): at setup the ground-truth
saturated steady state of the simulator (`palsctl.plants.sim.steady_state`) is evaluated for
every (cap, batch) candidate (memoised per plant and workload) and replaces the offline model's
prediction; everything else — demand, corrections, QoS tightening, moves — is `search`'s. The
fraction of its tokens/J that `search` reaches measures what `search` loses to its model's
errors. It is *not* a bound: the ground truth is the saturated steady state at the workload's
mean lengths, not the bursty, heavy-tailed workload itself (the reference for that is
`hindsight`, `palsctl.experiment.hindsight`).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from typing_extensions import override

from palsctl.controllers import common
from palsctl.controllers.model_source import DEFAULT_OUTPUT_TOKENS, DEFAULT_PROMPT_TOKENS
from palsctl.controllers.search import SearchConfig, SearchController
from palsctl.errors import ConfigError
from palsctl.types import Limits, PlantInfo

__all__ = ["SearchTruthConfig", "SearchTruthController", "truth_grid"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchTruthConfig(SearchConfig):
    """`search`'s Config with the same defaults; ``model_path`` is ignored."""


@functools.lru_cache(maxsize=8)
def _truth(model: str, gpu: str, num_gpus: int, caps: tuple[float, ...],
           batches: tuple[float, ...], prompt: float, output: float,
           parallelism: str = "tp") -> tuple[np.ndarray, ...]:
    from palsctl.plants.sim import steady_state

    n = len(caps) * len(batches)
    thr, pw, itl = np.empty(n), np.empty(n), np.empty(n)
    i = 0
    for c in caps:
        for b in batches:
            s = steady_state(model, gpu, num_gpus, int(b), power_cap_w=c,
                             prompt_tokens=prompt, output_tokens=output,
                             parallelism=parallelism)
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
                          float(round(prompt)), float(round(output)),
                          str(plant_info.extra.get("parallelism", "tp")))
    cc, bb = np.meshgrid(caps, batches, indexing="ij")
    return common.Grid(cap_w=cc.ravel(), batch=bb.ravel(), throughput_tok_s=thr, power_w=pw,
                       itl_p90_s=itl, shape=(caps.size, batches.size))


class SearchTruthController(SearchController):
    """`search` whose candidate grid is the simulator's ground truth (`truth_grid`).

    Parameters
    ----------
    config : SearchTruthConfig, optional
        The tunables (positional only).
    model : object, optional
        Ignored: the ground truth replaces the model.
    **params
        Or `SearchTruthConfig`'s fields as keyword parameters (those of `SearchConfig`).
    """

    Config = SearchTruthConfig
    config: SearchTruthConfig
    name = "search-truth"
    needs_model = False
    aggressiveness = None

    @override
    def build_grid(self, limits: Limits, plant_info: PlantInfo | None) -> common.Grid:
        if plant_info is None or not plant_info.simulated:
            raise ConfigError("search-truth reads the simulator's ground truth; this plant is "
                              "not simulated", key="controller.name", value="search-truth")
        return truth_grid(plant_info, limits, cap_step_w=self.config.cap_step_w,
                          max_batch=self.config.max_batch)
