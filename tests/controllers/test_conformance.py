"""Every registered controller passes `palsctl.testing.check_controller` (hypothesis: actions
within limits and finite for any finite measurement, guarded total cap ≤ budget; deterministic
for a seed; settles on a constant setpoint)."""
from __future__ import annotations

import pytest

from palsctl.registry import available
from palsctl.testing import check_controller

BUILTIN = ["static", "cap-to-budget", "zeus", "batch-only", "pi", "mpc", "search", "search-truth", "cap-only", "fixed"]


def test_all_builtin_controllers_are_registered():
    assert set(BUILTIN) <= set(available("controller"))


@pytest.mark.parametrize("name", BUILTIN)
def test_check_controller(name):
    kw = {"duration_s": 200.0} if name == "mpc" else {}
    report = check_controller(name, max_examples=20, **kw)
    assert report.limits and report.budget and report.deterministic and report.settles


def test_check_controller_catches_a_misbehaving_controller():
    """The checks can fail: a controller that returns a cap above the limits is caught."""
    from palsctl.interfaces import Controller, ControllerConfig
    from palsctl.registry import register
    from palsctl.types import Action

    class Bad(Controller):
        Config = ControllerConfig
        name = "bad-test"

        def step(self, measurement, setpoint):
            return Action(power_cap_w=self.limits.power_cap_max_w + 50.0, max_batch=1)

    register("bad-test", Bad)
    with pytest.raises(AssertionError, match="outside"):
        check_controller("bad-test", max_examples=5)
