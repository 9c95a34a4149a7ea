"""`ServingPlant`: a real serving deployment as a palsctl `Plant` on the wall clock.

Sensor: power from NVML (`palsctl.adapters.nvml.NvmlPower`) or the emulator's stand-in
(`palsctl.emulator.EmulatorPower`) — the window's mean power comes from the energy counter
differenced over the window (the 1 s-average reading when a GPU has no counter) — plus a vLLM
``/metrics`` scrape (`palsctl.adapters.vllm_metrics.VllmMetricsSensor`) for throughput, queue
gauges, KV usage and p90 TTFT / inter-token latency from histogram deltas.

Actuator: the per-GPU power cap through the power source; the batch limit through the gateway
(`palsctl.adapters.gateway.GatewayBatchActuator`), the vLLM scheduler plugin's control file
(`palsctl.adapters.vllm_scheduler.BatchFileActuator`), or not at all (``batch=None``).

A read that fails (server or NVML unreachable) returns the last good values with
``stale=True`` so the safety guard can react; `close()` restores the power limits and the batch
limit found at open.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from palsctl.adapters.vllm_metrics import MetricsError, VllmMetricsSensor
from palsctl.errors import HardwareError
from palsctl.interfaces import Plant
from palsctl.types import Action, Limits, Measurement, PlantInfo

log = logging.getLogger(__name__)


class PowerSource(Protocol):
    """What `NvmlPower` and `EmulatorPower` provide."""

    constraints: list[Any]

    def read(self) -> list[Any]: ...
    def set_power_cap_w(self, power_cap_w: float) -> float: ...
    @property
    def power_cap_w(self) -> float: ...
    def close(self) -> None: ...


class BatchActuator(Protocol):
    """What `GatewayBatchActuator` and `BatchFileActuator` provide."""

    max_batch: int

    def set_max_batch(self, max_batch: int) -> int: ...
    def close(self) -> None: ...


class ServingPlant(Plant):
    """A real (or emulated) vLLM deployment on the wall clock.

    ``limits`` default to the power source's constraints (caps per GPU) and batch
    ``1..max_batch_launch``. ``clock``: monotonic seconds (injectable for tests).
    """

    def __init__(self, *, metrics: VllmMetricsSensor, power: PowerSource,
                 batch: BatchActuator | None = None, max_batch_launch: int = 256,
                 dt_s: float = 1.0, info: PlantInfo | None = None, limits: Limits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.power = power
        self.batch = batch
        self.dt_s = float(dt_s)
        c = power.constraints[0]
        n = len(power.constraints)
        self.limits = limits or Limits(
            power_cap_min_w=c.power_cap_min_w, power_cap_max_w=c.power_cap_max_w,
            power_cap_default_w=min(max(c.power_cap_default_w, c.power_cap_min_w),
                                    c.power_cap_max_w),
            power_cap_step_w=1.0, max_batch_min=1, max_batch_max=int(max_batch_launch),
            num_gpus=n)
        self.info = info or PlantInfo(model="unknown", gpu=c.name or "unknown", num_gpus=n,
                                      simulated=False)
        self._clock = clock
        self._t0 = clock()
        self._last_t = self._t0
        self._energy_j = 0.0
        self._last_counter: list[float | None] | None = None
        self._last: Measurement | None = None
        self._closed = False
        self.failures = 0
        # reference points for the first window
        try:
            self.metrics.prime()
        except MetricsError as exc:
            log.warning("metrics not readable yet: %s", exc)
        try:
            self._last_counter = [r.energy_j for r in self.power.read()]
        except HardwareError as exc:
            log.warning("power not readable yet: %s", exc)

    def _max_batch(self) -> int:
        return self.batch.max_batch if self.batch is not None else self.limits.max_batch_max

    def _power_window(self, window_s: float) -> tuple[float, float | None, list]:
        """(mean power over the window summed over GPUs, mean SM clock, counters) — nothing is
        committed until the whole read succeeded."""
        readings = self.power.read()
        counters = [r.energy_j for r in readings]
        avg_w = sum(r.power_avg_w for r in readings)
        power_w = avg_w
        prev = self._last_counter
        if prev is not None and len(prev) == len(counters) and window_s > 0 and \
                all(a is not None and b is not None for a, b in zip(prev, counters)):
            deltas = [b - a for a, b in zip(prev, counters)]
            if all(d >= 0 for d in deltas):            # a decrease: counter reset, use average
                power_w = sum(deltas) / window_s
        clocks = [r.sm_clock_mhz for r in readings if r.sm_clock_mhz is not None]
        return power_w, (sum(clocks) / len(clocks) if clocks else None), counters

    def read(self) -> Measurement:
        now = self._clock()
        window = max(now - self._last_t, 1e-9)
        try:
            power_w, clock, counters = self._power_window(window)
            w = self.metrics.read_window()
        except (MetricsError, HardwareError) as exc:
            self.failures += 1
            log.warning("sensor read failed (%s): reporting stale values", exc)
            last = self._last
            m = Measurement(
                t_s=now - self._t0, window_s=window,
                power_w=last.power_w if last else 0.0, energy_j=self._energy_j,
                throughput_tok_s=last.throughput_tok_s if last else 0.0,
                prompt_tok_s=last.prompt_tok_s if last else 0.0,
                running=last.running if last else 0, waiting=last.waiting if last else 0,
                kv_usage=last.kv_usage if last else 0.0,
                ttft_p90_s=last.ttft_p90_s if last else None,
                tpot_p90_s=last.tpot_p90_s if last else None,
                power_cap_w=self.power.power_cap_w, max_batch=self._max_batch(),
                sm_clock_mhz=last.sm_clock_mhz if last else None, stale=True)
            return m   # the next good read covers the whole gap (window since the last good)
        self._last_t = now
        self._last_counter = counters
        self._energy_j += max(power_w, 0.0) * window
        m = Measurement(
            t_s=now - self._t0, window_s=window, power_w=max(power_w, 0.0),
            energy_j=self._energy_j, throughput_tok_s=w.throughput_tok_s,
            prompt_tok_s=w.prompt_tok_s, running=w.running, waiting=w.waiting,
            kv_usage=w.kv_usage, ttft_p90_s=w.ttft_p90_s, tpot_p90_s=w.tpot_p90_s,
            power_cap_w=self.power.power_cap_w, max_batch=self._max_batch(), sm_clock_mhz=clock)
        self._last = m
        return m

    def apply(self, action: Action) -> Action:
        if action.power_cap_w is not None:
            self.power.set_power_cap_w(self.limits.clamp_cap_w(action.power_cap_w))
        if action.max_batch is not None and self.batch is not None:
            self.batch.set_max_batch(self.limits.clamp_batch(action.max_batch))
        return Action(power_cap_w=self.power.power_cap_w, max_batch=self._max_batch())

    def close(self) -> None:
        """Restore the batch limit and the power limits found at open (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.batch is not None:
                self.batch.close()
        finally:
            self.power.close()


# ---------------------------------------------------------------------------------------------
# `palsctl control` configuration
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
    from pathlib import Path  # noqa: PLC0415

    from palsctl.errors import ConfigError  # noqa: PLC0415

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
    import os  # noqa: PLC0415

    from palsctl.errors import ConfigError  # noqa: PLC0415
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
            from palsctl.emulator import EmulatorPower  # noqa: PLC0415
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
