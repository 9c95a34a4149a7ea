"""A fake NVML backend shaped like the ``pynvml`` module, for tests without a GPU.

Each GPU has a power limit (mW), constraints, a default, a power draw and an energy counter.
``log_path``: every limit write is appended there as ``set <index> <mW>`` (so a test can check,
after killing a subprocess, that the original limit was written back). ``fail``: maps a function
name to an NVML error code raised when it is called."""
from __future__ import annotations

import types
from dataclasses import dataclass, field

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_FI_DEV_POWER_INSTANT = 186
NVML_CLOCK_SM = 1
nvmlClocksEventReasonSwPowerCap = 0x4


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return f"NVML error code {self.value}"


@dataclass
class FakeGpu:
    limit_mw: int = 700_000
    min_mw: int = 200_000
    max_mw: int = 700_000
    default_mw: int = 700_000
    power_mw: int = 450_000
    instant_mw: int | None = 480_000     # None: field not supported
    energy_mj: int | None = 1_000_000   # None: counter not supported
    sm_clock_mhz: int = 1980
    reasons: int = 0
    name: str = "NVIDIA H100 80GB HBM3"


@dataclass
class FakeNvml:
    gpus: list[FakeGpu] = field(default_factory=lambda: [FakeGpu()])
    log_path: str | None = None
    fail: dict[str, int] = field(default_factory=dict)
    writes: list[tuple[int, int]] = field(default_factory=list)
    initialised: bool = False
    shutdowns: int = 0

    def as_module(self) -> types.SimpleNamespace:
        """A module-like namespace with pynvml's names bound to this fake."""
        ns = types.SimpleNamespace(**{k: v for k, v in globals().items()
                                      if k.startswith(("NVML_", "nvmlClocks"))})
        ns.NVMLError = NVMLError
        for name in dir(self):
            if name.startswith("nvml"):
                ns.__dict__[name] = self._wrap(name, getattr(self, name))
        return ns

    def _wrap(self, name, fn):
        def call(*args):
            if name in self.fail:
                raise NVMLError(self.fail[name])
            return fn(*args)
        call.__name__ = name
        return call

    # --- the pynvml functions used by palsctl.adapters.nvml
    def nvmlInit(self):
        self.initialised = True

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return i

    def nvmlDeviceGetName(self, h):
        return self.gpus[h].name

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h):
        return self.gpus[h].min_mw, self.gpus[h].max_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h):
        return self.gpus[h].default_mw

    def nvmlDeviceGetPowerManagementLimit(self, h):
        return self.gpus[h].limit_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self.gpus[h].limit_mw

    def nvmlDeviceSetPowerManagementLimit(self, h, mw):
        g = self.gpus[h]
        if not g.min_mw <= mw <= g.max_mw:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        g.limit_mw = mw
        self.writes.append((h, mw))
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(f"set {h} {mw}\n")
                f.flush()

    def nvmlDeviceGetPowerUsage(self, h):
        return self.gpus[h].power_mw

    def nvmlDeviceGetFieldValues(self, h, field_ids):
        g = self.gpus[h]
        out = []
        for fid in field_ids:
            ok = fid == NVML_FI_DEV_POWER_INSTANT and g.instant_mw is not None
            out.append(types.SimpleNamespace(
                fieldId=fid, nvmlReturn=NVML_SUCCESS if ok else NVML_ERROR_NOT_SUPPORTED,
                valueType=1, value=types.SimpleNamespace(uiVal=g.instant_mw or 0)))
        return out

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if self.gpus[h].energy_mj is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return self.gpus[h].energy_mj

    def nvmlDeviceGetClockInfo(self, h, kind):
        return self.gpus[h].sm_clock_mhz

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self.gpus[h].reasons
