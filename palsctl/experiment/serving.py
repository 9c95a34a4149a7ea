"""Wiring a real (or emulated) serving deployment from a ``palsctl control`` config: the
``[serving]`` schema, the gateway token, restoring what a dead palsctl left behind
(`recover_settings`), opening the power source, metrics sensor and batch actuator as a
`ServingPlant`."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from palsctl.adapters.vllm_metrics import VllmMetricsSensor
from palsctl.errors import ConfigError
from palsctl.experiment.schema import control_from_dict, read_toml, serving_from_dict
from palsctl.plants.serving import BatchSource, PowerSource, ServingPlant
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

def parse_serving(raw: Any, *, file: str | None, base_dir: Any = None) -> dict[str, Any]:
    """Validate a ``[serving]`` table (`palsctl.experiment.schema.ServingTable`: unknown keys,
    wrong types and missing companions are reported at once, naming the file, the key and the
    value)."""
    return serving_from_dict(raw, file=file, base_dir=base_dir)


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
    power: PowerSource
    try:
        if serving["power"] == "nvml":
            from palsctl.adapters.nvml import NvmlPower
            power = NvmlPower(serving["gpus"], dry_run=dry_run, install_signal_handlers=False)
        else:
            from palsctl.adapters.emulator import EmulatorPower
            power = EmulatorPower(serving["emulator_url"], dry_run=dry_run)
        opened.append(power)
        batch: BatchSource | None = None
        if serving["batch"] == "gateway":
            from palsctl.adapters.batch import GatewayBatch
            from palsctl.adapters.gateway import GatewayControl
            ctl = GatewayControl(serving["gateway_control_url"], gateway_token(serving, file=file))
            batch = GatewayBatch(ctl, launch_max=serving["max_batch_launch"], dry_run=dry_run,
                                 token_file=serving.get("gateway_token_file"))
        elif serving["batch"] == "scheduler":
            from palsctl.adapters.vllm_scheduler import BatchFileActuator
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
            except Exception:
                log.exception("closing %s failed", type(part).__name__)
        raise


def target_keys(serving: dict[str, Any]) -> set[str]:
    """The claim keys (`palsctl.adapters.state.target_key`) of the targets a validated
    ``[serving]`` table will change, known before anything is opened (``nvml:*``: every GPU of
    the host, when ``gpus`` is not given)."""
    keys = set()
    if serving["power"] == "nvml":
        gpus = serving.get("gpus")
        keys |= {"nvml:*"} if not gpus else {f"nvml:{i}" for i in gpus}
    else:
        keys.add(f"emulator:{serving['emulator_url'].rstrip('/')}")
    if serving["batch"] == "gateway":
        keys.add(f"gateway:{serving['gateway_control_url'].rstrip('/')}")
    elif serving["batch"] == "scheduler":
        keys.add(f"batch_file:{Path(serving['batch_file']).resolve()}")
    return keys


def recover_settings(serving: dict[str, Any], *, state_dir: Any, dry_run: bool = False,
                     file: str | None = None) -> list[str]:
    """Before opening anything: restore the settings that a dead palsctl left on the targets of
    ``serving`` (its claim in ``state_dir``; see `palsctl.adapters.state`). Returns one line per
    claim found, saying what was restored (or, in a dry run, what is still in force). Raises
    `palsctl.adapters.state.ClaimConflict` when a live palsctl controls the same targets (a
    dry run only says so), and `palsctl.errors.ActuatorError` when the originals could not be
    written back (starting then would take the changed settings for originals)."""
    from palsctl.adapters.state import ClaimConflict, recover
    from palsctl.errors import ActuatorError

    token = None
    if serving["batch"] == "gateway":
        try:
            token = gateway_token(serving, file=file)
        except ConfigError:
            token = None
    lines = []
    try:
        found = recover(state_dir, target_keys(serving), token=token, restore=not dry_run)
    except ClaimConflict as exc:
        if not dry_run:
            raise
        return [f"{exc} (a dry run writes nothing: going on)"]
    for r in found:
        who = r.claim.describe()
        if dry_run:
            lines.append(f"settings left by {who}, which is gone, are still in force "
                         f"(dry run: not restored; run `palsctl restore`)")
        elif r.ok:
            lines.append(f"restored the settings left by {who}, which is gone: "
                         + "; ".join(r.restored))
        else:
            raise ActuatorError(f"could not restore the settings left by {who} "
                                f"(claim {r.claim.path}): " + "; ".join(r.failed))
    return lines


def load_control(path: str):
    """Parse a control TOML file → (ExperimentConfig for setpoint/controller/guard, serving)."""
    p = Path(path)
    return control_from_dict(read_toml(p), file=str(p), base_dir=p.resolve().parent)
