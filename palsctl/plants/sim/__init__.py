"""The simulated GPU + vLLM serving plant (ground truth for every experiment).

>>> from palsctl.plants.sim import steady_state
>>> s = steady_state("llama-3.1-8b", "h100-sxm", 1, max_batch=64, prompt_tokens=200,
...                  output_tokens=400)
>>> s.throughput_tok_s > 0 and s.power_w <= 700
True
"""
from palsctl.plants.sim.gpu import GroupModel, PlantConstants, default_constants
from palsctl.plants.sim.plant import HistogramSnapshot, PlantCounters, SimPlant
from palsctl.plants.sim.specs import (
                                     GPU_PRESETS,
                                     MODEL_PRESETS,
                                     GPUSpec,
                                     ModelSpec,
                                     check_fits,
                                     get_gpu,
                                     get_model,
)
from palsctl.plants.sim.steady import SteadyState, steady_state

__all__ = ["SimPlant", "steady_state", "SteadyState", "GPUSpec", "ModelSpec", "GPU_PRESETS",
           "MODEL_PRESETS", "check_fits", "get_gpu", "get_model", "PlantConstants",
           "default_constants", "GroupModel", "PlantCounters", "HistogramSnapshot"]
