"""NVIDIA GPU power sensing and power-cap actuation through NVML (``nvidia-ml-py``).

>>> gpus = NvmlPower(indices=[0], dry_run=True)          # doctest: +SKIP
>>> gpus.read_gpus()[0].power_instant_w                  # doctest: +SKIP
>>> gpus.read().power_w                  # Sensor: mean power since the last read; doctest: +SKIP
>>> gpus.apply(Action(power_cap_w=300.0))        # Actuator: the cap read back; doctest: +SKIP
>>> gpus.close()                                         # restores the original limits

`NvmlPower` is a `palsctl.interfaces.Sensor` (``read()``: a `Measurement` with the power fields:
window mean power from the energy counters, cumulative energy, the enforced limit read from the
device, SM clock) and a `palsctl.interfaces.Actuator` (``apply(action)``: the cap). Every write
is preceded by a read of the limit the device holds (a write is skipped only when the device
already holds the value) and followed by a read-back; a device value that differs from what
palsctl set (another tool, a driver reset) is re-applied, logged once per episode and counted in
``drift.events``. `PowerDevice` holds the sensor and actuator logic for any power backend (the
emulator's too).

Units: NVML speaks milliwatts and millijoules; everything here is converted to watts and joules.
``pynvml`` is imported lazily (only when an `NvmlPower` is built without an injected backend), so
importing this module never needs a driver. Tests inject a fake backend object that looks like the
``pynvml`` module (same function and constant names, an ``NVMLError`` class with ``.value``).

Restoring settings: the limits in force when the adapter was opened are written back on
`close()`, at interpreter exit, on SIGINT/SIGTERM (when ``install_signal_handlers`` is true and the
adapter lives in the main thread) and — by the caller's ``with``/``finally`` — when a controller
crashes: every GPU whose limit differs from its original then, with retries and backoff, each
write confirmed by reading it back; a restore that fails raises `ActuatorError` (never a silent
success). `restore_limits` writes given limits back without an open adapter (a dead process's
claim, see `palsctl.adapters.state`).
"""
from __future__ import annotations

import atexit
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from palsctl.adapters.state import DriftWatch, retry
from palsctl.errors import ActuatorError, HardwareError, SensorError
from palsctl.types import Action, Measurement

__all__ = ["GpuConstraints", "GpuReading", "NvmlPower", "PowerDevice", "restore_all",
           "restore_limits"]

log = logging.getLogger(__name__)

# NVML return codes (nvml.h); the backend's own constants take precedence when it has them.
_ERR_CODES = {
    "NVML_ERROR_UNINITIALIZED": 1,
    "NVML_ERROR_INVALID_ARGUMENT": 2,
    "NVML_ERROR_NOT_SUPPORTED": 3,
    "NVML_ERROR_NO_PERMISSION": 4,
    "NVML_ERROR_NOT_FOUND": 6,
    "NVML_ERROR_DRIVER_NOT_LOADED": 9,
    "NVML_ERROR_LIBRARY_NOT_FOUND": 12,
    "NVML_ERROR_FUNCTION_NOT_FOUND": 13,
    "NVML_ERROR_GPU_IS_LOST": 15,
}
_FI_DEV_POWER_INSTANT = 186
_CLOCK_SM = 1
_SW_POWER_CAP_MASK = 0x4


@dataclass(frozen=True, kw_only=True, slots=True)
class GpuReading:
    """One NVML read of one GPU.

    ``power_instant_w``: instantaneous board power (field ``NVML_FI_DEV_POWER_INSTANT``, or the
    driver's power reading when the field is not supported); ``power_avg_w``: the driver's power
    reading (a ~1 s average on recent GPUs); ``energy_j``: cumulative energy counter since the
    driver loaded (None when unsupported); ``power_limit_w``: enforced limit;
    ``sw_power_cap``: True when the clocks are held down by the software power cap.
    """

    index: int
    power_instant_w: float
    power_avg_w: float
    energy_j: float | None
    power_limit_w: float
    sm_clock_mhz: float | None
    sw_power_cap: bool | None


@dataclass(frozen=True, kw_only=True, slots=True)
class GpuConstraints:
    """Power-limit bounds of one GPU, watts."""

    index: int
    name: str
    power_cap_min_w: float
    power_cap_max_w: float
    power_cap_default_w: float


class PowerDevice:
    """The `Sensor` and cap `Actuator` of a group of GPUs, on top of a backend's
    ``read_gpus() -> list[GpuReading]`` and ``set_power_cap_w(w) -> float`` (read back).
    `NvmlPower` and the emulator's `EmulatorPower` are power devices.

    ``read()`` reports the window since the previous read (or `prime`): ``power_w`` is the
    energy counters' increase over the window summed over the GPUs (the drivers' averaged power
    when a counter is missing or went backwards), ``energy_j`` the cumulative energy since open,
    ``power_cap_w`` the largest limit the devices *enforce* (read from them, never a cache) and
    ``sm_clock_mhz`` the mean SM clock; the engine fields are zero (another sensor measures
    them). A failed read raises `SensorError` and keeps the window's start, so the next read
    covers the gap. ``apply(action)`` sets ``action.power_cap_w`` (None: only reads back) and
    returns the cap in force, read back; a failed write raises `ActuatorError`.
    """

    #: each GPU slot's power-limit bounds, set by the backend
    constraints: list[GpuConstraints]

    def _init_window(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._t0 = clock()
        self._win_t: float | None = None
        self._win_counters: list[float | None] | None = None
        self._energy_j = 0.0

    def read_gpus(self) -> list[GpuReading]:  # pragma: no cover - provided by the backend
        """Read every GPU of the group once.

        Returns
        -------
        list of GpuReading
            One reading per GPU, in the group's order (powers in W, energy in J).
        """
        raise NotImplementedError

    def set_power_cap_w(self, power_cap_w: float) -> float:  # pragma: no cover - backend
        """Set every GPU's power limit (clamped to its constraints) and read it back.

        Parameters
        ----------
        power_cap_w : float
            The limit per GPU, W.

        Returns
        -------
        float
            The largest limit the GPUs enforce afterwards, W.
        """
        raise NotImplementedError

    def clamp_cap_w(self, power_cap_w: float, k: int = 0) -> float:
        """Clamp a per-GPU cap into the constraints of GPU slot ``k``, rounded down to 1 W."""
        c = self.constraints[k]
        if not math.isfinite(power_cap_w):
            raise ValueError(f"power cap must be finite, got {power_cap_w}")
        capped = min(max(float(power_cap_w), c.power_cap_min_w), c.power_cap_max_w)
        return float(max(math.floor(capped + 1e-9), c.power_cap_min_w)
                     if capped < c.power_cap_max_w else c.power_cap_max_w)

    def prime(self) -> None:
        """Start the first window now (read the counters)."""
        readings = self._sensor_read()
        self._win_t, self._win_counters = self._clock(), [r.energy_j for r in readings]

    def _sensor_read(self) -> list[GpuReading]:
        try:
            return self.read_gpus()
        except HardwareError as exc:
            raise SensorError(str(exc)) from None

    def read(self) -> Measurement:
        """The window since the previous read as a `Measurement` (power fields only)."""
        readings = self._sensor_read()
        now = self._clock()
        start = self._t0 if self._win_t is None else self._win_t
        window = max(now - start, 1e-9)
        counters = [r.energy_j for r in readings]
        power_w = sum(r.power_avg_w for r in readings)
        prev = self._win_counters
        if prev is not None and len(prev) == len(counters):
            deltas = [b - a for a, b in zip(prev, counters, strict=True)
                      if a is not None and b is not None]
            # every GPU counted both times, none decreased (a decrease: counter reset, use average)
            if len(deltas) == len(counters) and all(d >= 0 for d in deltas):
                power_w = sum(deltas) / window
        power_w = max(power_w, 0.0)
        self._win_t, self._win_counters = now, counters
        self._energy_j += power_w * window
        clocks = [r.sm_clock_mhz for r in readings if r.sm_clock_mhz is not None]
        return Measurement(t_s=now - self._t0, window_s=window, power_w=power_w,
                           energy_j=self._energy_j, throughput_tok_s=0.0,
                           power_cap_w=max(r.power_limit_w for r in readings),
                           sm_clock_mhz=sum(clocks) / len(clocks) if clocks else None)

    def apply(self, action: Action) -> Action:
        """Set the cap (None: read it back only); returns the cap in force, read back."""
        try:
            if action.power_cap_w is None:
                cap = max(r.power_limit_w for r in self.read_gpus())
            else:
                cap = self.set_power_cap_w(action.power_cap_w)
        except (HardwareError, ValueError) as exc:
            raise ActuatorError(str(exc)) from None
        return Action(power_cap_w=cap)


def _load_pynvml() -> Any:
    try:
        import pynvml  # lazy on purpose
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
        raise HardwareError("the NVML Python bindings are missing: "
                            "pip install nvidia-ml-py") from exc
    return pynvml


class NvmlPower(PowerDevice):
    """Power sensing and power-limit control of one or more GPUs through NVML (a
    `PowerDevice`: `Sensor` and cap `Actuator`).

    ``indices``: GPU indices (default: all). ``dry_run``: `set_power_cap_w` computes and logs the
    clamped cap but writes nothing. ``backend``: an object shaped like the ``pynvml`` module
    (tests); None imports ``pynvml``. ``clock``: monotonic seconds for the sensor's windows.
    ``restore_attempts`` / ``restore_backoff_s``: tries and first pause of a restore.
    """

    def __init__(self, indices: Sequence[int] | None = None, *, dry_run: bool = False,
                 backend: Any = None, install_signal_handlers: bool = True,
                 clock: Callable[[], float] = time.monotonic, restore_attempts: int = 5,
                 restore_backoff_s: float = 0.2) -> None:
        self._nv = backend if backend is not None else _load_pynvml()
        self.dry_run = dry_run
        self._closed = False
        self._lock = threading.RLock()
        self.restore_attempts, self.restore_backoff_s = restore_attempts, restore_backoff_s
        self.drift = DriftWatch("GPU power limit")
        self._call(self._nv.nvmlInit, what="initialise NVML")
        try:
            count = int(self._call(self._nv.nvmlDeviceGetCount, what="count GPUs"))
            if count < 1:
                raise HardwareError("NVML sees no GPU: check `nvidia-smi` and that this process "
                                    "can see the devices (CUDA_VISIBLE_DEVICES, container "
                                    "--gpus)")
            self.indices = list(range(count)) if indices is None else [int(i) for i in indices]
            for i in self.indices:
                if not 0 <= i < count:
                    raise HardwareError(f"GPU index {i} does not exist; NVML sees {count} GPU(s) "
                                        f"(indices 0..{count - 1})")
            self._handles = [self._call(self._nv.nvmlDeviceGetHandleByIndex, i,
                                        what=f"open GPU {i}") for i in self.indices]
            self.constraints = [self._read_constraints(i, h)
                                for i, h in zip(self.indices, self._handles, strict=True)]
            self._original_mw = [int(self._call(self._nv.nvmlDeviceGetPowerManagementLimit, h,
                                                what=f"read the power limit of GPU {i}"))
                                 for i, h in zip(self.indices, self._handles, strict=True)]
        except BaseException:
            self._shutdown()
            raise
        # what palsctl last commanded per GPU (None: nothing yet); in a dry run, what it would
        # have written
        self._commanded_mw: list[int | None] = [None] * len(self.indices)
        self._instant_supported = [True] * len(self.indices)
        self._energy_supported = [True] * len(self.indices)
        self._init_window(clock)
        _register_for_restore(self, install_signal_handlers)

    # ---------------------------------------------------------------- errors
    def _code(self, name: str) -> int:
        return int(getattr(self._nv, name, _ERR_CODES[name]))

    def _translate(self, exc: Exception, what: str) -> HardwareError:
        value = getattr(exc, "value", None)
        if value in (self._code("NVML_ERROR_LIBRARY_NOT_FOUND"),
                     self._code("NVML_ERROR_DRIVER_NOT_LOADED")):
            msg = (f"cannot {what}: no NVIDIA driver found (NVML library not loaded); this needs "
                   "a machine with an NVIDIA GPU and driver — use `palsctl emulate` to run "
                   "without one")
        elif value in (self._code("NVML_ERROR_NO_PERMISSION"),):
            msg = (f"cannot {what}: permission denied; changing GPU power limits needs root or "
                   "CAP_SYS_ADMIN (run with sudo, or use --dry-run)")
        elif value in (self._code("NVML_ERROR_NOT_SUPPORTED"),
                       self._code("NVML_ERROR_FUNCTION_NOT_FOUND")):
            msg = f"cannot {what}: not supported by this GPU or driver"
        elif value in (self._code("NVML_ERROR_NOT_FOUND"), self._code("NVML_ERROR_GPU_IS_LOST")):
            msg = f"cannot {what}: GPU not found or lost (check `nvidia-smi`)"
        elif value == self._code("NVML_ERROR_INVALID_ARGUMENT"):
            msg = f"cannot {what}: invalid argument (value out of the GPU's range?)"
        else:
            msg = f"cannot {what}: NVML error {exc}"
        err = HardwareError(msg)
        err.nvml_code = value
        return err

    def _is_not_supported(self, exc: Exception) -> bool:
        return getattr(exc, "value", None) in (self._code("NVML_ERROR_NOT_SUPPORTED"),
                                               self._code("NVML_ERROR_FUNCTION_NOT_FOUND"))

    def _call(self, fn: Any, *args: Any, what: str) -> Any:
        try:
            return fn(*args)
        except self._nv.NVMLError as exc:
            raise self._translate(exc, what) from None

    # ---------------------------------------------------------------- reading
    def _read_constraints(self, index: int, handle: Any) -> GpuConstraints:
        lo_mw, hi_mw = self._call(self._nv.nvmlDeviceGetPowerManagementLimitConstraints, handle,
                                  what=f"read the power-limit constraints of GPU {index}")
        default_mw = self._call(self._nv.nvmlDeviceGetPowerManagementDefaultLimit, handle,
                                what=f"read the default power limit of GPU {index}")
        name = self._call(self._nv.nvmlDeviceGetName, handle, what=f"read the name of GPU {index}")
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        return GpuConstraints(index=index, name=str(name), power_cap_min_w=lo_mw / 1000.0,
                              power_cap_max_w=hi_mw / 1000.0,
                              power_cap_default_w=default_mw / 1000.0)

    def _instant_mw(self, k: int, handle: Any) -> float | None:
        if not self._instant_supported[k] or not hasattr(self._nv, "nvmlDeviceGetFieldValues"):
            return None
        field_id = getattr(self._nv, "NVML_FI_DEV_POWER_INSTANT", _FI_DEV_POWER_INSTANT)
        try:
            (fv,) = self._nv.nvmlDeviceGetFieldValues(handle, [field_id])
        except self._nv.NVMLError as exc:
            if self._is_not_supported(exc):
                self._instant_supported[k] = False
                return None
            raise self._translate(exc, f"read the instant power of GPU {self.indices[k]}") from None
        if getattr(fv, "nvmlReturn", 0) != 0:
            self._instant_supported[k] = False
            return None
        return float(_field_value(fv))

    def read_gpus(self) -> list[GpuReading]:
        """One reading per GPU (watts, joules, MHz); `HardwareError` when NVML fails."""
        out = []
        for k, (i, h) in enumerate(zip(self.indices, self._handles, strict=True)):
            avg_mw = self._call(self._nv.nvmlDeviceGetPowerUsage, h,
                                what=f"read the power of GPU {i}")
            inst_mw = self._instant_mw(k, h)
            energy_j = None
            if self._energy_supported[k]:
                try:
                    energy_j = self._nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0
                except self._nv.NVMLError as exc:
                    if not self._is_not_supported(exc):
                        raise self._translate(exc, f"read the energy counter of GPU {i}") from None
                    self._energy_supported[k] = False
            limit_mw = self._call(self._nv.nvmlDeviceGetEnforcedPowerLimit, h,
                                  what=f"read the enforced power limit of GPU {i}")
            clock = self._optional(self._nv.nvmlDeviceGetClockInfo, h,
                                   getattr(self._nv, "NVML_CLOCK_SM", _CLOCK_SM))
            reasons_fn = (getattr(self._nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
                          or getattr(self._nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None))
            reasons = self._optional(reasons_fn, h) if reasons_fn else None
            mask = getattr(self._nv, "nvmlClocksEventReasonSwPowerCap", _SW_POWER_CAP_MASK)
            out.append(GpuReading(
                index=i, power_instant_w=(inst_mw if inst_mw is not None else avg_mw) / 1000.0,
                power_avg_w=avg_mw / 1000.0, energy_j=energy_j, power_limit_w=limit_mw / 1000.0,
                sm_clock_mhz=None if clock is None else float(clock),
                sw_power_cap=None if reasons is None else bool(int(reasons) & int(mask))))
        return out

    def _optional(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._nv.NVMLError as exc:
            if self._is_not_supported(exc):
                return None
            raise self._translate(exc, f"call {getattr(fn, '__name__', fn)}") from None

    # ---------------------------------------------------------------- writing
    def _device_mw(self, k: int) -> int:
        """The limit GPU slot ``k`` holds (what was set, read from the device), mW."""
        i, h = self.indices[k], self._handles[k]
        return int(self._call(self._nv.nvmlDeviceGetPowerManagementLimit, h,
                              what=f"read the power limit of GPU {i}"))

    def set_power_cap_w(self, power_cap_w: float) -> float:
        """Set the same cap on every GPU (clamped). Each GPU's limit is read first: the write is
        skipped when the device already holds the value, and a device value that differs from
        what palsctl set before is a drift (logged once per episode, counted in
        ``drift.events``) that this write repairs. Returns the cap in force afterwards, read
        back (the largest over the GPUs). ``dry_run`` only logs what it would write and returns
        that value."""
        applied = []
        with self._lock:
            if self._closed:
                raise HardwareError("NVML adapter is closed")
            for k, i in enumerate(self.indices):
                cap_w = self.clamp_cap_w(power_cap_w, k)
                mw = int(round(cap_w * 1000.0))
                if self.dry_run:
                    if mw != self._commanded_mw[k]:
                        log.info("dry run: would set GPU %d power limit %.0f W -> %.0f W", i,
                                 self._device_mw(k) / 1000.0, cap_w)
                    self._commanded_mw[k] = mw
                    applied.append(cap_w)
                    continue
                device = self._device_mw(k)
                last = self._commanded_mw[k]
                self.drift.check(i, device / 1000.0, None if last is None else last / 1000.0)
                if device != mw:
                    self._call(self._nv.nvmlDeviceSetPowerManagementLimit, self._handles[k], mw,
                               what=f"set the power limit of GPU {i} to {cap_w:.0f} W")
                    device = self._device_mw(k)
                    if device == mw:
                        log.info("GPU %d power limit set to %.0f W", i, cap_w)
                    else:
                        log.warning("GPU %d holds %.0f W after setting %.0f W", i,
                                    device / 1000.0, cap_w)
                self._commanded_mw[k] = mw
                applied.append(device / 1000.0)
        return max(applied)

    @property
    def power_cap_w(self) -> float:
        """The per-GPU limit the devices hold, read from them (the largest over the GPUs); in a
        dry run, what would have been written."""
        with self._lock:
            if self.dry_run and self._commanded_mw[0] is not None:
                return max(m for m in self._commanded_mw if m is not None) / 1000.0
            return max(self._device_mw(k) for k in range(len(self.indices))) / 1000.0

    def state_targets(self) -> list[dict[str, Any]]:
        """Claim entries (`palsctl.adapters.state`): each GPU's original limit."""
        return [{"kind": "nvml", "index": i, "name": self.constraints[k].name,
                 "power_limit_w": self._original_mw[k] / 1000.0}
                for k, i in enumerate(self.indices)]

    # ---------------------------------------------------------------- restore / close
    def _restore_once(self) -> None:
        failed = []
        for k, i in enumerate(self.indices):
            want = self._original_mw[k]
            try:
                if self._device_mw(k) != want:
                    self._call(self._nv.nvmlDeviceSetPowerManagementLimit, self._handles[k],
                               want, what=f"restore the power limit of GPU {i}")
                    got = self._device_mw(k)
                    if got != want:
                        raise HardwareError(f"GPU {i} holds {got / 1000:.0f} W after writing "
                                            f"{want / 1000:.0f} W")
                    log.info("GPU %d power limit restored to %.0f W", i, want / 1000.0)
                self._commanded_mw[k] = None
            except Exception as exc:  # noqa: BLE001 - every GPU is tried
                failed.append(f"GPU {i}: {exc}")
        if failed:
            raise ActuatorError("could not restore the power limit of " + "; ".join(failed))

    def restore(self) -> None:
        """Write back the limits found at open on every GPU that holds another value, each
        confirmed by reading it back, with retries and backoff. Raises `ActuatorError` naming
        the GPUs that could not be restored. A dry run writes nothing."""
        if self.dry_run:
            return
        with self._lock:
            retry(self._restore_once, attempts=self.restore_attempts,
                  first_delay_s=self.restore_backoff_s, what="restoring the GPU power limits")

    def _shutdown(self) -> None:
        try:
            self._nv.nvmlShutdown()
        except Exception:  # noqa: BLE001 - nothing is left to do with a failing shutdown
            pass

    def close(self) -> None:
        """Restore the original limits and shut NVML down (idempotent). Raises `ActuatorError`
        when a limit could not be restored (NVML is shut down all the same)."""
        with self._lock:
            if self._closed:
                return
            try:
                self.restore()
            finally:
                self._closed = True
                self._shutdown()
                _unregister(self)

    def __enter__(self) -> "NvmlPower":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _field_value(fv: Any) -> float:
    """The numeric value of an ``nvmlFieldValue_t`` according to its ``valueType``."""
    kinds = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
    attr = kinds.get(int(getattr(fv, "valueType", 1)), "uiVal")
    return float(getattr(fv.value, attr))


# ------------------------------------------------------------------ process-wide restore hooks
# strong references: an adapter dropped without close() must still be restored at exit
_open: "set[NvmlPower]" = set()
_atexit_installed = False
_signals_installed = False
_previous_handlers: dict[int, Any] = {}


def restore_all() -> None:
    """Restore every open adapter's original limits (used by the exit and signal hooks;
    failures are logged, never raised)."""
    for adapter in list(_open):
        try:
            adapter.restore()
        except Exception as exc:  # noqa: BLE001 - a shutdown hook must go on
            log.error("%s", exc)


def restore_limits(limits_w: dict[int, float], *, backend: Any = None) -> None:
    """Write the per-GPU limits ``{index: watts}`` back where a GPU holds another value, each
    confirmed by reading it back (one try; `palsctl.adapters.state.restore_targets` retries).
    Raises `ActuatorError` (or `HardwareError` when NVML cannot start)."""
    nv = NvmlPower(sorted(limits_w), backend=backend, install_signal_handlers=False,
                   restore_attempts=1)
    nv._original_mw = [int(round(limits_w[i] * 1000.0)) for i in nv.indices]
    nv.close()


def _on_signal(signum: int, frame: Any) -> None:
    restore_all()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    else:  # default action: terminate with the signal
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def _register_for_restore(adapter: NvmlPower, install_signal_handlers: bool) -> None:
    global _atexit_installed, _signals_installed
    _open.add(adapter)
    if not _atexit_installed:
        atexit.register(restore_all)
        _atexit_installed = True
    if (install_signal_handlers and not _signals_installed
            and threading.current_thread() is threading.main_thread()):
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN:
                # a process that ignores the signal (started in the background by a shell, or
                # under nohup) keeps running on it, so its limits must stay as well
                continue
            _previous_handlers[sig] = previous
            signal.signal(sig, _on_signal)
        _signals_installed = True


def _unregister(adapter: NvmlPower) -> None:
    _open.discard(adapter)
