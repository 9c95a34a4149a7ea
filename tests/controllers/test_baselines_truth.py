"""`zeus`, `batch-only` and `search-truth`."""
from __future__ import annotations

import dataclasses

import pytest

from palsctl.controllers.baselines import BatchOnlyController, ZeusController
from palsctl.controllers.truth import SearchTruthController
from palsctl.errors import ConfigError
from palsctl.types import Measurement, Setpoint
from tests.support.doubles import limits4, plant_info4


def _m(thr, power, cap=None, batch=None, running=0, waiting=0, demand=None):
    return Measurement(t_s=1.0, window_s=1.0, power_w=power, energy_j=0.0, throughput_tok_s=thr,
                       running=running, waiting=waiting, demand_tok_s=demand, power_cap_w=cap,
                       max_batch=batch)


def test_zeus_profiles_down_in_25w_steps_then_holds_the_cost_minimum():
    z = ZeusController(warmup_s=1.0, profile_s=3.0)
    z.setup(limits=limits4(), dt_s=1.0, plant_info=plant_info4())

    def plant(cap):  # throughput saturates with the cap, power follows it
        thr = 2000.0 * min(1.0, (cap - 60.0) / 200.0)
        return thr, 4 * (60.0 + 0.9 * (cap - 60.0))

    caps_seen, a = [], z.step(_m(0.0, 0.0), Setpoint())
    for _ in range(13 * 4 + 5):
        caps_seen.append(a.power_cap_w)
        thr, pw = plant(a.power_cap_w)
        a = z.step(_m(thr, pw, cap=a.power_cap_w), Setpoint())
        assert a.max_batch == 256
    profiled = sorted(set(caps_seen[:13 * 4]), reverse=True)
    assert profiled == [400.0 - 25.0 * k for k in range(13)]
    eta, maxp = 0.5, 1600.0

    def cost(cap):
        thr, pw = plant(cap)
        return eta * pw / thr + (1 - eta) * maxp / thr

    best = min(profiled, key=cost)
    assert z.diagnostics()["phase"] == "optimal"
    assert a.power_cap_w == best
    assert a.power_cap_w == z.step(_m(100.0, 500.0), Setpoint()).power_cap_w  # holds


def test_zeus_respects_a_budget_and_validates():
    z = ZeusController()
    z.setup(limits=limits4(), dt_s=1.0, plant_info=plant_info4())
    assert z.step(_m(0.0, 0.0), Setpoint(power_budget_w=800.0)).power_cap_w == 200.0
    with pytest.raises(ConfigError, match="eta"):
        ZeusController(eta=1.5)


def test_batch_only_keeps_full_cap_and_shrinks_batch_with_spare_capacity():
    c = BatchOnlyController()
    c.setup(limits=limits4(), dt_s=1.0, plant_info=plant_info4())
    sp = Setpoint(throughput_tok_s=1000.0)
    a = c.step(_m(1000.0, 1200.0, cap=400.0, batch=256, running=40), sp)
    assert a.power_cap_w == 400.0 and a.max_batch < 256
    a = c.step(_m(300.0, 1200.0, cap=400.0, batch=20, running=20, waiting=30), sp)
    assert a.max_batch > 20
    assert c.step(_m(1000.0, 1200.0, cap=400.0, batch=20, running=20),
                  Setpoint(throughput_tok_s=1000.0, power_budget_w=1000.0)).power_cap_w == 250.0


def test_search_truth_refuses_a_real_plant():
    o = SearchTruthController()
    with pytest.raises(ConfigError, match="simulated"):
        o.setup(limits=limits4(), dt_s=1.0, plant_info=plant_info4(simulated=False))


def test_search_truth_picks_the_cheapest_true_configuration_meeting_the_target():
    from palsctl.plants.sim import SimPlant, steady_state

    plant = SimPlant(model="mixtral-8x7b", gpu="a100-sxm4-80gb", num_gpus=4, seed=0)
    info = dataclasses.replace(plant.info, prompt_tokens_mean=512.0, output_tokens_mean=256.0)
    o = SearchTruthController(margin=0.0, cap_step_w=50.0)
    o.setup(limits=plant.limits, dt_s=1.0, plant_info=info)
    full = steady_state("mixtral-8x7b", "a100-sxm4-80gb", 4, 256, prompt_tokens=512,
                        output_tokens=256)
    target = 0.5 * full.throughput_tok_s
    a = o.step(_m(0.0, 0.0), Setpoint(throughput_tok_s=target))
    got = steady_state("mixtral-8x7b", "a100-sxm4-80gb", 4, a.max_batch,
                       power_cap_w=a.power_cap_w, prompt_tokens=512, output_tokens=256)
    assert got.throughput_tok_s >= target
    assert got.power_w < full.power_w
    a2 = o.step(_m(0.0, 0.0), Setpoint(throughput_tok_s=target, power_budget_w=600.0))
    assert a2.power_cap_w * 4 <= 600.0


def test_search_truth_is_search_on_the_ground_truth():
    # search-truth runs search's rule (headroom, latency objective, residuals, trim, hysteresis)
    # on the simulator's ground truth: search given a model that returns that truth acts alike
    from types import SimpleNamespace

    from palsctl.controllers.search import SearchController
    from palsctl.controllers.truth import truth_grid
    from palsctl.plants.sim import SimPlant

    plant = SimPlant(model="mixtral-8x7b", gpu="a100-sxm4-80gb", num_gpus=4, seed=0)
    info = dataclasses.replace(plant.info, prompt_tokens_mean=512.0, output_tokens_mean=256.0)
    g = truth_grid(info, plant.limits, cap_step_w=50.0)

    class Truth:
        def predict(self, *, power_cap_w, max_batch):
            assert list(power_cap_w) == list(g.cap_w) and list(max_batch) == list(g.batch)
            return SimpleNamespace(throughput_tok_s=g.throughput_tok_s, power_w=g.power_w,
                                   itl_p90_s=g.itl_p90_s)

    o = SearchTruthController(cap_step_w=50.0)
    s = SearchController(cap_step_w=50.0, model=Truth())
    for c in (o, s):
        c.setup(limits=plant.limits, dt_s=1.0, plant_info=info)
    sps = [Setpoint(throughput_tok_s=900.0, tpot_slo_s=0.1)] * 3 + \
        [Setpoint(throughput_tok_s=1800.0, power_budget_w=1000.0)] * 3
    ms = [_m(0.0, 0.0), _m(850.0, 700.0, cap=200.0, batch=64, running=60),
          _m(700.0, 650.0, cap=200.0, batch=64, running=64, waiting=12)] * 2
    acts = [(o.step(m, sp), s.step(m, sp)) for m, sp in zip(ms, sps)]
    assert all(a == b for a, b in acts)
    assert acts[-1][0].power_cap_w * 4 <= 1000.0
