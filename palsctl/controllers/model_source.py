"""Where the model-based controllers (`search`, `mpc`) get their offline power-performance model.

In order: the ``model=`` object given at construction, the Config's ``model_path`` (a JSON file
written by ``palsctl fit``), or — for experiment configs that name no model file — a model
profiled offline on the simulator's presets for the plant's model/GPU/GPU count and the
workload's mean prompt/output lengths (``palsctl.models.build_model_for``). Building that model
is offline profiling done once before the run (and memoised), never inside a controller step.
Controllers call `ensure_model` from ``setup`` when they have no model yet.
"""
from __future__ import annotations

import functools
from typing import Any

from palsctl.errors import ConfigError
from palsctl.types import PlantInfo

__all__ = ["DEFAULT_OUTPUT_TOKENS", "DEFAULT_PROMPT_TOKENS", "PROFILE_BATCHES", "ensure_model",
           "load_model", "model_for"]

DEFAULT_PROMPT_TOKENS = 1024.0
DEFAULT_OUTPUT_TOKENS = 256.0


def load_model(path: str) -> Any:
    """Load a model file written by ``palsctl fit``."""
    from palsctl.models import PowerPerfModel

    return PowerPerfModel.load(path)


PROFILE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@functools.lru_cache(maxsize=16)
def _built(model: str, gpu: str, num_gpus: int, prompt_tokens: int, output_tokens: int,
           points: int, kind: str, parallelism: str = "tp") -> Any:
    """Profile ``points`` space-filling points of 7 caps × batches 1..256 (limited to the
    plant's range) on the simulated plant and fit a `PowerPerfModel`. Unlike
    ``build_model_for``'s default 1..64 batch grid, the profile spans the launch batch limit the
    controllers choose from, so the model interpolates instead of extrapolating there."""
    from palsctl.models.power_perf import PowerPerfModel
    from palsctl.models.profile import default_grid, profile_plant, sample_points
    from palsctl.plants.sim import SimPlant

    def make(seed: int) -> SimPlant:
        return SimPlant(model=model, gpu=gpu, num_gpus=num_gpus, seed=seed,
                        parallelism=parallelism)

    probe = make(0)
    try:
        caps, batches = default_grid(probe.limits, batches=PROFILE_BATCHES)
    finally:
        probe.close()
    pts = sample_points(caps, batches, points, seed=0)
    rows = profile_plant(make, pts, warmup_s=20.0, window_s=30.0, prompt_tokens=prompt_tokens,
                         output_tokens=output_tokens, out_csv=None, seed=0)
    return PowerPerfModel.fit(rows, kind=kind, seed=0, cv_folds=0)


def model_for(plant_info: PlantInfo | None, *, points: int = 16,
              kind: str = "parametric") -> Any:
    """Profile an offline model for a plant on the simulator's presets.

    The profile runs at the workload's mean prompt/output lengths and is memoised per plant and
    lengths.

    Parameters
    ----------
    plant_info : PlantInfo or None
        The plant (its model and GPU presets, GPU count, mean lengths); None raises.
    points : int, default 16
        Profiled (cap, batch) points.
    kind : str, default "parametric"
        The `PowerPerfModel` kind fitted.

    Returns
    -------
    PowerPerfModel
        The fitted model.

    Raises
    ------
    ConfigError
        When ``plant_info`` is None (nothing to profile).
    """
    if plant_info is None:
        raise ConfigError("a model-based controller needs a model: pass model=, set "
                          "controller.model_path, or run it on a plant whose model/GPU are known")
    prompt = plant_info.prompt_tokens_mean or DEFAULT_PROMPT_TOKENS
    output = plant_info.output_tokens_mean or DEFAULT_OUTPUT_TOKENS
    return _built(plant_info.model, plant_info.gpu, int(plant_info.num_gpus),
                  max(1, int(round(prompt))), max(1, int(round(output))), int(points), kind,
                  str((plant_info.extra or {}).get("parallelism", "tp")))


def ensure_model(controller: Any, plant_info: PlantInfo | None = None) -> Any:
    """Give ``controller`` a model if it needs one and has none (no-op for other controllers).
    Returns the model (or None). Call before ``setup``; ``setup`` also calls it as a fallback."""
    if not controller.needs_model:
        return None
    if getattr(controller, "model", None) is not None:
        return controller.model
    path = getattr(controller.config, "model_path", None)
    if path:
        controller.model = load_model(path)
    else:
        controller.model = model_for(plant_info)
    return controller.model
