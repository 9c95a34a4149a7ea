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
from typing import Any, ClassVar, Protocol, Self, cast, runtime_checkable

from palsctl.types import Action, Limits, Measurement, PlantInfo, Request, RequestResult, Setpoint

__all__ = ["Actuator", "Controller", "ControllerConfig", "Plant", "Sensor", "SimulatedPlant"]


@runtime_checkable
class Sensor(Protocol):
    """Something that measures a plant: ``read()`` returns a `Measurement` over the window since
    the previous read, with values read from the device or endpoint (never a cache of what was
    written). A sensor of one part of a plant fills the fields it measures and leaves the others
    at their zero defaults (the NVML sensor: power, energy, cap in force, SM clock; the vLLM
    metrics sensor: throughput, queues, KV usage, latency quantiles); a composed plant such as
    `palsctl.plants.serving.ServingPlant` merges them. A read that fails raises
    `palsctl.errors.SensorError` (the window's start is kept, so the next read covers the gap).
    Implemented by `palsctl.adapters.nvml.NvmlPower`, `palsctl.adapters.emulator.EmulatorPower`
    and `palsctl.adapters.vllm_metrics.VllmMetricsSensor`."""

    def read(self) -> Measurement:
        """Measurement over the window since the previous read."""
        ...


@runtime_checkable
class Actuator(Protocol):
    """Something that sets a plant's knobs: ``apply(action)`` sets the knobs ``action`` gives
    and returns what is in force afterwards, read back (after clamping and hardware rounding);
    knobs left ``None`` are unchanged and reported with their value in force (so
    ``apply(Action())`` only reads back). A write that fails raises
    `palsctl.errors.ActuatorError`. Implemented by `palsctl.adapters.nvml.NvmlPower`,
    `palsctl.adapters.emulator.EmulatorPower` (the cap) and `palsctl.adapters.batch.BatchLimit`
    (the batch: `palsctl.adapters.batch.GatewayBatch`,
    `palsctl.adapters.vllm_scheduler.BatchFileActuator`)."""

    def apply(self, action: Action) -> Action:
        """Apply an action; return what was really applied (after clamping and rounding).
        Knobs left ``None`` are unchanged and reported with their value in force."""
        ...


class Plant(ABC):
    """A serving deployment: sensor + actuator + limits + control period.

    Attributes
    ----------
    limits : Limits
        Bounds of the knobs (caps per GPU, W; batch limits).
    dt_s : float
        Control period, s.
    info : PlantInfo
        What controllers are told about the plant.
    simulated : bool
        True for a plant whose clock the loop advances (`SimulatedPlant`).
    """

    limits: Limits
    dt_s: float
    info: PlantInfo
    simulated: ClassVar[bool] = False

    @abstractmethod
    def read(self) -> Measurement:
        """Measurement over the window since the previous read (see `Sensor.read`)."""

    @abstractmethod
    def apply(self, action: Action) -> Action:
        """Apply an action and return what was really applied (see `Actuator.apply`)."""

    def submit(self, requests: Sequence[Request]) -> None:
        """Offer requests to the plant; real plants whose load comes from outside do not.

        Parameters
        ----------
        requests : sequence of Request
            Requests whose ``arrival_s`` (s) may lie in the future of the plant's clock.
        """
        raise NotImplementedError(f"{type(self).__name__} does not accept submitted requests")

    def completed(self) -> list[RequestResult]:
        """Drain the requests finished since the previous call.

        Returns
        -------
        list of RequestResult
            The finished requests with their timings.
        """
        return []

    def close(self) -> None:  # noqa: B027 - optional hook: a plant with nothing to release
        """Release resources and restore any hardware settings changed."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SimulatedPlant(Plant):
    """A plant with a simulated clock that the loop advances explicitly."""

    simulated: ClassVar[bool] = True

    @property
    @abstractmethod
    def now_s(self) -> float:
        """The simulated clock, seconds."""

    @abstractmethod
    def advance(self, dt_s: float) -> None:
        """Advance the simulated clock by ``dt_s`` seconds."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    """Base of every controller's frozen Config, validated with pydantic v2.

    It has no field of its own; a subclass declares the tunables.

    A subclass declares its tunables (units in the names) with their constraints as
    ``Annotated`` types; ``from_dict`` (and so ``make_controller(name, **params)`` and the
    ``[controller]`` table of an experiment) checks unknown keys, types (exact: no ``"1"`` for
    1, no ``true`` for 1; finite numbers) and constraints, every error at once, then runs
    ``__post_init__``, which keeps only the cross-field checks::

        from typing import Annotated
        from pydantic import Field

        @dataclasses.dataclass(frozen=True, kw_only=True)
        class MyConfig(ControllerConfig):
            gain: Annotated[float, Field(ge=0)] = 0.1               # >= 0
            lo_w: Annotated[float, Field(gt=0)] = 100.0              # watts, > 0
            hi_w: Annotated[float, Field(gt=0)] = 300.0
            dt_s: Annotated[float, Field(gt=0)] | None = None        # None: any period

            def __post_init__(self) -> None:
                super().__post_init__()   # checks the fields on direct construction too
                if self.lo_w > self.hi_w:
                    raise ConfigError("must be <= hi_w", key=f"{self.section}.lo_w",
                                      value=self.lo_w)

    ``section`` names the table the keys live in (``controller``; ``guard`` for the guard);
    ``from_dict(..., section=...)`` moves the keys of the errors under another one.
    """

    section: ClassVar[str] = "controller"

    def __post_init__(self) -> None:
        from palsctl.validation import check_config_fields

        check_config_fields(self)

    @classmethod
    def from_dict(cls, params: dict[str, Any], *, file: str | None = None,
                  section: str | None = None) -> Self:
        """Build a Config from a dict, every invalid key or value reported at once.

        Parameters
        ----------
        params : dict
            Field name -> value.
        file : str or None
            The file the values came from (named in the errors).
        section : str or None
            Table the keys live in (default: the class's ``section``).

        Returns
        -------
        ControllerConfig
            An instance of the class it is called on.

        Raises
        ------
        ConfigError
            One line per error naming ``file``, ``<section>.<key>`` and the value (unknown keys
            with "did you mean").
        """
        from palsctl.validation import config_from_dict

        return cast(Self, config_from_dict(cls, params, file=file, section=section or cls.section))


class Controller(ABC):
    """Decides the next `Action` from a `Measurement` and a `Setpoint`.

    Pure: no clock, no I/O, no globals; randomness only from a generator seeded by the config.
    The loop calls `setup` once before the first `step`.

    Parameters
    ----------
    config : ControllerConfig, optional
        An instance of the class's ``Config`` (positional only).
    **params
        Or the Config's fields as keyword parameters (``PIController(margin=0.1)``); unknown
        keys raise `ConfigError`.

    Attributes
    ----------
    config : ControllerConfig
        The validated configuration.
    limits : Limits or None
        The plant's limits once `setup` ran.
    dt_s : float or None
        The control period once `setup` ran, s.
    plant_info : PlantInfo or None
        The plant's description once `setup` ran.
    """

    Config: ClassVar[type[ControllerConfig]] = ControllerConfig
    name: ClassVar[str] = "controller"
    #: True when the controller needs an offline power-performance model (``model=``, the
    #: Config's ``model_path``, or one profiled on the simulator's presets before the run).
    needs_model: ClassVar[bool] = False
    #: False for a baseline that stands for a deployment without power management: on the
    #: simulated plant `palsctl.experiment.run_experiment` runs it without the `SafetyGuard`.
    guarded: ClassVar[bool] = True
    #: The Config field ``palsctl compare --pareto`` sweeps and the values it takes (None: the
    #: controller has no such knob).
    aggressiveness: ClassVar[tuple[str, tuple[float, ...]] | None] = None

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
        """The control period the controller was tuned for, s (None: any).

        The loop refuses a plant whose ``dt_s`` differs."""
        return getattr(self.config, "dt_s", None)

    def setup(self, *, limits: Limits, dt_s: float, plant_info: PlantInfo | None) -> None:
        """Bind to a plant's limits and control period; resets internal state.

        Parameters
        ----------
        limits : Limits
            The plant's bounds.
        dt_s : float
            The control period, s.
        plant_info : PlantInfo or None
            What the controller may know about the plant (None: nothing).
        """
        self.limits, self.dt_s, self.plant_info = limits, dt_s, plant_info
        self.reset()

    @property
    def bound_limits(self) -> Limits:
        """The plant's `Limits` bound by `setup` (`RuntimeError` before it)."""
        if self.limits is None:
            raise RuntimeError(f"{type(self).__name__}.step() called before setup()")
        return self.limits

    @abstractmethod
    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action:
        """The action for this control period.

        Parameters
        ----------
        measurement : Measurement
            What the plant measured over the last window.
        setpoint : Setpoint
            What the operator asks for now (target, SLOs, power budget or target).

        Returns
        -------
        Action
            Per-GPU power cap (W) and batch limit; a knob left ``None`` stays as it is.
        """

    def reset(self) -> None:  # noqa: B027 - optional hook: a stateless controller has none
        """Forget internal state (integrators, filters, dwell timers)."""

    def diagnostics(self) -> dict[str, Any]:
        """Internal terms of the last step (JSON-serialisable scalars)."""
        return {}
