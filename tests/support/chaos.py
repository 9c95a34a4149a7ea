"""Fault injection around a simulated plant, for the loop and chaos tests.

`FaultyPlant` wraps a `SimPlant` and, step by step, lets its sensor or its actuator misbehave the
way real ones do. The fault in force is an attribute the test sets before a step (or a script
keyed by step index):

sensor faults (``sensor``):
  ``"nan"``   — the reading's power is NaN;
  ``"none"``  — ``read()`` returns None;
  ``"raise"`` — ``read()`` raises `SensorError` (nothing read: the next read covers the gap);
  ``"stale"`` — ``read()`` repeats the previous reading without flagging it;
actuator faults (``actuator``):
  ``"raise"``  — ``apply()`` raises `ActuatorError` and applies nothing;
  ``"ignore"`` — cap writes are dropped (the batch still applies); read-back tells the truth;
  ``"lie"``    — the firmware enforces ``lie_factor`` × the commanded cap but reads back and
  reports the commanded one (only the measured power shows it).

``true_cap_w`` is the cap the simulated GPUs really enforce.
"""
from __future__ import annotations

import math
from dataclasses import replace

from palsctl.errors import ActuatorError, SensorError
from palsctl.interfaces import SimulatedPlant
from palsctl.types import Action

SENSOR_FAULTS = ("nan", "none", "raise", "stale")
ACTUATOR_FAULTS = ("raise", "ignore", "lie")


class FaultyPlant(SimulatedPlant):
    def __init__(self, plant, *, sensor_script=None, actuator_script=None, lie_factor=1.3):
        self.inner = plant
        self.limits, self.dt_s, self.info = plant.limits, plant.dt_s, plant.info
        self.sensor: str | None = None
        self.actuator: str | None = None
        self.sensor_script = dict(sensor_script or {})
        self.actuator_script = dict(actuator_script or {})
        self.lie_factor = lie_factor
        self.reads = 0          # read() calls so far
        self.applies = 0        # apply() calls so far
        self._last = None
        self._commanded_cap_w: float | None = None

    @property
    def now_s(self) -> float:
        return self.inner.now_s

    @property
    def true_cap_w(self) -> float:
        return self.inner.engine.cap_set_w

    def submit(self, requests) -> None:
        self.inner.submit(requests)

    def advance(self, dt_s: float) -> None:
        self.inner.advance(dt_s)

    def completed(self):
        return self.inner.completed()

    def close(self) -> None:
        self.inner.close()

    def read(self):
        k = self.reads
        self.reads += 1
        fault = self.sensor_script.get(k, self.sensor)
        if fault == "raise":
            raise SensorError("injected: power endpoint unreachable")
        if fault == "none":
            return None
        if fault == "stale" and self._last is not None:
            return self._last
        m = self.inner.read()
        if self._commanded_cap_w is not None:     # lying firmware
            m = replace(m, power_cap_w=self._commanded_cap_w)   # the read-back lies too
        self._last = m
        if fault == "nan":
            return replace(m, power_w=math.nan)
        return m

    def apply(self, action: Action) -> Action:
        k = self.applies
        self.applies += 1
        fault = self.actuator_script.get(k, self.actuator)
        if fault == "raise":
            raise ActuatorError("injected: power limit write refused")
        if fault == "ignore":
            out = self.inner.apply(Action(max_batch=action.max_batch))
            self._commanded_cap_w = None
            return out
        if fault == "lie" and action.power_cap_w is not None:
            cap = self.limits.clamp_cap_w(action.power_cap_w)
            out = self.inner.apply(Action(power_cap_w=min(cap * self.lie_factor,
                                                          self.limits.power_cap_max_w),
                                          max_batch=action.max_batch))
            self._commanded_cap_w = cap
            return Action(power_cap_w=cap, max_batch=out.max_batch)
        self._commanded_cap_w = None
        return self.inner.apply(action)
