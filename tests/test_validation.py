"""Controller and guard Configs validated with pydantic (the pattern documented on
`ControllerConfig`), and several errors carried by one `ConfigError`."""
import dataclasses
from typing import Annotated

import pytest
from pydantic import Field

from palsctl.errors import ConfigError
from palsctl.interfaces import ControllerConfig
from palsctl.registry import make_controller
from palsctl.safety import GuardConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig(ControllerConfig):
    gain: Annotated[float, Field(ge=0)] = 0.1
    lo_w: Annotated[float, Field(gt=0)] = 100.0
    hi_w: Annotated[float, Field(gt=0)] = 300.0
    steps_w: tuple[float, ...] = (10.0,)
    label: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lo_w > self.hi_w:
            raise ConfigError("must be <= hi_w", key=f"{self.section}.lo_w", value=self.lo_w)


def errors(exc_info) -> dict:
    return {e.key: e for e in exc_info.value.errors}


def test_every_field_error_at_once_with_did_you_mean():
    with pytest.raises(ConfigError) as info:
        DemoConfig.from_dict({"gain": -1, "lo_w": "100", "hi": 5, "label": 3}, file="f.toml")
    found = errors(info)
    assert set(found) == {"controller.gain", "controller.lo_w", "controller.hi",
                          "controller.label"}
    assert found["controller.gain"].message == "must be >= 0"
    assert found["controller.lo_w"].message == "must be a finite number"
    assert found["controller.lo_w"].value == "100"
    assert "did you mean 'hi_w'?" in found["controller.hi"].message
    assert all(e.file == "f.toml" for e in found.values())
    assert len(str(info.value).splitlines()) == 4


def test_cross_field_check_after_the_fields_and_moved_to_the_section():
    with pytest.raises(ConfigError) as info:
        DemoConfig.from_dict({"lo_w": 500}, file="f.toml")
    assert str(info.value) == "f.toml: key 'controller.lo_w': must be <= hi_w (got 500.0)"
    with pytest.raises(ConfigError) as info:
        DemoConfig.from_dict({"lo_w": 500}, section="pools.a.controller")
    assert info.value.key == "pools.a.controller.lo_w"


def test_values_are_converted_and_direct_construction_is_checked_too():
    c = DemoConfig.from_dict({"gain": 1, "steps_w": [1, 2.5]})
    assert c.gain == 1.0 and type(c.gain) is float and c.steps_w == (1.0, 2.5)
    with pytest.raises(ConfigError, match="controller.gain"):
        DemoConfig(gain=-0.5)
    with pytest.raises(ConfigError, match="must be a finite number"):
        DemoConfig(hi_w=float("inf"))


def test_registered_controllers_take_exact_types():
    with pytest.raises(ConfigError) as info:
        make_controller("pi", margin="0.1", kp_batch_per_tok_s=True)
    assert set(errors(info)) == {"controller.margin", "controller.kp_batch_per_tok_s"}
    with pytest.raises(ConfigError, match="controller.max_batch.*must be an integer"):
        make_controller("static", max_batch=3.0)
    # their own __post_init__ checks still run (and keep their keys)
    with pytest.raises(ConfigError, match="controller.margin"):
        make_controller("search", margin=5.0)
    assert make_controller("static", max_batch=3).config.max_batch == 3


def test_guard_config_section():
    with pytest.raises(ConfigError) as info:
        GuardConfig.from_dict({"max_batch_change": 0, "max_cap_change_w": -1.0})
    assert set(errors(info)) == {"guard.max_batch_change", "guard.max_cap_change_w"}
    assert GuardConfig.from_dict({"max_cap_change_w": 20}).max_cap_change_w == 20.0


def test_collect_flattens_and_keeps_the_first_errors_location():
    a = ConfigError("a", file="f", key="k", value=1)
    b = ConfigError.collect([ConfigError("b", key="j"), ConfigError("c")])
    both = ConfigError.collect([a, b])
    assert both.errors == (a, *b.errors) and (both.file, both.key, both.value) == ("f", "k", 1)
    assert str(both).splitlines() == ["f: key 'k': a (got 1)", "key 'j': b", "c"]
    assert ConfigError.collect([a]) is a
