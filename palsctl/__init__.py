"""palsctl: power-aware LLM serving.

Sets the GPU power cap jointly with the serving engine's batch size so that a deployment
meets its throughput / latency target with the fewest joules and never exceeds a power budget.

Light on import: heavy dependencies (cvxpy, python-control, matplotlib, pynvml, ...) are
imported only by the modules that use them.
"""
from palsctl.errors import ConfigError, PalsctlError
from palsctl.registry import make_controller, make_plant, register
from palsctl.types import Action, Limits, Measurement, PlantInfo, Request, RequestResult, Setpoint

__version__ = "0.1.0"

__all__ = [
    "Action", "ConfigError", "Limits", "Measurement", "PalsctlError", "PlantInfo", "Request",
    "RequestResult", "Setpoint", "make_controller", "make_plant", "register", "__version__",
]
