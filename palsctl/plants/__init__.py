"""Plants: the simulated GPU + vLLM serving plant (`SimPlant`, `palsctl.plants.sim`) and a real
serving deployment composed of a power source, a metrics sensor and a batch actuator
(`ServingPlant`, `palsctl.plants.serving`). Each is imported on first use."""
from palsctl.lazy import lazy_exports

_LAZY = {
    "SimPlant": "palsctl.plants.sim:SimPlant",
    "ServingPlant": "palsctl.plants.serving:ServingPlant",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = sorted(_LAZY)
