"""Deprecated location, kept so existing imports keep working: the experiment schema, builders
and runner live in `palsctl.experiment` (``schema``, ``build``, ``run``)."""
from palsctl.experiment.build import (
    build_controller,
    build_plant,
    build_schedule,
    build_workload,
    full_power_capacity_req_s,
)
from palsctl.experiment.run import run_experiment
from palsctl.experiment.schema import (
    DEFAULT_EXPERIMENT_TOML,
    DEFAULT_SOURCE,
    ExperimentConfig,
    experiment_from_dict,
    load_experiment,
    read_toml,
)

__all__ = [
    "DEFAULT_EXPERIMENT_TOML", "DEFAULT_SOURCE", "ExperimentConfig", "build_controller",
    "build_plant", "build_schedule", "build_workload", "experiment_from_dict",
    "full_power_capacity_req_s", "load_experiment", "read_toml", "run_experiment",
]
