"""`ServingPlant`: a real serving deployment as a palsctl `Plant` on the wall clock, composed of
`palsctl.interfaces.Sensor` and `palsctl.interfaces.Actuator` parts (it imports no adapter).

- ``power``: a sensor *and* the cap actuator of the GPUs (`palsctl.adapters.nvml.NvmlPower`, or
  the emulator's `palsctl.adapters.emulator.EmulatorPower`). Its measurement gives the power
  fields: the window's mean power from the energy counters, the cumulative energy, the cap the
  devices enforce (read from them) and the SM clock. It also has ``constraints`` (per-GPU cap
  bounds, for the default `Limits`).
- ``metrics``: the engine sensor (`palsctl.adapters.vllm_metrics.VllmMetricsSensor`): generated
  and prompt tokens/s, running and waiting requests, KV usage, p90 TTFT and inter-token latency.
- ``batch``: the batch actuator (`palsctl.adapters.batch.GatewayBatch` through the admission
  gateway, `palsctl.adapters.vllm_scheduler.BatchFileActuator` through the scheduler plugin's
  control file) or None. The batch limit in force is read back from it for every measurement.

A read that fails (`SensorError`: server or NVML unreachable, a value that is not a number)
returns the last good values with ``stale=True`` so the safety guard can react; the next good
read covers the whole gap. ``apply`` sets each knob independently: when one fails it raises
`ActuatorError` carrying what is known to be in force (``applied``), and the loop retries next
step. `close()` restores the batch limit and the power limits found at open (each part retries
with backoff); ``restored`` and ``restore_errors`` say truthfully whether that worked.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from palsctl.errors import ActuatorError, SensorError
from palsctl.interfaces import Actuator, Plant, Sensor
from palsctl.types import Action, Limits, Measurement, PlantInfo

__all__ = ["BatchSource", "PowerSource", "ServingPlant"]

log = logging.getLogger(__name__)


@runtime_checkable
class PowerSource(Sensor, Actuator, Protocol):
    """A `Sensor` of the GPUs' power and the `Actuator` of their cap, with the per-GPU cap
    bounds in ``constraints`` (objects with ``power_cap_min_w``, ``power_cap_max_w``,
    ``power_cap_default_w``, ``name``) and ``close()`` restoring the limits found at open."""

    constraints: list[Any]

    def close(self) -> None:
        """Restore the power limits found at open."""
        ...


@runtime_checkable
class BatchSource(Actuator, Protocol):
    """The `Actuator` of the batch limit (read back by ``apply(Action())``), with ``close()``
    restoring the limit found at open."""

    def close(self) -> None:
        """Restore the batch limit found at open."""
        ...


class ServingPlant(Plant):
    """A real (or emulated) vLLM deployment on the wall clock (see the module doc).

    ``limits`` default to the power device's constraints (caps per GPU) and batch
    ``1..max_batch_launch``. ``clock``: monotonic seconds (injectable for tests).
    """

    def __init__(self, *, metrics: Sensor, power: PowerSource, batch: BatchSource | None = None,
                 max_batch_launch: int = 256, dt_s: float = 1.0, info: PlantInfo | None = None,
                 limits: Limits | None = None,
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
        self._last: Measurement | None = None
        self._closed = False
        self.failures = 0
        #: after `close`: whether every setting found at open was written back, and what failed
        self.restored: bool | None = None
        self.restore_errors: list[str] = []
        for part, what in ((metrics, "metrics"), (power, "power")):   # the first window
            prime = getattr(part, "prime", None)
            if prime is not None:
                try:
                    prime()
                except SensorError as exc:
                    log.warning("%s not readable yet: %s", what, exc)

    def _batch_in_force(self) -> int | None:
        if self.batch is None:
            return self.limits.max_batch_max
        try:
            return self.batch.apply(Action()).max_batch
        except ActuatorError as exc:
            log.warning("cannot read the batch limit back: %s", exc)
            return None

    def read(self) -> Measurement:
        """The window since the previous read: power fields from ``power``, engine fields from
        ``metrics``, the batch limit read back from ``batch``; on a `SensorError` the last good
        values with ``stale=True``."""
        now = self._clock()
        window = max(now - self._last_t, 1e-9)
        try:
            p = self.power.read()
            e = self.metrics.read()
        except SensorError as exc:
            self.failures += 1
            log.warning("sensor read failed (%s): reporting stale values", exc)
            last = self._last
            if last is None:
                return Measurement(t_s=now - self._t0, window_s=window, power_w=0.0,
                                   energy_j=0.0, throughput_tok_s=0.0, stale=True)
            # the next good read covers the whole gap (window since the last good one)
            return Measurement(
                t_s=now - self._t0, window_s=window, power_w=last.power_w,
                energy_j=last.energy_j, throughput_tok_s=last.throughput_tok_s,
                prompt_tok_s=last.prompt_tok_s, running=last.running, waiting=last.waiting,
                kv_usage=last.kv_usage, ttft_p90_s=last.ttft_p90_s, tpot_p90_s=last.tpot_p90_s,
                power_cap_w=last.power_cap_w, max_batch=last.max_batch,
                sm_clock_mhz=last.sm_clock_mhz, stale=True)
        self._last_t = now
        m = Measurement(
            t_s=now - self._t0, window_s=window, power_w=p.power_w, energy_j=p.energy_j,
            throughput_tok_s=e.throughput_tok_s, prompt_tok_s=e.prompt_tok_s,
            running=e.running, waiting=e.waiting, kv_usage=e.kv_usage,
            ttft_p90_s=e.ttft_p90_s, tpot_p90_s=e.tpot_p90_s, power_cap_w=p.power_cap_w,
            max_batch=self._batch_in_force(), sm_clock_mhz=p.sm_clock_mhz)
        self._last = m
        return m

    def apply(self, action: Action) -> Action:
        """Clamp the action to `limits`, set each knob given and return what is in force, read
        back (cap per GPU in W, batch in sequences). When a knob fails, the other is still set
        and `ActuatorError` is raised with ``applied`` holding what is known to be in force."""
        lim = self.limits
        cap = None if action.power_cap_w is None else lim.clamp_cap_w(action.power_cap_w)
        batch = None if action.max_batch is None else lim.clamp_batch(action.max_batch)
        errors = []
        try:
            cap = self.power.apply(Action(power_cap_w=cap)).power_cap_w
        except ActuatorError as exc:
            cap = None
            errors.append(f"power: {exc}")
        if self.batch is None:
            batch = lim.max_batch_max
        else:
            try:
                batch = self.batch.apply(Action(max_batch=batch)).max_batch
            except ActuatorError as exc:
                batch = None
                errors.append(f"batch: {exc}")
        applied = Action(power_cap_w=cap, max_batch=batch)
        if errors:
            raise ActuatorError("; ".join(errors), applied=applied)
        return applied

    def state_targets(self) -> list[dict[str, Any]]:
        """The original settings of every target this plant changes (claim entries, see
        `palsctl.adapters.state`)."""
        targets = list(getattr(self.power, "state_targets", lambda: [])())
        if self.batch is not None and hasattr(self.batch, "state_target"):
            targets.append(self.batch.state_target())
        return targets

    def drift_events(self) -> dict[str, int]:
        """Drift episodes repaired so far (device value other than the one set), per knob."""
        out = {}
        for name, part in (("power", self.power), ("batch", self.batch)):
            drift = getattr(part, "drift", None)
            if drift is not None:
                out[name] = drift.events
        return out

    def close(self) -> None:
        """Restore the batch limit and the power limits found at open (idempotent). Never
        raises: ``restored`` / ``restore_errors`` tell what happened."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for name, part in (("batch", self.batch), ("power", self.power)):
            if part is None:
                continue
            try:
                part.close()
            except Exception as exc:  # noqa: BLE001 - every part is restored, failures told
                errors.append(f"{name}: {exc}")
                log.error("could not restore the %s settings: %s", name, exc)
        self.restore_errors = errors
        self.restored = not errors
