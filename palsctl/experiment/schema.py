"""The experiment schema: one TOML file, strictly validated (the one validator).

An experiment names the plant, the workload, the setpoint schedules, the controller and its
parameters, the duration and the control period::

    name = "my-run"          # results go to results/<name>/
    duration_s = 1200.0      # simulated seconds
    dt_s = 1.0               # control period
    seed = 0                 # plant noise and workload draws

    [plant]                  # kind = "sim": the simulated GPU + vLLM plant
    model = "mixtral-8x7b"
    gpu = "a100-sxm4-80gb"
    num_gpus = 4
    max_batch_launch = 256   # vLLM --max-num-seqs at launch: the largest batch a controller may set

    [workload]               # kind: azure-conv | poisson | mmpp | trace | none
    kind = "azure-conv"
    load = 0.7               # mean offered load / full-power capacity (or rate_req_s = ...)

    [setpoint]               # each: a number, "demand" (throughput only) or a schedule table
    throughput_tok_s = "demand"
    power_budget_w = { steps = [[0, 1400], [480, 900], [840, 1400]] }
    tpot_slo_s = 0.1

    [controller]
    name = "static"          # any registered controller; other keys go to its Config

    [guard]                  # the SafetyGuard between controller and plant
    max_cap_change_w = 50.0

Schedule tables: ``{ steps = [[t_s, v], ...] }``, ``{ ramp = [[t_s, v], ...] }`` or
``{ grid = "vessim-grid/watttime_example.csv", min_w = 800, max_w = 1400, column = "...",
invert = true, speedup = 300, start_s = 0 }``. File paths are taken relative to the config
file, then to the shared data folder.

Validation is pydantic v2 (`palsctl.validation`): every unknown key ("did you mean"), wrong type,
out-of-range value and failed cross-field check — among them a budget below the plant's floor
(GPUs × minimum cap) and a model that does not fit the GPUs' memory — is reported at once by one
`ConfigError`, one line per error naming the file, the dotted key and the value. A validated
schedule table is a frozen spec object (`StepsSchedule`, `RampSchedule`, `GridSchedule`) that
holds the schedule it built while being checked.

`ExperimentConfig.to_toml` writes the resolved experiment (defaults filled in, overrides
applied); `load_experiment` reads it back to an equal config, so a run can be repeated exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import tomli_w
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
)

from palsctl.errors import ConfigError, UnknownNameError
from palsctl.safety import GuardConfig
from palsctl.types import SETPOINT_FIELDS
from palsctl.validation import did_you_mean, unknown_key, validate_table
from palsctl.workloads.budgets import GridSignal, Ramp, Steps

__all__ = [
    "DEFAULT_EXPERIMENT_TOML", "DEFAULT_SOURCE", "ExperimentConfig", "GridSchedule", "PlantTable",
    "RampSchedule", "ScheduleSpec", "ServingTable", "SetpointSpec", "StepsSchedule",
    "control_from_dict", "experiment_from_dict", "load_experiment", "read_toml",
    "serving_from_dict", "setpoint_value",
]

DEFAULT_EXPERIMENT_TOML = """\
# The default experiment: `palsctl run` with no CONFIG.
# Mixtral-8x7B (MoE) on 4 x A100-SXM4-80GB (TP 4), serving a bursty workload fitted to the Azure
# LLM inference trace 2023 (conversation) at ~70 % of the replica's full-power capacity; the
# power budget drops from 1400 W to 900 W at minute 8 and comes back at minute 14. Controller:
# `search` (PALS model-guided search); `palsctl run` also runs `static` (default cap, batch 256,
# no power management) on the same workload and seed and reports the gain.
# SLOs: p90 time per output token <= 0.15 s (~7 tokens/s per user, about reading speed) and p90
# time to first token <= 2 s, inside MLPerf's Mixtral-8x7B server bounds (TTFT 2 s, TPOT 0.2 s at
# p99). At this bursty 70 % load static at full power meets them in ~96 % of the one-second
# windows (bursts of long prompts stall decoding); with a 0.1 s TPOT objective static itself
# would miss ~15 % of the windows, which would score the load rather than the controller.
name = "default"
duration_s = 1200.0
dt_s = 1.0
seed = 0

[plant]
kind = "sim"
model = "mixtral-8x7b"
gpu = "a100-sxm4-80gb"
num_gpus = 4
max_batch_launch = 256

[workload]
kind = "azure-conv"
load = 0.7

[setpoint]
throughput_tok_s = "demand"
tpot_slo_s = 0.15
ttft_slo_s = 2.0
power_budget_w = { steps = [[0.0, 1400.0], [480.0, 900.0], [840.0, 1400.0]] }

[controller]
name = "search"

[guard]
enabled = true
"""

DEFAULT_SOURCE = "<default experiment>"

RESOLVED_HEADER = ("# The resolved experiment (defaults filled in, overrides applied): "
                   "`palsctl run` reads it back\n# to the same configuration.\n")


# ---- value types (TOML types exactly: no "1" for 1, no true for 1; finite numbers) ----------
Finite = Annotated[float, Strict(), AllowInfNan(False)]
NonNegative = Annotated[Finite, Field(ge=0)]
Positive = Annotated[Finite, Field(gt=0)]
Text = Annotated[str, Strict(), Field(min_length=1)]
Flag = Annotated[bool, Strict()]


# integer counts (no bool, no float): >= 0, >= 1, GPUs in a plant, a batch limit
_Count0 = Annotated[int, Strict(), Field(ge=0)]
_Count1 = Annotated[int, Strict(), Field(ge=1)]
_GpuCount = Annotated[int, Strict(), Field(ge=1, le=1024)]
_BatchCount = Annotated[int, Strict(), Field(ge=1, le=65536)]


def _plain_name(x: str) -> str:
    if "/" in x or "\\" in x or x in (".", ".."):
        raise ValueError("must be a plain name (it names the results folder)")
    return x


def _pair(x: Any) -> Any:
    if not isinstance(x, (list, tuple)) or len(x) != 2:
        raise ValueError("must be a [t_s, value] pair")
    return x


Points = Annotated[tuple[Annotated[tuple[NonNegative, NonNegative], BeforeValidator(_pair)], ...],
                   Field(min_length=1)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _Top(_Table):
    name: Annotated[Text, AfterValidator(_plain_name)] = "experiment"
    duration_s: Annotated[Positive, Field(le=1e7)]
    dt_s: Annotated[Positive, Field(le=3600)] = 1.0
    seed: _Count0 = 0
    plant: dict[str, Any] = {}
    workload: dict[str, Any] = {}
    setpoint: dict[str, Any] = {}
    controller: dict[str, Any]
    guard: dict[str, Any] = {}


class PlantTable(_Table):
    """``[plant]``: ``kind = "sim"`` is the simulated GPU + vLLM plant (`SimPlant`)."""

    kind: Text = "sim"
    model: Text = "mixtral-8x7b"
    gpu: Text = "a100-sxm4-80gb"
    num_gpus: _GpuCount = 1
    max_batch_launch: _BatchCount = 256
    power_cap_w: Positive | None = None
    max_batch: _BatchCount | None = None
    noise: Flag = True
    parallelism: Literal["tp", "ep", "tp+ep"] = "tp"


class _WorkloadTable(_Table):
    kind: str


class _RateTable(_WorkloadTable):
    rate_req_s: Positive | None = None
    load: Annotated[Positive, Field(le=10)] | None = None


class _LengthsTable(_RateTable):
    prompt_tokens_mean: Annotated[Finite, Field(ge=1)] = 512.0
    prompt_tokens_sigma: Annotated[NonNegative, Field(le=5)] = 0.0
    prompt_tokens_max: _Count1 = 1_000_000
    output_tokens_mean: Annotated[Finite, Field(ge=1)] = 256.0
    output_tokens_sigma: Annotated[NonNegative, Field(le=5)] = 0.0
    output_tokens_max: _Count1 = 1_000_000


class _MMPPTable(_LengthsTable):
    rates_req_s: Annotated[tuple[NonNegative, ...], Field(min_length=1)]
    mean_dwell_s: Annotated[tuple[Positive, ...], Field(min_length=1)]


class _TraceTable(_RateTable):
    path: Text
    format: Literal["auto", "azure", "mooncake"] = "auto"
    start_s: NonNegative = 0.0
    window_s: Positive | None = None
    repeat: Flag = False
    lenient: Flag = False


_WORKLOADS: dict[str, type[_WorkloadTable]] = {
    "none": _WorkloadTable, "azure-conv": _RateTable, "poisson": _LengthsTable,
    "mmpp": _MMPPTable, "trace": _TraceTable,
}


# ---- setpoint schedules: validated once, frozen, holding the schedule they built -------------
class ConstantSchedule(_Table):
    """``{ constant = v }`` (read as the number ``v``)."""

    constant: NonNegative


class StepsSchedule(_Table):
    """``{ steps = [[t_s, value], ...] }``: piecewise constant (`Steps`), starting at t = 0.

    Parameters
    ----------
    steps : tuple of (float, float)
        ``(t_s, value)`` points, times in s since the start.
    """

    steps: Points

    @functools.cached_property
    def schedule(self) -> Steps:
        """The `Steps` schedule (built once, while the spec is validated)."""
        return Steps(self.steps)


class RampSchedule(_Table):
    """``{ ramp = [[t_s, value], ...] }``: piecewise linear (`Ramp`), starting at t = 0.

    Parameters
    ----------
    ramp : tuple of (float, float)
        ``(t_s, value)`` points, times in s since the start.
    """

    ramp: Points

    @functools.cached_property
    def schedule(self) -> Ramp:
        """The `Ramp` schedule (built once, while the spec is validated)."""
        return Ramp(self.ramp)


class GridSchedule(_Table):
    """``{ grid = "file.csv", ... }``: a grid signal mapped onto a power range (`GridSignal`).

    Parameters
    ----------
    grid : str
        The signal file (resolved path).
    min_w, max_w : float
        The power range the signal maps onto, W.
    column : str or None
        The signal column (None: the first).
    invert : bool, default False
        Map the signal's maximum to ``min_w``.
    speedup : float, default 1.0
        Signal seconds per run second.
    start_s : float, default 0.0
        Skip into the signal, s.
    """

    grid: Text
    min_w: NonNegative
    max_w: NonNegative
    column: Text | None = None
    invert: Flag = False
    speedup: Positive = 1.0
    start_s: NonNegative = 0.0

    @functools.cached_property
    def schedule(self) -> GridSignal:
        """The `GridSignal` (the file is read once, while the spec is validated)."""
        return GridSignal(self.grid, min_w=self.min_w, max_w=self.max_w, column=self.column,
                          start_s=self.start_s, speedup=self.speedup, invert=self.invert)


#: A validated schedule table.
ScheduleSpec = Union[StepsSchedule, RampSchedule, GridSchedule]
#: A validated ``[setpoint]`` value: a number, ``"demand"`` (throughput only) or a schedule.
SetpointSpec = Union[float, Literal["demand"], ScheduleSpec]
_SCHEDULES: dict[str, type[_Table]] = {"constant": ConstantSchedule, "steps": StepsSchedule,
                                       "ramp": RampSchedule, "grid": GridSchedule}


def _lowest(spec: SetpointSpec) -> float | None:
    """The lowest value a setpoint spec takes (None for "demand")."""
    if isinstance(spec, float):
        return spec
    if isinstance(spec, StepsSchedule):
        return min(v for _, v in spec.steps)
    if isinstance(spec, RampSchedule):
        return min(v for _, v in spec.ramp)
    if isinstance(spec, GridSchedule):
        return spec.min_w
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A validated experiment (`load_experiment`); frozen.

    Parameters
    ----------
    name : str
        The experiment's name (it names the results folder).
    duration_s : float or None
        Simulated or wall-clock length of the run, s (None only for a ``palsctl control`` run
        that lasts until stopped).
    dt_s : float
        Control period, s.
    seed : int
        Seed of the plant's noise and of the workload.
    plant, workload : dict
        The validated ``[plant]`` and ``[workload]`` tables (defaults filled in).
    setpoint : dict
        `Setpoint` field name -> a number, ``"demand"`` or a frozen schedule spec
        (`StepsSchedule`, `RampSchedule`, `GridSchedule`).
    controller_name : str
        The registered controller.
    controller_params : dict
        Its Config's fields (defaults filled in, None left out).
    guard_enabled : bool
        Whether the `SafetyGuard` wraps the controller.
    guard : GuardConfig
        The guard's tunables.
    source : str or None
        The file it came from (for error messages); not part of ``==``.
    base_dir : Path or None
        Where relative paths start; not part of ``==``.
    """

    name: str
    duration_s: float | None
    dt_s: float
    seed: int
    plant: dict[str, Any]
    workload: dict[str, Any]
    setpoint: dict[str, SetpointSpec]
    controller_name: str
    controller_params: dict[str, Any]
    guard_enabled: bool
    guard: GuardConfig
    source: str | None = dataclasses.field(default=None, compare=False)
    base_dir: Path | None = dataclasses.field(default=None, compare=False)

    def with_overrides(self, **changes: Any) -> ExperimentConfig:
        """A copy with some fields replaced (``duration_s``, ``seed``...; not checked: use
        `with_controller` to change the controller)."""
        return dataclasses.replace(self, **changes)

    def with_controller(self, name: str) -> ExperimentConfig:
        """A copy running controller ``name``: the configured parameters when it is the
        configured controller, its defaults otherwise (as ``palsctl run --controller``)."""
        if name == self.controller_name:
            return self
        _, config = _controller_config(name, {}, self.source)
        return dataclasses.replace(self, controller_name=name,
                                   controller_params=_config_params(config))

    def to_dict(self) -> dict[str, Any]:
        """The resolved experiment as TOML-ready tables: defaults filled in, None left out,
        the controller's Config in full, file paths as resolved (relative to the data folder
        when they lie there, so the config works on another machine). `experiment_from_dict`
        (and `load_experiment` of `to_toml`'s text) reads it back to an equal config."""
        from palsctl.paths import data_relative

        _, controller = _controller_config(self.controller_name, self.controller_params,
                                           self.source)
        top: dict[str, Any] = {"name": self.name, "duration_s": self.duration_s,
                               "dt_s": self.dt_s, "seed": self.seed}
        workload = dict(self.workload)
        if workload.get("path"):
            workload["path"] = data_relative(workload["path"])
        setpoint = {k: v.model_dump() if isinstance(v, BaseModel) else v
                    for k, v in self.setpoint.items()}
        for spec in setpoint.values():
            if isinstance(spec, dict) and "grid" in spec:
                spec["grid"] = data_relative(spec["grid"])
        return _plain({
            **top, "plant": self.plant, "workload": workload, "setpoint": setpoint,
            "controller": {"name": self.controller_name, **_config_params(controller)},
            "guard": {"enabled": self.guard_enabled, **dataclasses.asdict(self.guard)},
        })

    def to_toml(self, header: str = RESOLVED_HEADER) -> str:
        """`to_dict` as TOML text, after ``header`` (comment lines)."""
        return header + tomli_w.dumps(self.to_dict())

    def data_files(self) -> list[str]:
        """The data files the experiment reads (the trace, grid signals), as resolved."""
        files = [self.workload["path"]] if self.workload.get("path") else []
        return files + [s.grid for s in self.setpoint.values() if isinstance(s, GridSchedule)]


def _plain(x: Any) -> Any:
    """TOML-ready: None dropped from tables, tuples as lists."""
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _config_params(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.init and getattr(config, f.name) is not None}


# ---- validation ------------------------------------------------------------------------------
class _Check:
    """Collects the errors of one document (file ``file``)."""

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.errors: list[ConfigError] = []

    def err(self, key: str, msg: str, value: Any = None) -> None:
        self.errors.append(ConfigError(msg, file=self.file, key=key, value=value))

    def table(self, model: type[BaseModel], raw: Any, key: str, **kw: Any) -> Any:
        obj, errors = validate_table(model, raw, file=self.file, prefix=key, **kw)
        self.errors += errors
        return obj

    def resolve_file(self, key: str, value: str, base_dir: Path | None) -> str | None:
        p = Path(value).expanduser()
        candidates = [p]
        if not p.is_absolute():
            from palsctl.paths import data_dir

            d = data_dir()
            candidates = ([base_dir / p] if base_dir is not None else []) \
                + ([d / p] if d is not None else []) + [p]
        for c in candidates:
            if c.is_file():
                return str(c.absolute())
        from palsctl.datasets import DATASETS
        from palsctl.paths import fetch_hint

        hint = f"; {fetch_hint(value)}" if p.parts and p.parts[0] in DATASETS else ""
        self.err(key, f"file not found (looked beside the config and in the data folder){hint}",
                 value)
        return None


def experiment_from_dict(raw: dict[str, Any], *, file: str | None = None,
                         base_dir: Path | None = None) -> ExperimentConfig:
    """Validate a parsed experiment TOML document (see the module doc for the schema).

    Parameters
    ----------
    raw : dict
        The parsed document.
    file : str or None
        The file it came from (named in the errors).
    base_dir : Path or None
        Where relative paths (traces, grid signals, model files) start.

    Returns
    -------
    ExperimentConfig
        The validated experiment.

    Raises
    ------
    ConfigError
        Every error found, one line each.
    """
    return _experiment(raw, file=file, base_dir=base_dir)


def _experiment(raw: Any, *, file: str | None, base_dir: Path | None,
                with_plant: bool = True, errors: list[ConfigError] | None = None,
                ) -> ExperimentConfig:
    """The validator behind `experiment_from_dict`; ``with_plant=False`` for a control config
    (its plant is the real server: no ``[plant]`` checks); ``errors`` found elsewhere in the
    same file are reported with this document's."""
    c = _Check(file)
    if errors:
        c.errors += errors
    if not isinstance(raw, Mapping):
        raise ConfigError("must be a table of tables", file=file, value=raw)
    top = c.table(_Top, raw, "")

    def section(name: str) -> dict[str, Any]:
        x = raw.get(name, {})
        return x if isinstance(x, dict) else {}   # not a table: reported by _Top

    plant = _plant(c, section("plant"), check=with_plant)
    workload = _workload(c, section("workload"), base_dir)
    wkind = workload["kind"] if workload is not None else None
    setpoint = _setpoint(c, section("setpoint"), base_dir, plant=plant, workload_kind=wkind)

    craw = raw.get("controller")
    cname, cparams = None, None
    if isinstance(craw, dict):
        cname, cparams = _controller(c, craw)
    graw = section("guard")
    genabled = graw.get("enabled", True)
    if not isinstance(genabled, bool):
        c.err("guard.enabled", "must be true or false", genabled)
    guard = None
    try:
        guard = GuardConfig.from_dict({k: x for k, x in graw.items() if k != "enabled"},
                                      file=file, section="guard")
    except ConfigError as exc:
        c.errors += exc.errors

    if top is not None and top.duration_s < top.dt_s:
        c.err("duration_s", f"must be at least dt_s ({top.dt_s:g} s)", top.duration_s)
    if c.errors:
        raise ConfigError.collect(c.errors)
    assert top is not None and plant is not None and workload is not None
    assert setpoint is not None and cname is not None and guard is not None
    return ExperimentConfig(
        name=top.name, duration_s=top.duration_s, dt_s=top.dt_s, seed=top.seed, plant=plant,
        workload=workload, setpoint=setpoint, controller_name=cname,
        controller_params=cparams or {}, guard_enabled=genabled, guard=guard, source=file,
        base_dir=base_dir)


def _plant(c: _Check, raw: dict[str, Any], *, check: bool) -> dict[str, Any] | None:
    p = c.table(PlantTable, raw, "plant")
    if p is None:
        return None
    if not check:
        return p.model_dump()
    from palsctl.registry import available

    if p.kind not in available("plant"):
        c.err("plant.kind", f"unknown plant; known: {', '.join(available('plant'))}", p.kind)
    elif p.kind == "sim":
        from palsctl.plants.sim import check_fits, get_gpu, get_model

        known = True
        for key, getter in (("model", get_model), ("gpu", get_gpu)):
            try:
                getter(getattr(p, key))
            except UnknownNameError as exc:
                c.errors.append(_unknown_name(exc, file=c.file, key=f"plant.{key}"))
                known = False
        if known:
            try:
                check_fits(p.model, p.gpu, p.num_gpus, p.parallelism)
            except ConfigError as exc:
                c.err("plant.num_gpus", exc.message, p.num_gpus)
            _check_sim_limits(c, p)
    return p.model_dump()


def _check_sim_limits(c: _Check, p: PlantTable) -> None:
    """The simulated plant's own limits on ``[plant]`` (its constructor's checks, found while
    the file is validated, under their dotted keys)."""
    from palsctl.plants.sim import get_gpu
    from palsctl.plants.sim.steady import MAX_NUM_BATCHED_TOKENS

    g = get_gpu(p.gpu)
    if p.max_batch_launch > MAX_NUM_BATCHED_TOKENS:
        c.err("plant.max_batch_launch", f"must not exceed vLLM's max_num_batched_tokens "
              f"({MAX_NUM_BATCHED_TOKENS})", p.max_batch_launch)
    if p.power_cap_w is not None and not g.min_cap_w <= p.power_cap_w <= g.tdp_w:
        c.err("plant.power_cap_w", f"outside the power limits of {g.name} "
              f"[{g.min_cap_w:g}, {g.tdp_w:g}] W", p.power_cap_w)
    if p.max_batch is not None and p.max_batch > p.max_batch_launch:
        c.err("plant.max_batch", f"must not exceed plant.max_batch_launch ({p.max_batch_launch})",
              p.max_batch)


def _workload(c: _Check, raw: dict[str, Any], base_dir: Path | None) -> dict[str, Any] | None:
    kind = raw.get("kind", "none")
    if not isinstance(kind, str) or kind not in _WORKLOADS:
        c.err("workload.kind", f"must be one of {', '.join(_WORKLOADS)}", kind)
        return None
    w = c.table(_WORKLOADS[kind], {**raw, "kind": kind}, "workload")
    if w is None:
        return None
    out = w.model_dump()
    if kind == "none":
        return out
    if w.rate_req_s is not None and w.load is not None:
        c.err("workload.load", "give rate_req_s or load, not both", w.load)
    if kind == "poisson" and w.rate_req_s is None and w.load is None:
        c.err("workload.rate_req_s", "poisson needs rate_req_s or load")
    if kind == "mmpp":
        if len(w.rates_req_s) != len(w.mean_dwell_s):
            c.err("workload.mean_dwell_s", "needs as many entries as rates_req_s",
                  list(w.mean_dwell_s))
        if not any(r > 0 for r in w.rates_req_s):
            c.err("workload.rates_req_s", "needs a positive rate", list(w.rates_req_s))
    if kind == "trace":
        out["path"] = c.resolve_file("workload.path", w.path, base_dir)
    return out


def _setpoint(c: _Check, raw: dict[str, Any], base_dir: Path | None, *,
              plant: dict[str, Any] | None, workload_kind: str | None,
              ) -> dict[str, SetpointSpec] | None:
    out: dict[str, SetpointSpec] = {}
    n_errors = len(c.errors)
    for name, x in raw.items():
        key = f"setpoint.{name}"
        if name not in SETPOINT_FIELDS:
            c.errors.append(unknown_key(key, x, SETPOINT_FIELDS, file=c.file))
            continue
        spec = _setpoint_value(c, key, x, base_dir)
        if spec is not None:
            out[name] = spec
    if out.get("throughput_tok_s") == "demand" and workload_kind == "none":
        c.err("setpoint.throughput_tok_s", '"demand" needs a workload', "demand")
    budget = out.get("power_budget_w")
    if budget is not None and plant is not None and plant["kind"] == "sim":
        _check_budget_floor(c, budget, plant)
    return out if len(c.errors) == n_errors else None


def setpoint_value(x: Any, *, key: str, file: str | None = None,
                   base_dir: Path | None = None) -> SetpointSpec:
    """Validate one setpoint value given at ``key`` (a number, ``"demand"`` when ``key`` ends
    in ``throughput_tok_s``, or a schedule table) as in ``[setpoint]``: a float, ``"demand"``
    or a schedule spec (its ``schedule`` built). Raises `ConfigError` with every error."""
    c = _Check(file)
    spec = _setpoint_value(c, key, x, base_dir)
    if c.errors:
        raise ConfigError.collect(c.errors)
    assert spec is not None
    return spec


def _setpoint_value(c: _Check, key: str, x: Any, base_dir: Path | None) -> SetpointSpec | None:
    """A setpoint value: a number, "demand" (throughput only) or a schedule table."""
    throughput = key.endswith(".throughput_tok_s")
    if isinstance(x, dict):
        kinds = [k for k in _SCHEDULES if k in x]
        if len(kinds) != 1:
            c.err(key, "a schedule table needs exactly one of constant, steps, ramp, grid", x)
            return None
        kind = kinds[0]
        spec = c.table(_SCHEDULES[kind], x, key)
        if spec is None:
            return None
        if isinstance(spec, ConstantSchedule):
            return spec.constant
        if isinstance(spec, GridSchedule):
            if spec.min_w > spec.max_w:
                c.err(f"{key}.min_w", "must be <= max_w", spec.min_w)
                return None
            path = c.resolve_file(f"{key}.grid", spec.grid, base_dir)
            if path is None:
                return None
            spec = spec.model_copy(update={"grid": path})
        try:
            _ = spec.schedule  # build it now: its checks (times from 0, increasing; the file)
        except ConfigError as exc:
            value = spec.grid if isinstance(spec, GridSchedule) else x[kind]
            c.err(f"{key}.{kind}", exc.message, value)
            return None
        return spec
    if x == "demand" and throughput:
        return "demand"
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        if not math.isfinite(x):
            c.err(key, "must be a finite number", x)
        elif x < 0:
            c.err(key, "must be >= 0", x)
        else:
            return float(x)
        return None
    c.err(key, "must be a number or a schedule table" + (' or "demand"' if throughput else ""), x)
    return None


def _check_budget_floor(c: _Check, budget: SetpointSpec, plant: dict[str, Any]) -> None:
    """A budget the plant cannot go under: every GPU at its minimum cap."""
    from palsctl.plants.sim import get_gpu

    try:
        min_cap_w = get_gpu(plant["gpu"]).min_cap_w
    except UnknownNameError:
        return  # reported with the plant
    floor_w = plant["num_gpus"] * min_cap_w
    lowest = _lowest(budget)
    if lowest is not None and lowest < floor_w:
        c.err("setpoint.power_budget_w",
              f"goes down to {lowest:g} W, below the plant's floor of {floor_w:g} W "
              f"({plant['num_gpus']} x {plant['gpu']} at the minimum cap {min_cap_w:g} W)",
              budget if isinstance(budget, (float, str)) else _plain(budget.model_dump()))


def _controller(c: _Check, raw: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    if "name" not in raw:
        c.err("controller.name", "missing required key")
        return None, None
    name = raw["name"]
    if not isinstance(name, str) or not name:
        c.err("controller.name", "must be a non-empty string", name)
        return None, None
    try:
        _, config = _controller_config(name, {k: x for k, x in raw.items() if k != "name"},
                                       c.file)
    except ConfigError as exc:
        c.errors += exc.errors
        return None, None
    return name, _config_params(config)


def _unknown_name(exc: UnknownNameError, *, file: str | None, key: str) -> ConfigError:
    hint = did_you_mean(exc.name, exc.known)
    return ConfigError(f"unknown {exc.kind}; {hint}known: {', '.join(exc.known)}", file=file,
                       key=key, value=exc.name)


def _controller_config(name: str, params: dict[str, Any], file: str | None):
    """(class, validated Config) of the controller registered as ``name``."""
    from palsctl.registry import resolve

    try:
        cls = resolve(name, "controller")
    except UnknownNameError as exc:
        raise _unknown_name(exc, file=file, key="controller.name") from None
    except ImportError as exc:
        raise ConfigError(f"controller {name!r} cannot be imported ({exc})", file=file,
                          key="controller.name") from None
    return cls, cls.Config.from_dict(params, file=file, section="controller")


# ---- the [serving] table of `palsctl control` ----------------------------------------------
def _http_url(x: str) -> str:
    if not x.startswith(("http://", "https://")):
        raise ValueError("must be an http(s) URL")
    return x


Url = Annotated[str, Strict(), AfterValidator(_http_url)]


class ServingTable(_Table):
    """``[serving]`` of a ``palsctl control`` config: where the real (or emulated) server's
    metrics, power and batch knobs are (see `palsctl.experiment.serving`)."""

    metrics_url: Url
    model_name: Text | None = None
    power: Literal["nvml", "emulator"] = "nvml"
    emulator_url: Url | None = None
    gpus: Annotated[list[_Count0], Field(min_length=1)] | None = None
    batch: Literal["gateway", "scheduler", "none"] = "none"
    gateway_control_url: Url | None = None
    gateway_token_file: Text | None = None
    batch_file: Text | None = None
    max_batch_launch: _BatchCount = 256
    model: Text | None = None
    gpu: Text | None = None
    prompt_tokens_mean: Positive | None = None
    output_tokens_mean: Positive | None = None
    metrics_timeout_s: Annotated[Positive, Field(le=60)] = 2.0


def _serving(c: _Check, raw: Any, base_dir: Path | None) -> dict[str, Any] | None:
    s = c.table(ServingTable, raw, "serving")
    if isinstance(raw, Mapping):  # a knob's companion key, whatever else is wrong
        for key, knob, value in (("emulator_url", "power", "emulator"),
                                 ("gateway_control_url", "batch", "gateway"),
                                 ("batch_file", "batch", "scheduler")):
            if raw.get(knob, ServingTable.model_fields[knob].default) == value \
                    and raw.get(key) is None:
                c.err(f"serving.{key}", f"missing required key (for {knob} = {value!r})")
    if s is None:
        return None
    out = s.model_dump()
    for key in ("gateway_token_file", "batch_file"):
        if out[key] is not None and base_dir is not None and not Path(out[key]).is_absolute():
            out[key] = str(Path(base_dir) / out[key])
    return out


def serving_from_dict(raw: Any, *, file: str | None, base_dir: Path | None = None,
                      ) -> dict[str, Any]:
    """Validate a ``[serving]`` table, every error reported at once.

    Parameters
    ----------
    raw : dict
        The table.
    file : str or None
        The file it came from (named in the errors).
    base_dir : Path or None
        Where the relative file paths (token file, batch file) start.

    Returns
    -------
    dict
        The table with its defaults filled in and its file paths resolved.

    Raises
    ------
    ConfigError
        Every error found, one line each.
    """
    c = _Check(file)
    out = _serving(c, raw, base_dir)
    if c.errors:
        raise ConfigError.collect(c.errors)
    assert out is not None  # None only with errors
    return out


def control_from_dict(raw: Any, *, file: str | None = None, base_dir: Path | None = None,
                      ) -> tuple[ExperimentConfig, dict[str, Any]]:
    """Validate a ``palsctl control`` document, every error reported at once.

    It holds ``[serving]`` and the experiment's ``[setpoint]``, ``[controller]``, ``[guard]``:
    no ``[plant]`` and no ``[workload]`` (the server is the plant and its load comes from
    outside); ``duration_s`` is optional (None: until stopped).

    Parameters
    ----------
    raw : dict
        The parsed TOML document.
    file : str or None
        The file it came from (named in the errors).
    base_dir : Path or None
        Where relative paths start.

    Returns
    -------
    config : ExperimentConfig
        The experiment part.
    serving : dict
        The validated ``[serving]`` table.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError("must be a table of tables", file=file, value=raw)
    c = _Check(file)
    if "plant" in raw:
        c.err("plant", "a control config has [serving], not [plant]")
    if "workload" in raw:
        c.err("workload", "a control config has no [workload] (the load comes from outside)")
    serving = None
    if "serving" not in raw:
        c.err("serving", "missing required table")
    else:
        serving = _serving(c, raw["serving"], base_dir)
    doc = {k: v for k, v in raw.items() if k not in ("serving", "plant", "workload")}
    duration = doc.get("duration_s")
    if duration is None:
        dt = doc.get("dt_s", 1.0)
        ok = isinstance(dt, (int, float)) and not isinstance(dt, bool)
        doc["duration_s"] = max(dt, 1.0) if ok else 1.0
    cfg = _experiment(doc, file=file, base_dir=base_dir, with_plant=False, errors=c.errors)
    assert serving is not None
    return (cfg.with_overrides(duration_s=None) if duration is None else cfg), serving


def load_experiment(path: str | Path | None = None) -> ExperimentConfig:
    """Load and validate an experiment TOML file.

    Parameters
    ----------
    path : str, Path or None
        The file (None: the embedded default experiment).

    Returns
    -------
    ExperimentConfig
        The validated experiment.

    Raises
    ------
    ConfigError
        Every error found, one line each (file, dotted key, value).
    """
    if path is None:
        return experiment_from_dict(tomllib.loads(DEFAULT_EXPERIMENT_TOML), file=DEFAULT_SOURCE)
    p = Path(path)
    return experiment_from_dict(read_toml(p), file=str(p), base_dir=p.resolve().parent)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file.

    Parameters
    ----------
    path : str or Path
        The file.

    Returns
    -------
    dict
        The document.

    Raises
    ------
    ConfigError
        When the file is missing, unreadable or not valid TOML (naming it).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config file not found", file=str(p))
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=str(p)) from None
