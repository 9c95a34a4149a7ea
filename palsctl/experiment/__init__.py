"""Experiments: the TOML schema and its one validator (`schema`), building the parts (`build`),
running the closed loop (`run`), comparing controllers (`compare`) and wiring a real server
(`serving`).

>>> from palsctl.experiment import load_experiment, run_experiment   # doctest: +SKIP
>>> record = run_experiment(load_experiment("examples/dense_h100.toml"))  # doctest: +SKIP
"""
from palsctl.experiment.build import (
    build_controller,
    build_plant,
    build_schedule,
    build_workload,
    full_power_capacity_req_s,
)
from palsctl.experiment.compare import compare, versus_static
from palsctl.experiment.run import run_experiment
from palsctl.experiment.schema import (
    DEFAULT_EXPERIMENT_TOML,
    DEFAULT_SOURCE,
    ExperimentConfig,
    GridSchedule,
    RampSchedule,
    StepsSchedule,
    control_from_dict,
    experiment_from_dict,
    load_experiment,
    read_toml,
    serving_from_dict,
)

__all__ = [
    "DEFAULT_EXPERIMENT_TOML", "DEFAULT_SOURCE", "ExperimentConfig", "GridSchedule",
    "RampSchedule", "StepsSchedule", "build_controller", "build_plant", "build_schedule",
    "build_workload", "compare", "control_from_dict", "experiment_from_dict",
    "full_power_capacity_req_s", "load_experiment", "read_toml", "run_experiment",
    "serving_from_dict", "versus_static",
]
