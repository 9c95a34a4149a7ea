import dataclasses
import math

import pytest

from palsctl import Action, Limits, Measurement, Setpoint, register
from palsctl.errors import ConfigError, UnknownNameError
from palsctl.interfaces import Controller, ControllerConfig
from palsctl.registry import available, builtin, make_controller, resolve, unregister


def test_types_are_frozen_and_keyword_only():
    a = Action(power_cap_w=200.0, max_batch=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.power_cap_w = 100.0  # type: ignore[misc]  # the refused write is the test
    with pytest.raises(TypeError):
        Action(200.0, 8)  # type: ignore[misc]  # the refused call is the test
    assert Setpoint().power_budget_w is None


def test_limits_clamp_rounds_down_to_step_and_validates():
    lim = Limits(power_cap_min_w=100, power_cap_max_w=400, power_cap_default_w=400,
                 power_cap_step_w=25, max_batch_max=64)
    assert lim.clamp_cap_w(10) == 100
    assert lim.clamp_cap_w(999) == 400
    assert lim.clamp_cap_w(249) == 225
    assert lim.clamp_batch(0) == 1 and lim.clamp_batch(1000) == 64
    with pytest.raises(ValueError):
        Limits(power_cap_min_w=300, power_cap_max_w=200, power_cap_default_w=250)


def test_measurement_validity():
    m = Measurement(t_s=1, window_s=1, power_w=100, energy_j=10, throughput_tok_s=5)
    assert m.is_valid()
    assert not dataclasses.replace(m, power_w=math.nan).is_valid()
    assert not dataclasses.replace(m, energy_j=-1).is_valid()


@dataclasses.dataclass(frozen=True, kw_only=True)
class _HoldConfig(ControllerConfig):
    power_cap_w: float = 200.0


class _Hold(Controller):
    Config = _HoldConfig

    def step(self, measurement, setpoint):
        return Action(power_cap_w=self.config.power_cap_w)


def test_registry_lazy_and_class_targets_and_unknown_names(registered):
    registered("test-hold", _Hold)
    ctl = make_controller("test-hold", power_cap_w=150.0)
    assert ctl.config.power_cap_w == 150.0
    assert "test-hold" in available()
    with pytest.raises(ConfigError, match="bogus"):
        make_controller("test-hold", bogus=1)
    with pytest.raises(UnknownNameError, match="known: .*test-hold"):
        resolve("no-such-controller")
    registered("test-lazy", "palsctl.types:Action")
    assert resolve("test-lazy") is Action
    with pytest.raises(ValueError):
        register("bad", "no_colon_here")
    assert "bad" not in available()


def test_unregister_removes_a_name_and_restores_a_builtin_one():
    register("test-gone", _Hold)
    unregister("test-gone")
    assert "test-gone" not in available()
    with pytest.raises(UnknownNameError):
        unregister("test-gone")
    static = resolve("static")
    register("static", _Hold)            # a registration may shadow a built-in name ...
    assert resolve("static") is _Hold
    unregister("static")                 # ... and unregistering restores palsctl's class
    assert resolve("static") is static and "static" in builtin()
