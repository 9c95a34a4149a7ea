"""Verdicts a control engineer can trust: a model's fit to its step test beside every verdict,
unverified never stable, sluggish flagged, predictions checked on the closed loop."""
import functools
import math
from types import SimpleNamespace

import numpy as np
import pytest

from palsctl.analysis.identify import StepTest, assess_fit, identify_from_step_test, step_test
from palsctl.analysis.points import OperatingPoint
from palsctl.analysis.report import AnalysisReport, EmpiricalReport, LoopReport
from palsctl.analysis.stability import FOPDT, analyze_loop, simulate_fopdt_response
from palsctl.analysis.verify import controller_budget_step, verify_loop
from palsctl.interfaces import Controller
from palsctl.types import Action, Measurement, Setpoint

sim = pytest.importorskip("palsctl.plants.sim")

PT = OperatingPoint(name="p", load="high", budget="tight", max_batch=64, power_cap_w=300.0,
                    natural_draw_per_gpu_w=500.0, power_floor_per_gpu_w=200.0)
PLANT = FOPDT(gain=2.0, tau_s=0.5, delay_s=0.3, dt_s=1.0, window_s=1.0)


def _test(y, u, noise=None, repeats=1):
    return StepTest(loop="batch", t_s=np.arange(len(u)) * 1.0, u=np.asarray(u, float),
                    y=np.asarray(y, float), dt_s=1.0, window_s=1.0, power_cap_w=300.0,
                    max_batch=8, repeats=repeats, noise_rms=noise)


def _u():
    return np.r_[np.full(4, 8.0), np.full(26, 12.0)]


def test_fit_verdicts():
    u = _u()
    y = simulate_fopdt_response(PLANT, u - u[0]) + 100.0
    assert assess_fit(_test(y, u), PLANT).verdict == "fits"
    rng = np.random.default_rng(0)
    noisy = y + rng.normal(0, 2.0, y.shape)      # step 8, noise of the mean 2: SNR 4
    q = assess_fit(_test(noisy, u, noise=2.0, repeats=4), PLANT)
    assert q.verdict == "step lost in noise" and not q.ok
    noisy = y + rng.normal(0, 0.8, y.shape)      # SNR 10, residual ~ the noise
    q = assess_fit(_test(noisy, u, noise=0.8, repeats=4), PLANT)
    assert q.fit_pct < 80 or q.verdict == "fits"
    assert q.ok
    # an inverse response (dips before it rises) is not first order
    wrong = y.copy()
    wrong[5:8] -= 12.0
    q = assess_fit(_test(wrong, u, noise=0.5, repeats=4), PLANT)
    assert q.verdict == "does not fit" and not q.ok and "does not fit" in q.text()


def _report(fit_ok=True, kp=0.1, ki=0.2, verification=None, max_settling_s=60.0, plant=PLANT):
    fit = SimpleNamespace(ok=fit_ok, verdict="fits" if fit_ok else "does not fit",
                          text=lambda: "fit", to_dict=dict)
    return LoopReport(point=PT, loop="batch", model_source="step-test",
                      analysis=analyze_loop(plant, kp=kp, ki=ki), recommended_kp=None,
                      recommended_ki=None, recommended_settling_s=None, fit=fit,
                      max_settling_s=max_settling_s, verification=verification)


def test_loop_verdicts():
    ok = _report()
    assert ok.analysis.stable and ok.analysis.meets_margins and ok.verdict == "stable"
    unfit = _report(fit_ok=False)
    assert unfit.analysis.meets_margins and unfit.verdict == "unverified"
    assert "no verdict" in unfit.reason() and "the model itself" not in unfit.reason()
    assert "(the model itself is sluggish: settling" in _report(fit_ok=False, kp=0.0,
                                                                ki=0.005).reason()
    assert _report(kp=0.0, ki=2.0).verdict == "UNSTABLE"
    assert _report(fit_ok=False, kp=0.0, ki=2.0).verdict == "unverified"
    assert _report(kp=0.0, ki=0.6).verdict == "under margins"
    slow = _report(kp=0.0, ki=0.005)
    assert slow.analysis.meets_margins and slow.verdict == "sluggish"
    assert _report(kp=0.0, ki=0.005, max_settling_s=1e4).verdict == "stable"
    off = SimpleNamespace(band=0.02, agrees=False, text=lambda: "DISAGREES")
    assert _report(verification=off).verdict == "prediction off"
    noisy = SimpleNamespace(band=0.5, agrees=False, text=lambda: "DISAGREES")
    assert _report(verification=noisy).verdict == "stable"     # inconclusive: not a verdict


def test_summary_never_says_all_stable_unless_it_is():
    rep = AnalysisReport(experiment="x", plant={}, dt_s=1.0, gains={},
                         loops=[_report(), _report(fit_ok=False), _report(kp=0.0, ki=0.005)])
    line = rep.summary(min_gm_db=6, min_pm_deg=45, max_settling_s=60)
    assert not rep.all_stable and "all" not in line
    assert line == ("3 loops: 1 stable, 1 sluggish (settling over 60 s), 1 unverified (the "
                    "model does not fit its step test)")
    rep = AnalysisReport(experiment="x", plant={}, dt_s=1.0, gains={}, loops=[_report()])
    assert rep.all_stable and rep.summary(min_gm_db=6, min_pm_deg=45,
                                          max_settling_s=60).startswith("all 1 loops stable")
    good = SimpleNamespace(decays=True, limit_cycle=False, settling_time_s=3.0)
    rep.empirical.append(EmpiricalReport(point=PT, step=good))
    assert rep.summary(min_gm_db=6, min_pm_deg=45, max_settling_s=60).endswith(
        "; all 1 closed-loop budget steps settle within 60 s")
    bad = SimpleNamespace(decays=False, limit_cycle=True, settling_time_s=math.nan)
    rep.empirical.append(EmpiricalReport(point=PT, step=bad))
    assert not rep.all_stable and rep.counts() == {"stable": 2, "oscillates": 1}
    assert rep.summary(min_gm_db=6, min_pm_deg=45, max_settling_s=60) == (
        "3 loops and closed-loop steps: 2 stable, 1 oscillates")


def _b200():
    # a 32B dense model: its B200 draw spans ~360 W (lowest clock) to ~980 W (batch 128), so
    # the cap binds over the whole step
    return functools.partial(sim.SimPlant, "qwen3-32b", "b200", 1, dt_s=0.25, seed=0,
                             noise=False)


def test_verify_agrees_with_the_identified_model_and_catches_a_wrong_one():
    make = _b200()
    plant = identify_from_step_test(step_test(make, loop="budget", power_cap_w=400.0,
                                              max_batch=128, step=50.0))
    kw = dict(loop="budget", kp=0.3, ki=1.0, power_cap_w=400.0, max_batch=128, step=150.0)
    good = verify_loop(make, plant, **kw)
    assert good.agrees, good.text()
    # a model with a third of the real gain predicts a much slower loop: caught
    wrong = verify_loop(make, plant.with_gain(plant.gain / 3), **kw)
    assert not wrong.agrees and "DISAGREES" in wrong.text()
    assert wrong.measured_settling_s < wrong.predicted_settling_s


class _Flip(Controller):
    """Alternates the cap between the budget's share and 40 W below it: never settles."""

    name = "flip"

    def reset(self) -> None:
        self._k = 0

    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action:
        self._k += 1
        share = setpoint.power_budget_w / self.limits.num_gpus
        return Action(power_cap_w=share - 40.0 * (self._k % 2), max_batch=128)


def test_closed_loop_budget_step_settles_or_oscillates():
    from palsctl.registry import make_controller

    make = functools.partial(sim.SimPlant, "llama-3.1-8b", "h100-sxm", 1, dt_s=1.0, seed=0,
                             noise=False, max_batch_launch=128)
    kw = dict(max_batch=128, budget_before_w=450.0, budget_after_w=380.0,
              throughput_target_tok_s=1e5, warmup_s=20.0, record_s=40.0)
    calm = controller_budget_step(make, make_controller("cap-to-budget"), **kw)
    assert calm.decays and calm.settling_time_s <= 3.0
    assert calm.final_power_w <= 380.0 * 1.01 and calm.time_over_budget_s <= 1.0
    wild = controller_budget_step(make, _Flip(), **kw)
    assert not wild.decays and wild.limit_cycle and wild.controller == "flip"
    rep = EmpiricalReport(point=PT, step=wild)
    assert rep.verdict == "oscillates"
