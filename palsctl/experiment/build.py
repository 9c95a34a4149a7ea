"""Build the parts of an experiment (plant, workload, setpoint schedule, controller) from a
validated `ExperimentConfig`."""
from __future__ import annotations

from typing import Any

from palsctl.errors import ConfigError, PalsctlError, UnknownNameError
from palsctl.experiment.schema import ExperimentConfig, _controller_config


def build_plant(cfg: ExperimentConfig, *, seed: int | None = None):
    """Build the plant the ``[plant]`` table describes.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    seed : int, optional
        Seed of the plant's noise (default: the experiment's).

    Returns
    -------
    Plant
        The plant registered as ``[plant] kind`` (``"sim"``: `SimPlant`).
    """
    from palsctl.registry import make_plant

    p = dict(cfg.plant)
    kind = p.pop("kind")
    try:
        return make_plant(kind, dt_s=cfg.dt_s, seed=cfg.seed if seed is None else seed, **p)
    except UnknownNameError as exc:
        raise ConfigError(str(exc), file=cfg.source, key=f"plant.{exc.kind}"
                          if exc.kind != "plant" else "plant.kind") from None
    except ConfigError as exc:
        if exc.file is None:
            raise ConfigError(str(exc), file=cfg.source) from None
        raise


def full_power_capacity_req_s(cfg: ExperimentConfig, prompt_tokens: float,
                              output_tokens: float) -> float:
    """Compute the requests per second the plant serves at its default cap and launch batch.

    The saturated steady state of the simulated plant with these mean lengths.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (its ``[plant]``).
    prompt_tokens, output_tokens : float
        Mean prompt and output lengths, tokens.

    Returns
    -------
    float
        The capacity, req/s.
    """
    from palsctl.plants.sim import steady_state

    p = cfg.plant
    try:
        ss = steady_state(p["model"], p["gpu"], p["num_gpus"], p["max_batch_launch"],
                          prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                          parallelism=p.get("parallelism", "tp"))
    except PalsctlError as exc:
        raise ConfigError(f"cannot compute the plant's capacity for workload.load: {exc}",
                          file=cfg.source) from None
    return ss.throughput_tok_s / output_tokens


def build_workload(cfg: ExperimentConfig, *, seed: int | None = None):
    """Build the workload the ``[workload]`` table describes.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    seed : int, optional
        Seed of the arrivals and lengths (default: the experiment's).

    Returns
    -------
    Workload or None
        The request source (None for ``kind = "none"``).
    """
    from palsctl.workloads import (
        LogNormalLengths,
        MMPPWorkload,
        PoissonWorkload,
        TraceWorkload,
        azure_conv_workload,
        load_trace,
    )
    from palsctl.workloads.synthetic import AZURE_CONV_FIT

    w = cfg.workload
    kind = w["kind"]
    seed = cfg.seed if seed is None else seed
    if kind == "none":
        return None

    def rate_for(prompt_mean: float, output_mean: float) -> float | None:
        if w.get("load") is not None:
            return w["load"] * full_power_capacity_req_s(cfg, prompt_mean, output_mean)
        return w.get("rate_req_s")

    if kind == "azure-conv":
        probe = azure_conv_workload(seed=seed)
        return azure_conv_workload(rate_for(probe.mean_prompt_tokens, probe.mean_output_tokens)
                                   or AZURE_CONV_FIT.mean_rate_req_s, seed=seed)
    if kind in ("poisson", "mmpp"):
        try:
            prompt = LogNormalLengths.from_mean(w["prompt_tokens_mean"], w["prompt_tokens_sigma"],
                                                max_tokens=w["prompt_tokens_max"])
            output = LogNormalLengths.from_mean(w["output_tokens_mean"], w["output_tokens_sigma"],
                                                max_tokens=w["output_tokens_max"])
        except ConfigError as exc:
            raise ConfigError(str(exc), file=cfg.source, key="workload") from None
        rate = rate_for(prompt.mean(), output.mean())
        if kind == "poisson":
            assert rate is not None  # the schema asks poisson for rate_req_s or load
            return PoissonWorkload(rate, prompt=prompt, output=output, seed=seed)
        rates, dwell = w["rates_req_s"], w["mean_dwell_s"]
        if rate is not None:
            mean = sum(r * d for r, d in zip(rates, dwell)) / sum(dwell)
            rates = tuple(r * rate / mean for r in rates)
        return MMPPWorkload(rates, dwell, prompt=prompt, output=output, seed=seed)
    # trace
    try:
        trace = load_trace(w["path"], w["format"], lenient=bool(w.get("lenient", False)))
        natural = TraceWorkload(trace, start_s=w["start_s"], duration_s=w["window_s"])
        workload = TraceWorkload(trace, start_s=w["start_s"], duration_s=w["window_s"],
                                 rate_req_s=rate_for(natural.mean_prompt_tokens,
                                                     natural.mean_output_tokens),
                                 repeat=w["repeat"])
    except ConfigError as exc:
        raise ConfigError(str(exc), file=cfg.source, key="workload.path",
                          value=w["path"]) from None
    # a trace that ends in the run's last 1 % (a rounding of the time scale) is not short
    if not w["repeat"] and cfg.duration_s is not None \
            and workload.window_s < 0.99 * cfg.duration_s:
        _warn_short_trace(cfg, workload)
    return workload


def _trace_span(w: dict) -> str:
    return "the rest of the trace" if w["window_s"] is None else f"{w['window_s']:g} s of trace"


def _warn_short_trace(cfg: ExperimentConfig, workload) -> None:
    """A trace replay that ends before the run does: the rest of the run gets no requests."""
    import warnings

    from palsctl.errors import PalsctlWarning

    w = cfg.workload
    scaled = "" if workload.time_scale == 1.0 else \
        f" ({_trace_span(w)} time-scaled by " \
        f"{workload.time_scale:.3g} to {workload.rate_req_s:.3g} req/s)"
    warnings.warn(
        f"{cfg.source}: the trace workload ends at {workload.window_s:.0f} s{scaled} but the run "
        f"lasts {cfg.duration_s:g} s, so nothing arrives after that; set workload.repeat = true, "
        "a longer workload.window_s or a lower load, or a shorter duration_s",
        PalsctlWarning, stacklevel=3)


def build_schedule(cfg: ExperimentConfig, workload=None):
    """Build the ``t_s -> Setpoint`` schedule the ``[setpoint]`` table describes.

    The schedule specs hold the schedules they built while being validated.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    workload : Workload, optional
        Its workload: a target of ``"demand"`` is the workload's demand (tok/s).

    Returns
    -------
    SetpointSchedule
        The schedule (times in s since the start).
    """
    from palsctl.workloads.budgets import SetpointSchedule

    fields: dict[str, Any] = {}
    for name, spec in cfg.setpoint.items():
        if spec == "demand":
            if workload is None:
                raise ConfigError('"demand" needs a workload', file=cfg.source,
                                  key=f"setpoint.{name}", value=spec)
            fields[name] = workload.demand_tok_s
        elif isinstance(spec, float):
            fields[name] = spec
        else:
            fields[name] = spec.schedule
    return SetpointSchedule(**fields)


def build_controller(cfg: ExperimentConfig, controller: Any = None):
    """Build the experiment's controller, or another one on the same experiment.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    controller : str or Controller, optional
        Overrides the configured one: a registered name (with the config's parameters when it is
        the same name, defaults otherwise) or an instance.

    Returns
    -------
    Controller
        The controller.
    """
    from palsctl.interfaces import Controller

    if isinstance(controller, Controller):
        return controller
    name = cfg.controller_name if controller is None else str(controller)
    params = cfg.controller_params if name == cfg.controller_name else {}
    cls, config = _controller_config(name, params, cfg.source)
    return cls(config)
