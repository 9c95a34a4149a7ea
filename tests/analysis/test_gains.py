"""`recommend_pi_gains`: the pi controller's recommended gains for a preset or gradients."""
import itertools
import math

import numpy as np
import pytest

from palsctl.analysis import recommend_pi_gains
from palsctl.analysis.gains import PI_PARAM_NAMES, preset_gradients, recommend_loop_gains
from palsctl.analysis.plant_model import FOPDT
from palsctl.analysis.stability import analyze_loop
from palsctl.errors import ConfigError
from palsctl.models import Gradients

PRESET = dict(model="llama-3.1-8b", gpu="h100-sxm", num_gpus=1, max_batch_launch=128)


@pytest.mark.parametrize("dt_s", [0.5, 1.0])
def test_recommended_gains_meet_the_margins_at_every_plant_exactly(dt_s):
    g = recommend_pi_gains(dt_s=dt_s, **PRESET)
    assert set(g.loops) == {"batch", "margin", "budget"}
    for loop, lg in g.loops.items():
        worst = 0.0
        for p in lg.plants:
            res = analyze_loop(p, kp=lg.kp, ki=lg.ki)     # python-control's exact analysis
            assert res.stable and res.meets_margins, (loop, p, res.gain_margin_db,
                                                      res.phase_margin_deg)
            worst = max(worst, res.step.settling_time_s)
        # the screening's settling time is the exact one (whole periods)
        assert lg.worst_settling_time_s == pytest.approx(worst, abs=dt_s + 1e-9)
        assert lg.min_gain_margin_db >= 6.0 and lg.min_phase_margin_deg >= 45.0
    # the budget loop (1 W of power per W of cap) settles within seconds, not minutes
    assert g.loops["budget"].worst_settling_time_s <= 10.0
    assert g.params().keys() == {n for pair in PI_PARAM_NAMES.values() for n in pair}


def test_no_grid_gains_settle_faster_with_the_margins():
    """Brute force with python-control on a coarse grid: no gains meeting the margins at every
    plant have a worst-case settling time more than one period shorter."""
    plants = [FOPDT(gain=k, tau_s=0.0, delay_s=d, dt_s=1.0, window_s=1.0)
              for k, d in itertools.product((20.0, 50.0), (0.0, 1.6))]
    lg = recommend_loop_gains(plants, loop="batch")
    best = math.inf
    for a, b in itertools.product(np.linspace(0, 1.5, 9), np.geomspace(0.01, 1.5, 9)):
        kp, ki = a / 50.0, b / 50.0
        rs = [analyze_loop(p, kp=kp, ki=ki) for p in plants]
        if all(r.meets_margins for r in rs):
            best = min(best, max(r.step.settling_time_s for r in rs))
    assert math.isfinite(best)
    assert lg.worst_settling_time_s <= best + 1.0


def test_gradients_give_the_same_gains_as_the_preset_they_come_from():
    pg = preset_gradients(PRESET["model"], PRESET["gpu"], 1, 128, 200.0, 400.0)
    by_preset = recommend_pi_gains(dt_s=1.0, **PRESET, loops=("batch",))
    by_grads = recommend_pi_gains(dt_s=1.0, gradients=pg["batch"], loops=("batch",))
    assert by_grads.params() == pytest.approx(by_preset.params())
    assert "gradients" in by_grads.source and "preset" in by_preset.source


def test_model_gradients_objects_are_accepted_and_scale_the_gains():
    grads = [Gradients(dthroughput_dcap=1.0, dthroughput_dbatch=k, dpower_dcap=2.0,
                       dpower_dbatch=1.0) for k in (30.0, 60.0)]
    g1 = recommend_pi_gains(dt_s=1.0, gradients=grads, num_gpus=2)
    assert g1.loops["budget"].plants[0].gain == pytest.approx(1.0)   # per GPU
    double = [Gradients(dthroughput_dcap=2.0, dthroughput_dbatch=2 * g.dthroughput_dbatch,
                        dpower_dcap=2.0, dpower_dbatch=1.0) for g in grads]
    g2 = recommend_pi_gains(dt_s=1.0, gradients=double, num_gpus=2)
    # twice the plant gain, half the controller gain, same dynamics
    assert g2.loops["batch"].kp == pytest.approx(g1.loops["batch"].kp / 2)
    assert g2.loops["batch"].ki == pytest.approx(g1.loops["batch"].ki / 2)
    assert g2.loops["batch"].worst_settling_time_s == g1.loops["batch"].worst_settling_time_s


def test_results_are_cached_for_a_controller_setup():
    a = recommend_pi_gains(dt_s=1.0, **PRESET)
    b = recommend_pi_gains(dt_s=1.0, **PRESET)
    assert a.loops["batch"] is b.loops["batch"]          # computed once


@pytest.mark.parametrize("kw,needle", [
    (dict(dt_s=0.0, **PRESET), "dt_s"),
    (dict(dt_s=1.0), "preset"),
    (dict(dt_s=1.0, model="nope", gpu="h100-sxm"), "model"),
    (dict(dt_s=1.0, gradients=[]), "gradients"),
    (dict(dt_s=1.0, loops=("speed",), **PRESET), "loops"),
    (dict(dt_s=1.0, gradients=[Gradients(dthroughput_dcap=0.0, dthroughput_dbatch=1.0,
                                         dpower_dcap=1.0, dpower_dbatch=0.0)]), "margin"),
])
def test_bad_input_is_a_config_error(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        recommend_pi_gains(**kw)
