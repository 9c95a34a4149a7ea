"""The interfaces every plant and controller implements.

The loop (``palsctl.loop``) owns the clock. Once per control period ``dt_s`` it calls
``plant.read()``, passes the `Measurement` and the current `Setpoint` to the (guarded)
controller, and hands the resulting `Action` to ``plant.apply()``, which returns what was
really applied. Simulated plants are advanced by the loop with ``plant.advance(dt_s)``; real
plants advance with the wall clock.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from palsctl.errors import ConfigError
from palsctl.types import Action, Limits, Measurement, PlantInfo, Request, RequestResult, Setpoint


@runtime_checkable
class Sensor(Protocol):
    def read(self) -> Measurement:
        """Measurement over the window since the previous read."""
        ...


@runtime_checkable
class Actuator(Protocol):
    def apply(self, action: Action) -> Action:
        """Apply an action; return what was really applied (after clamping and rounding).
        Knobs left ``None`` are unchanged and reported with their value in force."""
        ...


class Plant(ABC):
    """A serving deployment: sensor + actuator + limits + control period.

    Attributes: ``limits`` (`Limits`), ``dt_s`` (control period in seconds), ``info``
    (`PlantInfo`).
    """

    limits: Limits
    dt_s: float
    info: PlantInfo
    simulated: ClassVar[bool] = False

    @abstractmethod
    def read(self) -> Measurement: ...

    @abstractmethod
    def apply(self, action: Action) -> Action: ...

    def submit(self, requests: Sequence[Request]) -> None:
        """Offer requests (their ``arrival_s`` may lie in the future of the plant's clock).
        Real plants whose load comes from outside do not implement this."""
        raise NotImplementedError(f"{type(self).__name__} does not accept submitted requests")

    def completed(self) -> list[RequestResult]:
        """Requests finished since the previous call (drained)."""
        return []

    def close(self) -> None:
        """Release resources and restore any hardware settings changed."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SimulatedPlant(Plant):
    """A plant with a simulated clock that the loop advances explicitly."""

    simulated: ClassVar[bool] = True

    @property
    @abstractmethod
    def now_s(self) -> float: ...

    @abstractmethod
    def advance(self, dt_s: float) -> None:
        """Advance the simulated clock by ``dt_s`` seconds."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    """Base of every controller's frozen Config. Subclasses add their tunables with units in the
    names and validate them in ``__post_init__``."""

    @classmethod
    def from_dict(cls, params: dict[str, Any], *, file: str | None = None,
                  section: str = "controller") -> "ControllerConfig":
        """Build from a dict, rejecting unknown keys with a `ConfigError` naming the key."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in params.items():
            if key not in fields:
                raise ConfigError(f"unknown parameter for {cls.__qualname__}; known: "
                                  f"{', '.join(sorted(fields)) or '(none)'}",
                                  file=file, key=f"{section}.{key}", value=value)
        try:
            return cls(**params)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc), file=file, key=section) from None


class Controller(ABC):
    """Decides the next `Action` from a `Measurement` and a `Setpoint`.

    Pure: no clock, no I/O, no globals; randomness only from a generator seeded by the config.
    Construct with a Config object or keyword parameters (``PIController(kp=...)``); unknown
    keys raise `ConfigError`. The loop calls ``setup()`` once before the first ``step()``.
    """

    Config: ClassVar[type[ControllerConfig]] = ControllerConfig
    name: ClassVar[str] = "controller"
    #: True when the controller needs an offline power-performance model (``model=``, the
    #: Config's ``model_path``, or one profiled on the simulator's presets before the run).
    needs_model: ClassVar[bool] = False
    #: False for a baseline that stands for a deployment without power management: on the
    #: simulated plant `palsctl.experiment.run_experiment` runs it without the `SafetyGuard`.
    guarded: ClassVar[bool] = True

    def __init__(self, config: ControllerConfig | None = None, /, **params: Any) -> None:
        if config is not None and params:
            raise TypeError("pass either a Config or keyword parameters, not both")
        if config is None:
            config = self.Config.from_dict(params)
        elif not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__qualname__}, "
                            f"got {type(config).__name__}")
        self.config = config
        self.limits: Limits | None = None
        self.dt_s: float | None = None
        self.plant_info: PlantInfo | None = None

    @property
    def expected_dt_s(self) -> float | None:
        """The control period the controller was tuned for (None: any). The loop refuses a
        plant whose ``dt_s`` differs."""
        return getattr(self.config, "dt_s", None)

    def setup(self, *, limits: Limits, dt_s: float, plant_info: PlantInfo) -> None:
        """Bind to a plant's limits and control period; resets internal state."""
        self.limits, self.dt_s, self.plant_info = limits, dt_s, plant_info
        self.reset()

    @abstractmethod
    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action: ...

    def reset(self) -> None:
        """Forget internal state (integrators, filters, dwell timers)."""

    def diagnostics(self) -> dict[str, Any]:
        """Internal terms of the last step (JSON-serialisable scalars)."""
        return {}
