"""palsctl: power-aware LLM serving.

Sets the GPU power cap jointly with the serving engine's batch size so that a deployment
meets its throughput / latency target with the fewest joules and never exceeds a power budget.

The names used in the README are here: the core types, the simulated plant (`SimPlant`), every
built-in controller (`PIController`, `SearchController`, ...), `run_loop`, `summarize`,
`make_controller`, `load_experiment`, `run_experiment`. Light on import: only the core types,
errors and registry are imported with the package; every other name (and its heavy
dependencies: numpy, cvxpy, python-control, pydantic, ...) is imported the first time it is
used.

>>> import palsctl
>>> plant = palsctl.SimPlant("llama-3.1-8b", "h100-sxm", num_gpus=1, seed=0)  # doctest: +SKIP
>>> record = palsctl.run_loop(plant, palsctl.CapToBudgetController(max_batch=64),
...                           duration_s=60, schedule=lambda t: palsctl.Setpoint(
...                               power_budget_w=400.0))                    # doctest: +SKIP
"""
from palsctl.errors import ConfigError, PalsctlError
from palsctl.lazy import lazy_exports
from palsctl.registry import builtin, make_controller, make_plant, register
from palsctl.types import Action, Limits, Measurement, PlantInfo, Request, RequestResult, Setpoint

__version__ = "0.1.0"

_LAZY = {
    "Controller": "palsctl.interfaces:Controller",
    "ControllerConfig": "palsctl.interfaces:ControllerConfig",
    "Plant": "palsctl.interfaces:Plant",
    "SimulatedPlant": "palsctl.interfaces:SimulatedPlant",
    "SimPlant": "palsctl.plants.sim:SimPlant",
    "SafetyGuard": "palsctl.safety:SafetyGuard",
    "GuardConfig": "palsctl.safety:GuardConfig",
    "run_loop": "palsctl.loop:run_loop",
    "RunRecord": "palsctl.loop:RunRecord",
    "summarize": "palsctl.metrics:summarize",
    "SetpointSchedule": "palsctl.workloads:SetpointSchedule",
    "Steps": "palsctl.workloads:Steps",
    "Ramp": "palsctl.workloads:Ramp",
    "PoissonWorkload": "palsctl.workloads:PoissonWorkload",
    "LogNormalLengths": "palsctl.workloads:LogNormalLengths",
    "azure_conv_workload": "palsctl.workloads:azure_conv_workload",
    "steady_state": "palsctl.plants.sim:steady_state",
    "ExperimentConfig": "palsctl.experiment:ExperimentConfig",
    "load_experiment": "palsctl.experiment:load_experiment",
    "run_experiment": "palsctl.experiment:run_experiment",
    # every built-in controller under its class name (PIController, SearchController, ...)
    **{target.rpartition(":")[2]: target for target in builtin("controller").values()},
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "Action", "ConfigError", "Limits", "Measurement", "PalsctlError", "PlantInfo", "Request",
    "RequestResult", "Setpoint", "make_controller", "make_plant", "register", "__version__",
    *sorted(_LAZY),
]
