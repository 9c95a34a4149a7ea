"""Where the model-based controllers (`search`, `mpc`) get their offline power-performance model.

In order: the ``model=`` object given at construction, the Config's ``model_path`` (a JSON file
written by ``palsctl fit``), or — for experiment configs that name no model file — a model
profiled offline on the simulator's presets for the plant's model/GPU/GPU count and the
workload's mean prompt/output lengths (``palsctl.models.build_model_for``). Building that model
is offline profiling done once before the run (and memoised), never inside a controller step.
"""
from __future__ import annotations

import functools
from typing import Any

from palsctl.errors import ConfigError
from palsctl.types import PlantInfo

DEFAULT_PROMPT_TOKENS = 1024.0
DEFAULT_OUTPUT_TOKENS = 256.0


def load_model(path: str) -> Any:
    """Load a model file written by ``palsctl fit``."""
    from palsctl.models import PowerPerfModel

    return PowerPerfModel.load(path)


@functools.lru_cache(maxsize=16)
def _built(model: str, gpu: str, num_gpus: int, prompt_tokens: float, output_tokens: float,
           points: int) -> Any:
    from palsctl.models import build_model_for

    return build_model_for(model, gpu, num_gpus, prompt_tokens=prompt_tokens,
                           output_tokens=output_tokens, points=points)


def model_for(plant_info: PlantInfo, *, points: int = 12) -> Any:
    """An offline model for the plant described by ``plant_info``, profiled on the simulator's
    presets (memoised per plant and workload lengths)."""
    if plant_info is None:
        raise ConfigError("a model-based controller needs a model: pass model=, set "
                          "controller.model_path, or run it on a plant whose model/GPU are known")
    prompt = plant_info.prompt_tokens_mean or DEFAULT_PROMPT_TOKENS
    output = plant_info.output_tokens_mean or DEFAULT_OUTPUT_TOKENS
    return _built(plant_info.model, plant_info.gpu, int(plant_info.num_gpus),
                  float(round(prompt)), float(round(output)), int(points))


def ensure_model(controller: Any, plant_info: PlantInfo | None = None) -> Any:
    """Give ``controller`` a model if it needs one and has none (no-op for other controllers).
    Returns the model (or None). Call before ``setup``; ``setup`` also calls it as a fallback."""
    if not getattr(controller, "needs_model", False):
        return None
    if getattr(controller, "model", None) is not None:
        return controller.model
    path = getattr(controller.config, "model_path", None)
    if path:
        controller.model = load_model(path)
    else:
        controller.model = model_for(plant_info)
    return controller.model
