"""Wiring a real (or emulated) serving deployment from a ``palsctl control`` config: the
``[serving]`` schema, the gateway token, opening the power source, metrics sensor and batch
actuator as a `ServingPlant`."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from palsctl.adapters.vllm_metrics import VllmMetricsSensor
from palsctl.errors import ConfigError
from palsctl.experiment.schema import experiment_from_dict, read_toml
from palsctl.plants.serving import ServingPlant
from palsctl.types import PlantInfo

log = logging.getLogger(__name__)

CONTROL_EXAMPLE_TOML = """\
# palsctl control CONFIG: the closed loop against a real (or emulated) vLLM server.
name = "serving"
dt_s = 1.0
# duration_s = 600.0        # omit: run until SIGINT/SIGTERM

[serving]
metrics_url = "http://127.0.0.1:8000/metrics"
power = "nvml"              # "nvml" (real GPUs) or "emulator" (palsctl emulate)
# gpus = [0, 1, 2, 3]       # NVML indices (default: all)
# emulator_url = "http://127.0.0.1:8000"
batch = "gateway"           # "gateway", "scheduler" (vLLM --scheduler-cls plugin) or "none"
gateway_control_url = "http://127.0.0.1:8081"
gateway_token_file = "gateway.token"
# batch_file = "/run/palsctl/batch"   # for batch = "scheduler"
max_batch_launch = 256      # the server's --max-num-seqs

[setpoint]
power_budget_w = 2400.0

[controller]
name = "cap-to-budget"
"""

_SERVING_KEYS = {"metrics_url", "model_name", "power", "emulator_url", "gpus", "batch",
                 "gateway_control_url", "gateway_token_file", "batch_file", "max_batch_launch",
                 "model", "gpu", "prompt_tokens_mean", "output_tokens_mean", "metrics_timeout_s"}


def parse_serving(raw: Any, *, file: str | None, base_dir: Any = None) -> dict[str, Any]:
    """Validate a ``[serving]`` table (strict: unknown keys, wrong types and missing companions
    raise `ConfigError` naming the file, the key and the value)."""
    def err(key: str, msg: str, value: Any = None) -> ConfigError:
        return ConfigError(msg, file=file, key=f"serving.{key}", value=value)

    if not isinstance(raw, dict):
        raise ConfigError("must be a table", file=file, key="serving", value=raw)
    for k in raw:
        if k not in _SERVING_KEYS:
            raise err(k, f"unknown key; known: {', '.join(sorted(_SERVING_KEYS))}", raw[k])
    out: dict[str, Any] = {}

    def url(key: str, required: bool) -> str | None:
        v = raw.get(key)
        if v is None:
            if required:
                raise err(key, "missing required key")
            return None
        if not isinstance(v, str) or not v.startswith(("http://", "https://")):
            raise err(key, "must be an http(s) URL", v)
        return v

    def choice(key: str, choices: tuple[str, ...], default: str) -> str:
        v = raw.get(key, default)
        if v not in choices:
            raise err(key, f"must be one of {', '.join(choices)}", v)
        return v

    def path(key: str, required: bool) -> str | None:
        v = raw.get(key)
        if v is None:
            if required:
                raise err(key, "missing required key")
            return None
        if not isinstance(v, str) or not v:
            raise err(key, "must be a file path", v)
        p = Path(v)
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        return str(p)

    out["metrics_url"] = url("metrics_url", True)
    out["power"] = choice("power", ("nvml", "emulator"), "nvml")
    out["emulator_url"] = url("emulator_url", out["power"] == "emulator")
    gpus = raw.get("gpus")
    if gpus is not None and (not isinstance(gpus, list) or not gpus or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in gpus)):
        raise err("gpus", "must be a non-empty list of GPU indices", gpus)
    out["gpus"] = gpus
    out["batch"] = choice("batch", ("gateway", "scheduler", "none"), "none")
    out["gateway_control_url"] = url("gateway_control_url", out["batch"] == "gateway")
    out["gateway_token_file"] = path("gateway_token_file", False)
    out["batch_file"] = path("batch_file", out["batch"] == "scheduler")
    mbl = raw.get("max_batch_launch", 256)
    if isinstance(mbl, bool) or not isinstance(mbl, int) or not 1 <= mbl <= 65536:
        raise err("max_batch_launch", "must be an integer in [1, 65536]", mbl)
    out["max_batch_launch"] = mbl
    for key in ("model_name", "model", "gpu"):
        v = raw.get(key)
        if v is not None and (not isinstance(v, str) or not v):
            raise err(key, "must be a non-empty string", v)
        out[key] = v
    for key in ("prompt_tokens_mean", "output_tokens_mean"):
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise err(key, "must be a positive number of tokens", v)
        out[key] = None if v is None else float(v)
    t = raw.get("metrics_timeout_s", 2.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 60:
        raise err("metrics_timeout_s", "must be a number of seconds in (0, 60]", t)
    out["metrics_timeout_s"] = float(t)
    return out


def gateway_token(serving: dict[str, Any], *, file: str | None) -> str:
    """The gateway control token: ``gateway_token_file``, else $PALSCTL_GATEWAY_TOKEN."""
    path = serving.get("gateway_token_file")
    if path:
        try:
            token = open(path).read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file: {exc.strerror}", file=file,
                              key="serving.gateway_token_file", value=path) from None
        if token:
            return token
        raise ConfigError("token file is empty", file=file, key="serving.gateway_token_file",
                          value=path)
    token = os.environ.get("PALSCTL_GATEWAY_TOKEN", "")
    if not token:
        raise ConfigError("batch = \"gateway\" needs gateway_token_file or "
                          "$PALSCTL_GATEWAY_TOKEN", file=file, key="serving.gateway_token_file")
    return token


def build_serving_plant(serving: dict[str, Any], *, dt_s: float, dry_run: bool = False,
                        file: str | None = None) -> ServingPlant:
    """Open the power source, the metrics sensor and the batch actuator of a validated
    ``[serving]`` table. Anything opened is closed again (restored) if a later part fails."""
    opened: list[Any] = []
    try:
        if serving["power"] == "nvml":
            from palsctl.adapters.nvml import NvmlPower  # noqa: PLC0415
            power = NvmlPower(serving["gpus"], dry_run=dry_run, install_signal_handlers=False)
        else:
            from palsctl.adapters.emulator import EmulatorPower  # noqa: PLC0415
            power = EmulatorPower(serving["emulator_url"], dry_run=dry_run)
        opened.append(power)
        batch: Any = None
        if serving["batch"] == "gateway":
            from palsctl.adapters.gateway import GatewayBatchActuator, GatewayControl  # noqa
            ctl = GatewayControl(serving["gateway_control_url"], gateway_token(serving, file=file))
            batch = GatewayBatchActuator(ctl, launch_max=serving["max_batch_launch"],
                                         dry_run=dry_run)
        elif serving["batch"] == "scheduler":
            from palsctl.adapters.vllm_scheduler import BatchFileActuator  # noqa: PLC0415
            batch = BatchFileActuator(serving["batch_file"], launch_max=serving["max_batch_launch"],
                                      dry_run=dry_run)
        if batch is not None:
            opened.append(batch)
        sensor = VllmMetricsSensor(serving["metrics_url"], model_name=serving["model_name"],
                                   timeout_s=serving["metrics_timeout_s"])
        c = power.constraints[0]
        info = PlantInfo(model=serving["model"] or serving["model_name"] or "unknown",
                         gpu=serving["gpu"] or c.name or "unknown",
                         num_gpus=len(power.constraints), simulated=False,
                         prompt_tokens_mean=serving["prompt_tokens_mean"],
                         output_tokens_mean=serving["output_tokens_mean"],
                         extra={"dry_run": dry_run, "batch": serving["batch"],
                                "power": serving["power"]})
        return ServingPlant(metrics=sensor, power=power, batch=batch,
                            max_batch_launch=serving["max_batch_launch"], dt_s=dt_s, info=info)
    except BaseException:
        for part in reversed(opened):
            try:
                part.close()
            except Exception:  # noqa: BLE001
                log.exception("closing %s failed", type(part).__name__)
        raise


def load_control(path: str):
    """Parse a control TOML file → (ExperimentConfig for setpoint/controller/guard, serving)."""
    p = Path(path)
    raw = read_toml(p)
    if "plant" in raw:
        raise ConfigError("a control config has [serving], not [plant]", file=str(p),
                          key="plant")
    if "workload" in raw:
        raise ConfigError("a control config has no [workload] (the load comes from outside)",
                          file=str(p), key="workload")
    if "serving" not in raw:
        raise ConfigError("missing required table", file=str(p), key="serving")
    serving = parse_serving(raw.pop("serving"), file=str(p), base_dir=p.resolve().parent)
    duration = raw.get("duration_s")
    exp_raw = dict(raw)
    exp_raw["duration_s"] = duration if duration is not None else max(raw.get("dt_s", 1.0), 1.0)
    cfg = experiment_from_dict(exp_raw, file=str(p), base_dir=p.resolve().parent)
    if duration is None:
        cfg = cfg.with_overrides(duration_s=None)
    return cfg, serving
