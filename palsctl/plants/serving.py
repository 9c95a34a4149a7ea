"""`ServingPlant`: a real serving deployment as a palsctl `Plant` on the wall clock.

Sensor: power from NVML (`palsctl.adapters.nvml.NvmlPower`) or the emulator's stand-in
(`palsctl.adapters.emulator.EmulatorPower`) — the window's mean power comes from the energy counter
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
