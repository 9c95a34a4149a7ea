"""Every registered controller passes `palsctl.testing.check_controller` (hypothesis: actions
within limits and finite for any finite measurement, guarded total cap ≤ budget; deterministic
for a seed; settles on a constant setpoint), and serves the settling run's load within its
budget; the checks take a name, a class or an instance, and can fail."""
from __future__ import annotations

import pytest

from palsctl.controllers import FixedController
from palsctl.interfaces import Controller, ControllerConfig
from palsctl.registry import available
from palsctl.testing import check_controller
from palsctl.types import Action

BUILTIN = ["static", "cap-to-budget", "zeus", "batch-only", "pi", "mpc", "search", "search-truth",
           "cap-only", "fixed"]


def test_all_builtin_controllers_are_registered():
    assert set(BUILTIN) <= set(available("controller"))


@pytest.mark.parametrize("name", BUILTIN)
def test_check_controller(name):
    kw = {"duration_s": 200.0} if name == "mpc" else {}
    report = check_controller(name, max_examples=20, **kw)
    assert report.name == name and report.examples == 20
    # beyond what check_controller asserts: the settling run offers exactly the target, and
    # every controller serves it (QoS first) within the budget, over the run's last third
    assert report.throughput_tok_s >= 0.97 * report.target_tok_s, report
    assert report.power_w <= report.power_budget_w, report


class Bad(Controller):
    """Returns a cap above the plant's limits."""

    Config = ControllerConfig
    name = "bad-test"

    def step(self, measurement, setpoint):
        return Action(power_cap_w=self.bound_limits.power_cap_max_w + 50.0, max_batch=1)


def test_check_controller_catches_a_misbehaving_controller():
    """The checks can fail: a controller class that returns a cap above the limits is caught
    (no registration needed)."""
    with pytest.raises(AssertionError, match="outside"):
        check_controller(Bad, max_examples=5)


def test_check_controller_takes_a_class_with_params_or_an_instance():
    by_class = check_controller(FixedController, params={"power_cap_w": 300.0}, max_examples=5,
                                duration_s=60.0)
    assert by_class.name == "fixed" and by_class.final_action.power_cap_w == 300.0
    ctl = FixedController(power_cap_w=250.0)
    by_instance = check_controller(ctl, max_examples=5, duration_s=60.0)
    assert by_instance.final_action.power_cap_w == 250.0    # the instance's config was used
    assert ctl.limits is None                               # on copies: the instance untouched
    with pytest.raises(TypeError, match="params"):
        check_controller(ctl, params={"power_cap_w": 200.0})
    with pytest.raises(TypeError, match="registered name"):
        check_controller(42)
