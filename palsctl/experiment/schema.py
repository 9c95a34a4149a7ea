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
file, then to the shared data folder. Any unknown key, wrong type or out-of-range value raises
`ConfigError` naming the file, the key and the value.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from palsctl.errors import ConfigError, UnknownNameError
from palsctl.safety import GuardConfig

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A validated experiment. ``plant``, ``workload`` and ``setpoint`` hold the validated tables
    (defaults filled in); ``controller_params`` go to the controller's Config. ``source`` is the
    file it came from (for error messages), ``base_dir`` where relative paths start."""

    name: str
    duration_s: float
    dt_s: float
    seed: int
    plant: dict[str, Any]
    workload: dict[str, Any]
    setpoint: dict[str, Any]
    controller_name: str
    controller_params: dict[str, Any]
    guard_enabled: bool
    guard: GuardConfig
    source: str | None = None
    base_dir: Path | None = None

    def with_overrides(self, **changes: Any) -> "ExperimentConfig":
        """A copy with some fields replaced (``duration_s``, ``seed``, ``controller_name``...)."""
        return dataclasses.replace(self, **changes)


# ---- validation helpers ----------------------------------------------------------------------
class _V:
    """Validates one table against a spec: key -> (checker, default). ``...`` = required."""

    def __init__(self, file: str | None):
        self.file = file

    def err(self, key: str, msg: str, value: Any = None) -> ConfigError:
        return ConfigError(msg, file=self.file, key=key, value=value)

    def table(self, raw: Any, section: str, spec: dict[str, tuple[Callable, Any]]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.err(section, "must be a table", raw)
        for k in raw:
            if k not in spec:
                raise self.err(f"{section}.{k}" if section else k,
                               f"unknown key; known: {', '.join(sorted(spec))}", raw[k])
        out = {}
        for k, (check, default) in spec.items():
            key = f"{section}.{k}" if section else k
            if k in raw:
                out[k] = check(self, key, raw[k])
            elif default is ...:
                raise self.err(key, "missing required key")
            else:
                out[k] = default
        return out


def _num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         optional: bool = False):
    def check(v: _V, key: str, x: Any):
        if x is None and optional:
            return None
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise v.err(key, "must be a finite number", x)
        if lo is not None and (x < lo or (lo_open and x == lo)):
            raise v.err(key, f"must be {'>' if lo_open else '>='} {lo:g}", x)
        if hi is not None and x > hi:
            raise v.err(key, f"must be <= {hi:g}", x)
        return float(x)
    return check


def _int(lo: int = 0, hi: int | None = None):
    def check(v: _V, key: str, x: Any):
        if isinstance(x, bool) or not isinstance(x, int):
            raise v.err(key, "must be an integer", x)
        if x < lo or (hi is not None and x > hi):
            raise v.err(key, f"must be an integer in [{lo}, {hi if hi is not None else 'inf'}]", x)
        return x
    return check


def _str(choices: tuple[str, ...] | None = None):
    def check(v: _V, key: str, x: Any):
        if not isinstance(x, str) or not x:
            raise v.err(key, "must be a non-empty string", x)
        if choices is not None and x not in choices:
            raise v.err(key, f"must be one of {', '.join(choices)}", x)
        return x
    return check


def _bool(v: _V, key: str, x: Any):
    if not isinstance(x, bool):
        raise v.err(key, "must be true or false", x)
    return x


def _num_list(lo: float = 0.0, *, lo_open: bool = False):
    def check(v: _V, key: str, x: Any):
        if not isinstance(x, list) or not x:
            raise v.err(key, "must be a non-empty list of numbers", x)
        return tuple(_num(lo, lo_open=lo_open)(v, f"{key}[{i}]", e) for i, e in enumerate(x))
    return check


def _name(v: _V, key: str, x: Any):
    x = _str()(v, key, x)
    if "/" in x or "\\" in x or x in (".", ".."):
        raise v.err(key, "must be a plain name (it names the results folder)", x)
    return x


_PLANT_SPEC = {
    "kind": (_str(), "sim"),
    "model": (_str(), "mixtral-8x7b"),
    "gpu": (_str(), "a100-sxm4-80gb"),
    "num_gpus": (_int(1, 1024), 1),
    "max_batch_launch": (_int(1, 65536), 256),
    "power_cap_w": (_num(0, lo_open=True, optional=True), None),
    "max_batch": (_int(1, 65536), None),
    "noise": (_bool, True),
}
_LENGTHS_SPEC = {
    "prompt_tokens_mean": (_num(1), 512.0),
    "prompt_tokens_sigma": (_num(0, 5), 0.0),
    "prompt_tokens_max": (_int(1), 1_000_000),
    "output_tokens_mean": (_num(1), 256.0),
    "output_tokens_sigma": (_num(0, 5), 0.0),
    "output_tokens_max": (_int(1), 1_000_000),
}
_RATE_SPEC = {
    "rate_req_s": (_num(0, lo_open=True), None),
    "load": (_num(0, 10, lo_open=True), None),
}
_WORKLOAD_SPECS: dict[str, dict[str, tuple[Callable, Any]]] = {
    "none": {},
    "azure-conv": dict(_RATE_SPEC),
    "poisson": {**_RATE_SPEC, **_LENGTHS_SPEC},
    "mmpp": {**_RATE_SPEC, **_LENGTHS_SPEC, "rates_req_s": (_num_list(0), ...),
             "mean_dwell_s": (_num_list(0, lo_open=True), ...)},
    "trace": {**_RATE_SPEC, "path": (_str(), ...),
              "format": (_str(("auto", "azure", "mooncake")), "auto"),
              "start_s": (_num(0), 0.0), "window_s": (_num(0, lo_open=True, optional=True), None),
              "repeat": (_bool, False), "lenient": (_bool, False)},
}
_SETPOINT_FIELDS = ("throughput_tok_s", "tpot_slo_s", "ttft_slo_s", "power_budget_w",
                    "power_target_w")


def _schedule_spec(v: _V, key: str, x: Any, base_dir: Path | None) -> Any:
    """Validate a setpoint value: number | "demand" | {steps|ramp|grid = ...}."""
    if isinstance(x, str):
        if x == "demand" and key.endswith("throughput_tok_s"):
            return "demand"
        raise v.err(key, "must be a number or a schedule table"
                    + (' or "demand"' if key.endswith("throughput_tok_s") else ""), x)
    if isinstance(x, dict):
        kinds = [k for k in ("constant", "steps", "ramp", "grid") if k in x]
        if len(kinds) != 1:
            raise v.err(key, "a schedule table needs exactly one of constant, steps, ramp, grid", x)
        kind = kinds[0]
        if kind == "constant":
            v.table(x, key, {"constant": (_num(0), ...)})
            return float(x["constant"])
        if kind in ("steps", "ramp"):
            v.table(x, key, {kind: (lambda *a: a[2], ...)})
            pts = x[kind]
            if not isinstance(pts, list) or not pts or not all(
                    isinstance(p, list) and len(p) == 2 for p in pts):
                raise v.err(f"{key}.{kind}", "must be a list of [t_s, value] pairs", pts)
            for i, p in enumerate(pts):
                _num(0)(v, f"{key}.{kind}[{i}]", p[0])
                _num(0)(v, f"{key}.{kind}[{i}]", p[1])
            from palsctl.workloads.budgets import Ramp, Steps
            try:
                (Steps if kind == "steps" else Ramp)(pts)
            except ConfigError as exc:
                raise v.err(f"{key}.{kind}", str(exc), pts) from None
            return {kind: [(float(a), float(b)) for a, b in pts]}
        spec = v.table(x, key, {"grid": (_str(), ...), "min_w": (_num(0), ...),
                                "max_w": (_num(0), ...), "column": (_str(), None),
                                "invert": (_bool, False), "speedup": (_num(0, lo_open=True), 1.0),
                                "start_s": (_num(0), 0.0)})
        if spec["min_w"] > spec["max_w"]:
            raise v.err(f"{key}.min_w", "must be <= max_w", spec["min_w"])
        spec["grid"] = str(_resolve_file(v, f"{key}.grid", spec["grid"], base_dir))
        return spec
    return _num(0)(v, key, x)


def _resolve_file(v: _V, key: str, value: str, base_dir: Path | None) -> Path:
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else []
    if not p.is_absolute():
        if base_dir is not None:
            candidates.append(base_dir / p)
        from palsctl.paths import data_dir
        d = data_dir()
        if d is not None:
            candidates.append(d / p)
        candidates.append(p)
    for c in candidates:
        if c.is_file():
            return c
    raise v.err(key, "file not found (looked beside the config and in the data folder)", value)


def experiment_from_dict(raw: dict[str, Any], *, file: str | None = None,
                         base_dir: Path | None = None) -> ExperimentConfig:
    """Validate a parsed TOML document (see the module doc for the schema)."""
    v = _V(file)
    top = v.table(raw, "", {
        "name": (_name, "experiment"), "duration_s": (_num(0, 1e7, lo_open=True), ...),
        "dt_s": (_num(0, 3600, lo_open=True), 1.0), "seed": (_int(0), 0),
        "plant": (lambda *a: a[2], {}), "workload": (lambda *a: a[2], {"kind": "none"}),
        "setpoint": (lambda *a: a[2], {}), "controller": (lambda *a: a[2], ...),
        "guard": (lambda *a: a[2], {}),
    })
    if top["duration_s"] < top["dt_s"]:
        raise v.err("duration_s", f"must be at least dt_s ({top['dt_s']:g} s)", top["duration_s"])
    plant = v.table(top["plant"], "plant", _PLANT_SPEC)
    _check_plant_names(v, plant)

    wraw = top["workload"]
    if not isinstance(wraw, dict):
        raise v.err("workload", "must be a table", wraw)
    kind = _str(tuple(_WORKLOAD_SPECS))(v, "workload.kind", wraw.get("kind", "none"))
    workload = v.table({k: x for k, x in wraw.items() if k != "kind"}, "workload",
                       _WORKLOAD_SPECS[kind])
    workload["kind"] = kind
    if kind != "none":
        if workload.get("rate_req_s") is not None and workload.get("load") is not None:
            raise v.err("workload.load", "give rate_req_s or load, not both", workload["load"])
        if kind == "poisson" and workload["rate_req_s"] is None and workload["load"] is None:
            raise v.err("workload.rate_req_s", "poisson needs rate_req_s or load")
        if kind == "mmpp" and len(workload["rates_req_s"]) != len(workload["mean_dwell_s"]):
            raise v.err("workload.mean_dwell_s", "needs as many entries as rates_req_s",
                        list(workload["mean_dwell_s"]))
        if kind == "mmpp" and not any(r > 0 for r in workload["rates_req_s"]):
            raise v.err("workload.rates_req_s", "needs a positive rate",
                        list(workload["rates_req_s"]))
        if kind == "trace":
            workload["path"] = str(_resolve_file(v, "workload.path", workload["path"], base_dir))

    sraw = top["setpoint"]
    if not isinstance(sraw, dict):
        raise v.err("setpoint", "must be a table", sraw)
    setpoint: dict[str, Any] = {}
    for k, x in sraw.items():
        if k not in _SETPOINT_FIELDS:
            raise v.err(f"setpoint.{k}", f"unknown key; known: {', '.join(_SETPOINT_FIELDS)}", x)
        setpoint[k] = _schedule_spec(v, f"setpoint.{k}", x, base_dir)
    if setpoint.get("throughput_tok_s") == "demand" and kind == "none":
        raise v.err("setpoint.throughput_tok_s", '"demand" needs a workload', "demand")

    craw = top["controller"]
    if not isinstance(craw, dict):
        raise v.err("controller", "must be a table", craw)
    if "name" not in craw:
        raise v.err("controller.name", "missing required key")
    cname = _str()(v, "controller.name", craw["name"])
    cparams = {k: x for k, x in craw.items() if k != "name"}
    _controller_config(cname, cparams, file)  # validate now: unknown names / keys are errors

    graw = top["guard"]
    if not isinstance(graw, dict):
        raise v.err("guard", "must be a table", graw)
    genabled = _bool(v, "guard.enabled", graw.get("enabled", True))
    try:
        guard = GuardConfig.from_dict({k: x for k, x in graw.items() if k != "enabled"},
                                      file=file, section="guard")
    except ConfigError as exc:
        if exc.file is None:
            raise ConfigError(str(exc).split(": ", 1)[-1], file=file, key=exc.key) from None
        raise

    return ExperimentConfig(
        name=top["name"], duration_s=top["duration_s"], dt_s=top["dt_s"], seed=top["seed"],
        plant=plant, workload=workload, setpoint=setpoint, controller_name=cname,
        controller_params=cparams, guard_enabled=genabled, guard=guard, source=file,
        base_dir=base_dir)


def _check_plant_names(v: _V, plant: dict[str, Any]) -> None:
    from palsctl.registry import available

    if plant["kind"] not in available("plant"):
        raise v.err("plant.kind", f"unknown plant; known: {', '.join(available('plant'))}",
                    plant["kind"])
    if plant["kind"] != "sim":
        return
    from palsctl.plants.sim import get_gpu, get_model

    for key, getter in (("model", get_model), ("gpu", get_gpu)):
        try:
            getter(plant[key])
        except UnknownNameError as exc:
            raise ConfigError(str(exc), file=v.file, key=f"plant.{key}") from None


def _controller_config(name: str, params: dict[str, Any], file: str | None):
    from palsctl.registry import resolve

    try:
        cls = resolve(name, "controller")
    except UnknownNameError as exc:
        raise ConfigError(str(exc), file=file, key="controller.name") from None
    except ImportError as exc:
        raise ConfigError(f"controller {name!r} cannot be imported ({exc})", file=file,
                          key="controller.name") from None
    try:
        return cls, cls.Config.from_dict(params, file=file, section="controller")
    except ConfigError as exc:
        if exc.file is None and file is not None:
            raise ConfigError(str(exc), file=file) from None
        raise


def load_experiment(path: str | Path | None = None) -> ExperimentConfig:
    """Load and validate an experiment TOML file (None: the embedded default experiment)."""
    if path is None:
        return experiment_from_dict(tomllib.loads(DEFAULT_EXPERIMENT_TOML), file=DEFAULT_SOURCE)
    p = Path(path)
    return experiment_from_dict(read_toml(p), file=str(p), base_dir=p.resolve().parent)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing, unreadable or invalid file is a `ConfigError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config file not found", file=str(p))
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=str(p)) from None
