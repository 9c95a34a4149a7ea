"""Run an experiment end to end: build its parts, close the loop, return the `RunRecord`."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from palsctl.experiment.build import (
    build_controller,
    build_plant,
    build_schedule,
    build_workload,
)
from palsctl.experiment.schema import ExperimentConfig

if TYPE_CHECKING:
    from palsctl.loop import RunRecord

__all__ = ["run_experiment"]


def run_experiment(cfg: ExperimentConfig, *, controller: Any = None, seed: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> RunRecord:
    """Build plant, workload, schedule and controller from an experiment and close the loop.

    The experiment's guard wraps the controller unless its class declares ``guarded = False``
    and the plant is simulated (the `static` baseline runs unguarded). For one config and seed
    every controller sees the same workload and plant noise, so `palsctl compare` can score
    them side by side.

    Parameters
    ----------
    cfg : ExperimentConfig
        The validated experiment (`load_experiment`).
    controller : str or Controller, optional
        Overrides the configured controller (a registered name or an instance).
    seed : int, optional
        Overrides the experiment's seed.
    progress : callable, optional
        ``progress(done_steps, total_steps)``, called after each step.

    Returns
    -------
    RunRecord
        Every step and finished request of the run.
    """
    from palsctl.loop import run_loop

    seed = cfg.seed if seed is None else seed
    ctl = build_controller(cfg, controller)
    plant = build_plant(cfg, seed=seed)
    workload = build_workload(cfg, seed=seed)
    schedule = build_schedule(cfg, workload)
    # A controller class may declare ``guarded = False`` (the `static` baseline: what users run
    # today, with no power management and no safety layer); on the simulated plant it then runs
    # without the SafetyGuard so the comparison shows what ignoring the budget costs. Real plants
    # always keep the guard when the experiment enables it.
    unguarded = not ctl.guarded and plant.info.simulated
    guard = cfg.guard if cfg.guard_enabled and not unguarded else False
    try:
        record = run_loop(plant, ctl, duration_s=cfg.duration_s, schedule=schedule,
                          workload=workload, guard=guard, progress=progress)
    finally:
        plant.close()
    if controller is None:
        record.controller = cfg.controller_name
    elif isinstance(controller, str):
        record.controller = controller
    else:
        record.controller = getattr(type(controller), "name", type(controller).__name__)
    record.meta.update({
        "experiment": cfg.name, "source": cfg.source, "seed": seed,
        "duration_s": cfg.duration_s, "dt_s": cfg.dt_s, "plant": dict(cfg.plant),
        "workload": _workload_meta(cfg, workload),
        "guard_enabled": cfg.guard_enabled and not unguarded,
    })
    return record


def _workload_meta(cfg: ExperimentConfig, workload) -> dict[str, Any]:
    if workload is None:
        return {"kind": "none"}
    meta = {"kind": cfg.workload["kind"], "rate_req_s": workload.rate_req_s,
            "mean_prompt_tokens": workload.mean_prompt_tokens,
            "mean_output_tokens": workload.mean_output_tokens,
            "demand_tok_s": workload.demand_tok_s}
    trace = getattr(workload, "trace", None)
    if trace is not None:         # a replayed trace: how many of its rows a lenient load dropped
        meta.update(trace_rows=trace.rows, dropped_rows=trace.dropped_rows,
                    dropped_reasons=dict(trace.dropped))
    return meta
