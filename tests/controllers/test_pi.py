"""`pi`: velocity-form increments, bumpless start, anti-windup, budget feed-forward, signs."""
from __future__ import annotations

import pytest

from palsctl.controllers.pi import FALLBACK_GAINS, PIController
from palsctl.errors import ConfigError
from palsctl.types import Measurement, Setpoint
from tests.support.doubles import limits4, plant_info4


def _m(cap=250.0, batch=64, thr=1000.0, power=800.0, running=64, waiting=0, demand=None,
       tpot=None):
    return Measurement(t_s=1.0, window_s=1.0, power_w=power, energy_j=0.0, throughput_tok_s=thr,
                       running=running, waiting=waiting, demand_tok_s=demand, tpot_p90_s=tpot,
                       power_cap_w=cap, max_batch=batch)


def _pi(**kw):
    c = PIController(**kw)
    c.setup(limits=limits4(), dt_s=1.0, plant_info=plant_info4())
    return c


def test_config_names_units_and_validation():
    cfg = PIController().config
    for name in ("kp_batch_per_tok_s", "ki_batch_per_tok", "kp_cap_w_per_tok_s", "ki_cap_w_per_tok",
                 "kp_cap_budget", "ki_cap_budget_per_s", "dt_s"):
        assert hasattr(cfg, name)
    with pytest.raises(ConfigError, match="kp_batch_per_tok_s"):
        PIController(kp_batch_per_tok_s=-1.0)
    with pytest.raises(ConfigError, match="unknown"):
        PIController(kp=1.0)


def test_velocity_form_batch_increment():
    kp, ki = 0.02, 0.05
    c = _pi(kp_batch_per_tok_s=kp, ki_batch_per_tok=ki, kp_cap_w_per_tok_s=0.0,
            ki_cap_w_per_tok=0.0, batch_deadband=0, drain_s=0.0)
    sp = Setpoint(throughput_tok_s=1000.0)
    a1 = c.step(_m(thr=900.0, waiting=5), sp)          # e1 = 100, first step: no P kick
    assert a1.max_batch == round(64 + ki * 1.0 * 100)
    a2 = c.step(_m(batch=a1.max_batch, thr=800.0, waiting=5), sp)   # e2 = 200
    expected = c.diagnostics()["batch_continuous"]
    assert expected == pytest.approx(64 + ki * 100 + kp * (200 - 100) + ki * 200)
    assert a2.max_batch == round(expected)


def test_bumpless_start_holds_the_knobs_in_force():
    c = _pi()
    u_ref = c.config.utilisation_ref
    a = c.step(_m(cap=237.0, batch=80, running=round(u_ref * 80), thr=1000.0, demand=900.0),
               Setpoint(throughput_tok_s=1000.0))
    # at the reference utilisation, no backlog: nothing moves
    assert a.max_batch == 80
    assert a.power_cap_w == 237.0


def test_cap_rises_on_backlog_and_falls_when_everything_is_served():
    c = _pi(kp_cap_w_per_tok_s=0.0, ki_cap_w_per_tok=0.01)
    sp = Setpoint(throughput_tok_s=1000.0)
    up = c.step(_m(cap=200.0, thr=500.0, waiting=50), sp)
    assert up.power_cap_w > 200.0
    c.reset()
    down = c.step(_m(cap=200.0, batch=256, running=5, thr=990.0, waiting=0, demand=900.0), sp)
    assert down.power_cap_w < 200.0
    c.reset()
    busy = c.step(_m(cap=200.0, batch=256, running=200, thr=990.0, waiting=0), sp)
    assert busy.power_cap_w > 200.0


def test_antiwindup_at_the_ceiling_no_delay_when_the_error_reverses():
    c = _pi(kp_cap_w_per_tok_s=0.0, ki_cap_w_per_tok=0.1)
    sp = Setpoint(throughput_tok_s=1000.0)
    for _ in range(50):  # huge sustained shortfall: the cap saturates at the maximum
        a = c.step(_m(cap=400.0, thr=100.0, waiting=100), sp)
        assert a.power_cap_w == 400.0
    # served again: the very next step moves the cap down (nothing wound up)
    a = c.step(_m(cap=400.0, batch=256, running=5, thr=1000.0, waiting=0, demand=900.0), sp)
    assert a.power_cap_w < 400.0


def test_budget_feedforward_and_budget_loop():
    c = _pi()
    a = c.step(_m(cap=400.0, power=1500.0), Setpoint(throughput_tok_s=1000.0,
                                                     power_budget_w=900.0))
    assert a.power_cap_w * 4 <= 900.0
    assert c.diagnostics()["e_budget_w"] is not None and c.diagnostics()["e_budget_w"] < 0


def test_power_target_mode_tracks_the_target():
    c = _pi(kp_cap_budget=0.0, ki_cap_budget_per_s=0.5)
    a = c.step(_m(cap=300.0, power=1000.0), Setpoint(power_target_w=800.0))
    assert a.power_cap_w == pytest.approx(300.0 + 0.5 * (800.0 - 1000.0) / 4, abs=1.0)


def test_tpot_over_objective_shrinks_batch_when_saturated_and_raises_cap():
    c = _pi()
    sp = Setpoint(throughput_tok_s=1000.0, tpot_slo_s=0.05)
    a = c.step(_m(cap=200.0, batch=128, running=128, thr=1000.0, tpot=0.1), sp)
    a = c.step(_m(cap=a.power_cap_w, batch=a.max_batch, running=a.max_batch, thr=1000.0,
                  tpot=0.1), sp)
    assert a.max_batch < 128
    assert a.power_cap_w > 200.0


def test_stale_measurement_holds():
    c = _pi()
    m = Measurement(t_s=1.0, window_s=1.0, power_w=0.0, energy_j=0.0, throughput_tok_s=0.0,
                    power_cap_w=250.0, max_batch=64, stale=True)
    a = c.step(m, Setpoint(throughput_tok_s=1000.0))
    assert (a.power_cap_w, a.max_batch) == (250.0, 64)


def test_latency_margin_moves_the_tpot_reference():
    # p90 TPOT 0.09 s under a 0.1 s SLO: no TPOT action without a margin; with a 20 % margin
    # the reference is 0.08 s and the cap loop adds r·(0.09 − 0.08)/0.08 to its error
    sp = Setpoint(throughput_tok_s=1000.0, tpot_slo_s=0.1)
    m = _m(running=int(0.15 * 64), tpot=0.09)  # utilisation at its reference: e_c = 0
    plain = _pi(tpot_ref_fraction=None)  # the utilisation reference (no per-token reference)
    tight = _pi(tpot_ref_fraction=None, latency_margin=0.2)
    plain.step(m, sp)
    tight.step(m, sp)
    assert plain.diagnostics()["e_cap_tok_s"] == pytest.approx(1000.0 * (9 / 64 - 0.15) / 0.15)
    assert tight.diagnostics()["e_cap_tok_s"] == pytest.approx(1000.0 * 0.01 / 0.08)
    with pytest.raises(ConfigError, match="latency_margin"):
        PIController(latency_margin=-0.1)


def test_cap_integrator_keeps_sub_watt_increments():
    # power-target mode, 1 W per GPU under the target: each increment is Ki·dt·e = 0.3 W, less
    # than the plant's whole-watt resolution; the plant applies floor(cap). The float state
    # accumulates them, so the applied cap rises a watt every few steps instead of stalling.
    c = _pi(kp_cap_budget=0.0, ki_cap_budget_per_s=0.3, cap_deadband_w=0.0)
    sp = Setpoint(power_target_w=800.0)
    cap = 300.0
    for _ in range(10):
        a = c.step(_m(cap=cap, power=796.0), sp)   # e_p = +1 W per GPU, held constant
        cap = float(int(a.power_cap_w))
    assert cap == 303.0   # 10 × 0.3 W = 3 W (integrating from the applied cap: stuck at 300 W)
    # an outside change of a watt or more is taken over (bumpless, no windup of the state)
    a = c.step(_m(cap=250.0, power=796.0), sp)
    assert a.power_cap_w == 250.0


def test_per_token_time_reference_littles_law():
    # running / throughput is the mean time per output token; the margin loop holds the slower
    # of it and the p90 TPOT at tpot_ref_fraction × the TPOT objective: slower tokens raise the
    # cap, faster lower it
    sp = Setpoint(throughput_tok_s=1000.0, tpot_slo_s=0.1)
    c = _pi(tpot_ref_fraction=0.5)
    c.step(_m(running=60, thr=1000.0), sp)           # 0.06 s per token > 0.05 s
    assert c.diagnostics()["e_cap_tok_s"] == pytest.approx(1000.0 * (0.06 - 0.05) / 0.05)
    c.reset()
    down = c.step(_m(cap=200.0, running=20, thr=1000.0), sp)   # 0.02 s per token: spare speed
    assert down.power_cap_w < 200.0
    c.reset()
    up = c.step(_m(cap=200.0, running=80, thr=1000.0), sp)
    assert up.power_cap_w > 200.0
    c.reset()   # a p90 TPOT slower than the mean is what counts (the objective bounds the p90)
    c.step(_m(running=20, thr=1000.0, tpot=0.07), sp)
    assert c.diagnostics()["e_cap_tok_s"] == pytest.approx(1000.0 * (0.07 - 0.05) / 0.05)
    with pytest.raises(ConfigError, match="tpot_ref_fraction"):
        PIController(tpot_ref_fraction=0.0)


@pytest.mark.parametrize("model, gpu, n, prompt, output", [
    ("mixtral-8x7b", "a100-sxm4-80gb", 4, 1000.0, 250.0),
    ("llama-3.1-8b", "h100-sxm", 1, 512.0, 256.0)])
def test_default_gains_are_the_analysis_recommendation_and_meet_its_margins(model, gpu, n,
                                                                           prompt, output):
    """The controller and `palsctl analyze` agree: the gains a default `pi` runs on a preset
    plant are `recommend_pi_gains`' for it, and every loop keeps 6 dB / 45° at every load point
    the recommendation checked (the slowest, the batch loop, settles in ~2 minutes at worst)."""
    from palsctl.analysis import recommend_pi_gains
    from palsctl.types import Limits, PlantInfo

    lim = Limits(power_cap_min_w=100, power_cap_max_w=400, power_cap_default_w=400,
                 max_batch_max=256, num_gpus=n)
    c = PIController()
    c.setup(limits=lim, dt_s=1.0, plant_info=PlantInfo(
        model=model, gpu=gpu, num_gpus=n, simulated=True, prompt_tokens_mean=prompt,
        output_tokens_mean=output))
    rec = recommend_pi_gains(dt_s=1.0, model=model, gpu=gpu, num_gpus=n, max_batch_launch=256,
                             prompt_tokens=prompt, output_tokens=output)
    from palsctl.controllers.pi import ANALYSED_GAINS

    assert c.gains_source == "analysis"
    assert {k: c.gains[k] for k in ANALYSED_GAINS} == pytest.approx(
        {k: rec.params()[k] for k in ANALYSED_GAINS})
    for name in ("batch", "budget"):
        loop = rec.loops[name]
        assert loop.min_gain_margin_db >= 6.0 and loop.min_phase_margin_deg >= 45.0
        assert loop.worst_settling_time_s <= 180.0
    # a plant that is no preset: the documented fallback; gains given in the config win
    c2 = PIController(ki_cap_w_per_tok=0.1)
    c2.setup(limits=lim, dt_s=1.0, plant_info=PlantInfo(model="unknown", gpu="x", num_gpus=n,
                                                        simulated=False))
    assert c2.gains_source == "fallback" and c2.gains["ki_cap_w_per_tok"] == 0.1
    assert c2.gains["ki_batch_per_tok"] == FALLBACK_GAINS["ki_batch_per_tok"]


def test_deadbands_hold_small_moves_while_the_state_integrates():
    # a 0.3 W/step drift is not applied until it adds up to the deadband; then the knob moves
    c = _pi(kp_cap_budget=0.0, ki_cap_budget_per_s=0.3, cap_deadband_w=2.0)
    sp = Setpoint(power_target_w=800.0)
    caps = []
    cap = 300.0
    for _ in range(12):
        a = c.step(_m(cap=cap, power=796.0), sp)
        cap = float(a.power_cap_w)
        caps.append(cap)
    assert caps[:5] == [300.0] * 5            # 1.5 W accumulated: below the deadband
    assert caps[-1] >= 302.0                  # the state kept integrating
    assert len(set(caps)) <= 3                # moves by the deadband, not every step


def test_pi_serves_the_same_demand_estimate_as_search():
    """The arrival averages, burst average and level shift are the model-based controllers';
    fed the same windows, pi's estimate and search's agree (a fall, then a burst)."""
    from palsctl.controllers.search import SearchController

    pi, search = PIController(), SearchController()
    rates = [2000.0] * 120 + [1000.0] * 60 + [3000.0] * 5 + [1000.0] * 20
    for x in rates:
        m = _m(demand=x)
        a = pi._demand.update(m, Setpoint(), dt_s=1.0, output_tokens_mean=None)
        b = search._demand.update(m, Setpoint(), dt_s=1.0, output_tokens_mean=None)
        assert a == b
    assert a.arrivals_tok_s < 1500.0      # the lasting fall to 1,000 was followed


def test_a_window_far_over_the_tpot_objective_cuts_the_batch_by_one_period_of_finishes():
    # saturated at 200 sequences, no queue, throughput 2,000 tok/s of 256-token outputs: about
    # 8 sequences finish per second, so the limit goes at most that far below the running count
    # whatever the excess (it used to fall from 200 to the minimum on one window at 8x)
    c = _pi()
    sp = Setpoint(tpot_slo_s=0.03)
    kw = dict(cap=300.0, thr=2000.0, power=1000.0, demand=2000.0)
    c.step(_m(batch=200, running=200, tpot=0.02, **kw), sp)
    a = c.step(_m(batch=200, running=200, tpot=0.25, **kw), sp)
    assert 200 - 2000.0 / 256 - 1 <= a.max_batch < 200
    # the excess counts at most 1: 8x over the objective cuts no deeper than 2x does
    c2 = _pi()
    c2.step(_m(batch=200, running=200, tpot=0.02, **kw), sp)
    b = c2.step(_m(batch=200, running=200, tpot=0.06, **kw), sp)
    assert a.max_batch == b.max_batch


def test_throughput_before_latency_no_batch_cut_while_requests_wait():
    # a TPOT objective that is missed while requests queue: a smaller batch would only grow
    # the queue (the clock is what the cap loop raises for latency), so the limit holds
    c = _pi()
    sp = Setpoint(tpot_slo_s=0.03)
    kw = dict(cap=300.0, batch=200, running=200, thr=2000.0, power=1000.0, demand=3000.0,
              waiting=40)
    c.step(_m(tpot=0.02, **kw), sp)
    a = c.step(_m(tpot=0.06, **kw), sp)
    assert a.max_batch >= 200 and a.power_cap_w > 300.0
    # every slot filled and nobody waiting: the objective shrinks it
    c = _pi()
    kw.update(demand=2000.0, waiting=0)
    c.step(_m(tpot=0.02, **kw), sp)
    assert c.step(_m(tpot=0.06, **kw), sp).max_batch < 200


def test_leaving_saturation_gives_the_batch_no_kick():
    # a window with a queue raises the batch; the next, with free slots and no queue, must not
    # take it back through the proportional term (the loop is inactive, not at zero error)
    c = _pi(batch_deadband=0)
    sp = Setpoint()
    a = c.step(_m(batch=100, running=100, thr=1500.0, demand=2000.0, waiting=20), sp)
    a = c.step(_m(batch=100, running=100, thr=1500.0, demand=2000.0, waiting=20), sp)
    b = c.step(_m(batch=a.max_batch, running=60, thr=2000.0, demand=2000.0), sp)
    assert b.max_batch >= a.max_batch > 100
