import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palsctl.controllers.baselines import CapToBudgetController, StaticController
from palsctl.errors import ConfigError
from palsctl.interfaces import Controller
from palsctl.safety import GuardConfig, SafetyGuard, budget_cap_w
from palsctl.types import Action, Limits, Measurement, Setpoint

LIM = Limits(power_cap_min_w=100, power_cap_max_w=400, power_cap_default_w=400,
             power_cap_step_w=5, max_batch_min=1, max_batch_max=256, num_gpus=4)


class Scripted(Controller):
    """Returns the next scripted output (an Action, an exception to raise, or anything)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)
        self.i = 0

    def step(self, measurement, setpoint):
        out = self.outputs[self.i % len(self.outputs)]
        self.i += 1
        if isinstance(out, type) and issubclass(out, BaseException):
            raise out("boom")
        return out


def meas(t, energy_j, *, power_w=1000.0, stale=False, cap=400.0):
    return Measurement(t_s=t, window_s=1.0, power_w=power_w, energy_j=energy_j,
                       throughput_tok_s=100.0, power_cap_w=cap, max_batch=256, stale=stale)


def guarded(outputs, **cfg):
    g = SafetyGuard(Scripted(outputs), GuardConfig(**cfg))
    g.setup(limits=LIM, dt_s=1.0, plant_info=None)
    return g


weird = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none(),
                  st.integers(-10**9, 10**9))
weird_batch = st.one_of(st.none(), st.integers(-10**6, 10**6), st.floats(allow_nan=True))
actions = st.builds(Action, power_cap_w=weird, max_batch=weird_batch)
outputs = st.one_of(actions, st.just(RuntimeError), st.just("not an action"))
budgets = st.one_of(st.none(), st.floats(min_value=0, max_value=5000, allow_nan=False))
stale_flags = st.booleans()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(outputs, budgets, stale_flags, st.booleans()), min_size=1, max_size=30),
       st.one_of(st.none(), st.floats(min_value=1, max_value=200)))
def test_applied_caps_within_limits_and_budget(steps, max_change):
    g = guarded([o for o, *_ in steps], max_cap_change_w=max_change)
    energy = 0.0
    last_cap = None
    for k, (_, budget, stale, reset) in enumerate(steps):
        energy = 0.0 if reset else energy + 1000.0
        a = g.step(meas(k + 1.0, energy, stale=stale), Setpoint(power_budget_w=budget))
        cap, batch = a.power_cap_w, a.max_batch
        assert isinstance(cap, float) and math.isfinite(cap)
        assert LIM.power_cap_min_w <= cap <= LIM.power_cap_max_w
        assert isinstance(batch, int) and LIM.max_batch_min <= batch <= LIM.max_batch_max
        # on the cap grid
        assert abs((cap - LIM.power_cap_min_w) / LIM.power_cap_step_w
                   - round((cap - LIM.power_cap_min_w) / LIM.power_cap_step_w)) < 1e-9
        if budget is not None:
            if budget >= LIM.num_gpus * LIM.power_cap_min_w:
                assert cap * LIM.num_gpus <= budget + 1e-9
            else:
                assert cap == LIM.power_cap_min_w and "below" in g.last_note
        if stale and last_cap is not None:
            assert cap <= last_cap  # stale data never raises the cap
        if max_change is not None and last_cap is not None and cap > last_cap:
            assert cap - last_cap <= max_change + 1e-9  # increases are rate-limited
        last_cap = cap


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=400, max_value=1600), min_size=2, max_size=20))
def test_lowering_for_budget_is_never_rate_limited(budget_seq):
    g = guarded([Action(power_cap_w=400.0, max_batch=64)], max_cap_change_w=5.0)
    for k, b in enumerate(budget_seq):
        a = g.step(meas(k + 1.0, 1000.0 * (k + 1)), Setpoint(power_budget_w=b))
        assert a.power_cap_w == budget_cap_w(LIM, b)[0] or a.power_cap_w * 4 <= b


def test_budget_fit_rounds_down_to_step():
    assert budget_cap_w(LIM, 900.0) == (225.0, True)
    assert budget_cap_w(LIM, 919.0) == (225.0, True)  # 229.75 -> 225 on a 5 W grid
    assert budget_cap_w(LIM, 300.0) == (100.0, False)
    assert budget_cap_w(LIM, None) == (400.0, True)


def test_stale_and_counter_reset_hold_safe_action_and_say_so():
    g = guarded([Action(power_cap_w=300.0, max_batch=32), Action(power_cap_w=400.0, max_batch=64),
                 Action(power_cap_w=400.0, max_batch=64)])
    a = g.step(meas(1, 1000), Setpoint(power_budget_w=1400))
    assert (a.power_cap_w, a.max_batch) == (300.0, 32) and g.last_note == ""
    a = g.step(meas(2, 2000, stale=True), Setpoint(power_budget_w=1400))
    assert (a.power_cap_w, a.max_batch) == (300.0, 32) and "stale" in g.last_note
    a = g.step(meas(3, 2000, stale=True), Setpoint(power_budget_w=900))
    assert a.power_cap_w == 225.0  # the budget still wins while holding
    a = g.step(meas(4, 10.0), Setpoint(power_budget_w=1400))  # counter went backwards
    assert a.power_cap_w == 225.0 and "backwards" in g.last_note
    a = g.step(meas(5, float("nan")), Setpoint(power_budget_w=1400))
    assert a.power_cap_w == 225.0 and "invalid" in g.last_note
    a = g.step(meas(6, 1010.0), Setpoint(power_budget_w=1400))  # healthy again
    # healthy again: the controller's second output (400 W) lowered to fit 1400 W / 4 GPUs
    assert a.power_cap_w == 350.0 and g.last_note == "cap 400 W lowered to 350 W to fit budget"


def test_controller_exception_falls_back_and_logs_once(caplog):
    g = guarded([RuntimeError])
    with caplog.at_level(logging.WARNING, logger="palsctl.safety"):
        for k in range(5):
            a = g.step(meas(k + 1, 1000.0 * (k + 1)), Setpoint(power_budget_w=1000))
            assert a.power_cap_w == 250.0 and "RuntimeError" in g.last_note
    assert len([r for r in caplog.records if r.name == "palsctl.safety"]) == 1
    assert g.faults == 5


def test_rate_limit_on_increase_and_batch():
    g = guarded([Action(power_cap_w=200.0, max_batch=8), Action(power_cap_w=400.0, max_batch=200)],
                max_cap_change_w=50.0, max_batch_change=16)
    g.step(meas(1, 1000), Setpoint())
    a = g.step(meas(2, 2000), Setpoint())
    assert (a.power_cap_w, a.max_batch) == (250.0, 24)
    assert "limited" in g.last_note


def test_guard_config_validation():
    with pytest.raises(ConfigError, match="max_cap_change_w"):
        GuardConfig(max_cap_change_w=-1.0)
    with pytest.raises(ConfigError, match="max_batch_change"):
        GuardConfig(max_batch_change=0)
    with pytest.raises(ConfigError, match="guard.bogus"):
        GuardConfig.from_dict({"bogus": 1}, section="guard")


def test_baselines():
    s = StaticController()
    s.setup(limits=LIM, dt_s=1.0, plant_info=None)
    assert s.step(meas(1, 1), Setpoint(power_budget_w=500)) == Action(power_cap_w=400.0,
                                                                      max_batch=256)
    c = CapToBudgetController(max_batch=64)
    c.setup(limits=LIM, dt_s=1.0, plant_info=None)
    assert c.step(meas(1, 1), Setpoint(power_budget_w=900)) == Action(power_cap_w=225.0,
                                                                      max_batch=64)
    assert c.step(meas(2, 2), Setpoint()).power_cap_w == 400.0
    with pytest.raises(ConfigError, match="controller.max_batch"):
        CapToBudgetController(max_batch=0)
