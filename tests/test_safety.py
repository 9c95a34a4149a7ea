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
        r = g.step(meas(k + 1.0, energy, stale=stale), Setpoint(power_budget_w=budget))
        a = r.action
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
                assert cap == LIM.power_cap_min_w and "below" in r.note
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
        a = g.step(meas(k + 1.0, 1000.0 * (k + 1)), Setpoint(power_budget_w=b)).action
        assert a.power_cap_w == budget_cap_w(LIM, b)[0] or a.power_cap_w * 4 <= b


def test_budget_fit_rounds_down_to_step():
    assert budget_cap_w(LIM, 900.0) == (225.0, True)
    assert budget_cap_w(LIM, 919.0) == (225.0, True)  # 229.75 -> 225 on a 5 W grid
    assert budget_cap_w(LIM, 300.0) == (100.0, False)
    assert budget_cap_w(LIM, None) == (400.0, True)


def test_stale_and_counter_reset_hold_safe_action_and_say_so():
    g = guarded([Action(power_cap_w=300.0, max_batch=32), Action(power_cap_w=400.0, max_batch=64),
                 Action(power_cap_w=400.0, max_batch=64)])
    a = (r := g.step(meas(1, 1000), Setpoint(power_budget_w=1400))).action
    assert (a.power_cap_w, a.max_batch) == (300.0, 32) and r.note == ""
    a = (r := g.step(meas(2, 2000, stale=True), Setpoint(power_budget_w=1400))).action
    assert (a.power_cap_w, a.max_batch) == (300.0, 32) and "stale" in r.note
    a = (r := g.step(meas(3, 2000, stale=True), Setpoint(power_budget_w=900))).action
    assert a.power_cap_w == 225.0  # the budget still wins while holding
    # counter went backwards
    a = (r := g.step(meas(4, 10.0), Setpoint(power_budget_w=1400))).action
    assert a.power_cap_w == 225.0 and "backwards" in r.note
    a = (r := g.step(meas(5, float("nan")), Setpoint(power_budget_w=1400))).action
    assert a.power_cap_w == 225.0 and "invalid" in r.note
    a = (r := g.step(meas(6, 1010.0), Setpoint(power_budget_w=1400))).action  # healthy again
    # healthy again: the controller's second output (400 W) lowered to fit 1400 W / 4 GPUs
    assert a.power_cap_w == 350.0 and r.note == "cap 400 W lowered to 350 W to fit budget"


def test_controller_exception_falls_back_and_logs_once(caplog):
    g = guarded([RuntimeError])
    with caplog.at_level(logging.WARNING, logger="palsctl.safety"):
        for k in range(5):
            r = g.step(meas(k + 1, 1000.0 * (k + 1)), Setpoint(power_budget_w=1000))
            a = r.action
            assert a.power_cap_w == 250.0 and "RuntimeError" in r.note
    assert len([r for r in caplog.records if r.name == "palsctl.safety"]) == 1
    assert g.faults == 5


def test_rate_limit_on_increase_and_batch():
    g = guarded([Action(power_cap_w=200.0, max_batch=8), Action(power_cap_w=400.0, max_batch=200)],
                max_cap_change_w=50.0, max_batch_change=16)
    g.step(meas(1, 1000), Setpoint())
    a = (r := g.step(meas(2, 2000), Setpoint())).action
    assert (a.power_cap_w, a.max_batch) == (250.0, 24)
    assert "limited" in r.note


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


# -- closed-loop budget enforcement, stale-data detection, the step record --------------------
def over(t, power_w, *, cap=300.0, running=64):
    return Measurement(t_s=t, window_s=1.0, power_w=power_w, energy_j=1000.0 * t,
                       throughput_tok_s=100.0, power_cap_w=cap, max_batch=256, running=running)


def test_measured_power_over_budget_tightens_on_the_second_window():
    g = guarded([Action(power_cap_w=400.0, max_batch=200)])
    sp = Setpoint(power_budget_w=1200)                     # fits 300 W per GPU
    caps = [g.step(over(k + 1, 1500.0), sp).action.power_cap_w for k in range(2)]
    assert caps == [300.0, 300.0]          # first window: no budget yet; second: 1 over
    r = g.step(over(3, 1500.0), sp)        # two windows over by 25 %: the safe cap
    assert r.action.power_cap_w == 100.0 and "over budget 1200 W for 2 steps" in r.note
    assert r.action.max_batch == 200 and r.fault == ""
    r = g.step(over(4, 1500.0, cap=100.0, running=40), sp)  # still over at the floor: batch
    assert r.action.power_cap_w == 100.0 and r.action.max_batch == 20
    assert "batch ceiling 20" in r.note and g.tightenings == 2


def test_the_first_window_under_a_budget_cut_is_not_counted_as_disobedience():
    """A cut acts from the window that follows it, and that window still settles (firmware, an
    engine step in flight): a guard counting it would fall to the minimum cap when the next
    window is still a little over, although the devices hold their caps."""
    g = guarded([Action(power_cap_w=400.0, max_batch=200)])
    hi, lo = Setpoint(power_budget_w=2000), Setpoint(power_budget_w=1200)   # 1200: 300 W/GPU
    g.step(over(1, 1500.0, cap=400.0), hi)
    g.step(over(2, 1500.0, cap=400.0), lo)          # cut: the caps go to 300 W at once
    r1 = g.step(over(3, 1700.0, cap=300.0), lo)     # the first window under 1200 W: settling
    r2 = g.step(over(4, 1300.0, cap=300.0), lo)     # one window over the band: not yet
    r3 = g.step(over(5, 1190.0, cap=300.0), lo)     # holding
    assert [r.action.power_cap_w for r in (r1, r2, r3)] == [300.0, 300.0, 300.0]
    assert g.tightenings == 0
    # a device that keeps drawing over the band after the first window is still caught
    r4 = g.step(over(6, 1400.0, cap=300.0), lo)
    r5 = g.step(over(7, 1400.0, cap=300.0), lo)
    assert r4.action.power_cap_w == 300.0 and r5.action.power_cap_w == 100.0
    assert "over budget 1200 W for 2 steps" in r5.note


def test_cap_not_obeyed_cuts_the_batch_at_once():
    g = guarded([Action(power_cap_w=400.0, max_batch=128)])
    sp = Setpoint(power_budget_w=1200)
    g.step(over(1, 1100.0), sp)
    g.step(over(2, 1400.0, cap=400.0), sp)                    # the device kept 400 W
    r = g.step(over(3, 1400.0, cap=400.0, running=100), sp)
    assert "cap not obeyed (400 W in force)" in r.note
    assert r.action.max_batch == 50 and r.action.power_cap_w == 100.0


def test_a_cap_that_is_not_held_is_found_and_the_ceiling_settles_under_the_budget():
    """Firmware that holds 10 % above the cap commanded (and reads back the commanded one):
    two windows over, the safe cap for one, then the ceiling the measured ratio says."""
    g = guarded([Action(power_cap_w=400.0, max_batch=128)])
    sp = Setpoint(power_budget_w=1200)
    cap, powers, caps = 300.0, [], []
    for k in range(16):
        p = 4 * cap * 1.1                       # what the devices draw under the last cap
        powers.append(p)
        cap = g.step(over(k + 1, p, cap=cap), sp).action.power_cap_w
        caps.append(cap)
    assert powers[1] == powers[2] == 1320.0 and caps[2] == 100.0       # 2 windows over
    assert powers[3:] == sorted(powers[3:]) and powers[-1] <= 1200    # then up, never over
    assert all(1200 * 0.95 <= p for p in powers[8:])                  # close under it
    assert caps[-1] == caps[-2] < 300.0 and g.tightenings == 1
    cap = g.step(over(17, 4 * cap, cap=cap), sp).action.power_cap_w  # the firmware is fixed:
    assert cap == 300.0                                # the cap is held, the ceiling vanishes


def test_a_budget_step_and_noise_inside_the_band_never_tighten():
    g = guarded([Action(power_cap_w=400.0, max_batch=64)])
    # the budget steps down: the first window after it still ran under the old budget
    g.step(over(1, 1590.0, cap=400.0), Setpoint(power_budget_w=1600))
    r = g.step(over(2, 1590.0, cap=400.0), Setpoint(power_budget_w=800))
    assert r.action.power_cap_w == 200.0 and "measured" not in r.note
    for k in range(3, 40):   # power within 3 % over the budget: noise, never a fault
        r = g.step(over(k, 800.0 * 1.029, cap=200.0), Setpoint(power_budget_w=800))
        assert r.action.power_cap_w == 200.0 and "measured" not in r.note
    assert g.tightenings == 0


def test_dry_run_plant_is_not_enforced():
    from palsctl.types import PlantInfo
    g = SafetyGuard(Scripted([Action(power_cap_w=400.0, max_batch=64)]))
    g.setup(limits=LIM, dt_s=1.0, plant_info=PlantInfo(model="m", gpu="g", num_gpus=4,
                                                       simulated=False, extra={"dry_run": True}))
    for k in range(5):
        a = g.step(over(k + 1, 2000.0), Setpoint(power_budget_w=1200)).action
    assert a.power_cap_w == 300.0 and g.tightenings == 0


def test_unflagged_stale_measurements_are_detected():
    g = guarded([Action(power_cap_w=300.0, max_batch=32), Action(power_cap_w=400.0, max_batch=64)])
    sp = Setpoint(power_budget_w=1600)
    assert g.step(meas(1, 1000), sp).fault == ""
    r = g.step(meas(1, 2000), sp)                               # time did not advance
    assert r.fault == "stale measurement (time not advancing)"
    assert r.action == Action(power_cap_w=300.0, max_batch=32) and "hold safe cap" in r.note
    r = g.step(meas(2, 2000), sp)                     # energy counter stands while 1 kW drawn
    assert r.fault == "stale measurement (energy counter not advancing)"
    assert r.requested == Action() and r.action.power_cap_w == 300.0
    r = g.step(meas(3, 3000), sp)
    assert r.fault == "" and r.requested == Action(power_cap_w=400.0, max_batch=64)


def test_guard_step_is_frozen_and_pass_through_passes():
    import dataclasses

    from palsctl.safety import GuardStep, PassThrough
    g = guarded([Action(power_cap_w=999.0, max_batch=64)])
    r = g.step(meas(1, 1000), Setpoint(power_budget_w=1000))
    assert isinstance(r, GuardStep) and r.requested == Action(power_cap_w=999.0, max_batch=64)
    assert r.action == Action(power_cap_w=250.0, max_batch=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.note = "x"
    p = PassThrough(Scripted([Action(power_cap_w=999.0)]))
    p.setup(limits=LIM, dt_s=1.0, plant_info=None)
    r = p.step(meas(1, 1000), Setpoint(power_budget_w=1000))
    assert r.requested is r.action and r.action == Action(power_cap_w=999.0) and r.note == ""
    with pytest.raises(TypeError):
        PassThrough(object())


def test_new_guard_settings_are_validated():
    for key, bad in [("power_tolerance_frac", 1.5), ("power_tolerance_frac", -0.1),
                     ("power_persist_steps", 0), ("enforce_measured_power", "yes")]:
        with pytest.raises(ConfigError, match=f"guard.{key}"):
            GuardConfig(**{key: bad})
