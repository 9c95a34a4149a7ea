"""The B200-only terms of the plant (host time per running and per prefilling sequence, the
routed experts' own bandwidth and FLOP/s fractions): off in the H100-fitted set that Hopper and
Ampere use, on for B200, where the plant stays physical under a cap."""
import pytest

from palsctl.plants.sim import SimPlant, default_constants, get_gpu, get_model, steady_state
from palsctl.plants.sim.calibration import B200_TERMS, FITTED
from palsctl.plants.sim.gpu import GroupModel
from palsctl.types import Request

OFF = {"host_seq_time_s": 0.0, "prefill_seq_time_s": 0.0, "expert_bw_ratio": 1.0,
       "expert_flops_ratio": 1.0}


def test_terms_are_b200_only_in_the_fit():
    assert set(B200_TERMS) == set(OFF)
    assert not set(B200_TERMS) & set(FITTED)      # the H100 set never fits them


@pytest.mark.parametrize("gpu", ["a100-sxm4-80gb", "a100-sxm4-40gb", "h100-sxm", "h200"])
def test_terms_are_off_outside_b200(gpu):
    c = default_constants(gpu)
    assert {k: getattr(c, k) for k in OFF} == OFF
    gm = GroupModel(get_model("mixtral-8x7b"), get_gpu(gpu), 4)
    # a step with decodes and two prefilling sequences: the host time is the fixed one only
    cost = gm.step_cost(64, 64 * 300.0, 512, 512 * 256.0, 2 * 256.0, 2)
    assert cost.t_fixed_s == c.step_overhead_s + c.layer_time_s * 32


def test_terms_are_on_for_b200():
    c = default_constants("b200")
    assert c.host_seq_time_s > 0 and c.prefill_seq_time_s > 0
    assert 0 < c.expert_bw_ratio <= 1 and 0 < c.expert_flops_ratio <= 1


def test_b200_host_time_grows_with_sequences_and_prefills():
    gm = GroupModel(get_model("llama-3.1-8b"), get_gpu("b200"), 1)
    c = gm.constants
    base = gm.step_cost(8, 8 * 300.0).t_fixed_s
    assert gm.step_cost(16, 16 * 300.0).t_fixed_s == pytest.approx(base + 8 * c.host_seq_time_s)
    pref = gm.step_cost(8, 8 * 300.0, 200, 200 * 100.0, 200.0, 1).t_fixed_s
    assert pref == pytest.approx(base + c.host_seq_time_s + c.prefill_seq_time_s)


@pytest.mark.parametrize("args", [(8, 2400.0), (8, 2400.0, 200, 20000.0, 200.0, 1),
                                  (0, 0.0, 1024, 524288.0, 1024.0, 3)])
def test_b200_max_clock_fast_path_matches_the_step_cost(args):
    gm = GroupModel(get_model("qwen3-30b-a3b"), get_gpu("b200"), 1)
    c = gm.step_cost(*args)
    assert gm.time_power_max_clock(*args) == (gm.step_time(c, 1.0), gm.power_per_gpu(c, 1.0))


@pytest.mark.parametrize("model, n, par, batch", [
    ("llama-3.1-8b", 1, "tp", 8), ("llama-3.1-8b", 1, "tp", 256), ("qwen3-32b", 1, "tp", 128),
    ("qwen3-30b-a3b", 1, "tp", 64), ("gpt-oss-120b", 1, "tp", 512),
    ("qwen3-235b-a22b", 8, "tp+ep", 128)])
def test_b200_throughput_rises_with_cap_and_power_fits_it(model, n, par, batch):
    g = get_gpu("b200")
    prev = 0.0
    for cap in range(int(g.min_cap_w), int(g.tdp_w) + 1, 50):
        s = steady_state(model, g, n, batch, power_cap_w=cap, prompt_tokens=200,
                         output_tokens=400, output_cv=0.8, parallelism=par)
        assert s.throughput_tok_s >= prev * (1 - 1e-9), cap
        prev = s.throughput_tok_s
        assert s.power_w <= g.tdp_w * n * (1 + 1e-9)
        # the cap holds unless the lowest clock's draw is above it (a floor the firmware cannot
        # go under)
        if s.sm_clock_mhz > g.min_sm_clock_mhz * (1 + 1e-6):
            assert s.power_w <= cap * n * (1 + 1e-6), cap


def test_b200_sim_plant_holds_the_cap():
    plant = SimPlant("qwen3-30b-a3b", "b200", 1, max_batch_launch=128, power_cap_w=450.0,
                     noise=False, seed=0)
    plant.submit([Request(request_id=i, arrival_s=0.01 * i, prompt_tokens=200,
                          output_tokens=400) for i in range(600)])
    for _ in range(10):
        plant.advance(1.0)
        m = plant.read()
        assert m.power_w <= 450.0 * (1 + 1e-6)
        assert m.throughput_tok_s > 0
