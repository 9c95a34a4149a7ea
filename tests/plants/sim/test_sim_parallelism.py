"""Properties of the plant that hold for every model preset and every parallelism (hypothesis),
and the physics of expert parallelism, expert coverage and large batches."""
import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from palsctl.errors import ConfigError
from palsctl.plants.sim import MODEL_PRESETS, SimPlant, get_gpu, get_model, steady_state
from palsctl.plants.sim.gpu import PARALLELISMS, GroupModel, PlantConstants
from palsctl.plants.sim.specs import weight_bytes_per_gpu
from palsctl.plants.sim.steady import group_model
from palsctl.types import Request

PROPS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])
GPUS = ("a100-sxm4-80gb", "h100-sxm", "h200", "b200")


def _fitting_gpus(model: str, gpu: str, parallelism: str) -> int:
    """The smallest power-of-two GPU count that holds the model (and a few requests' KV);
    the example is discarded when none does (a dense 405B model copied on every GPU)."""
    m, g = get_model(model), get_gpu(gpu)
    for n in (1, 2, 4, 8, 16, 32):
        per_gpu = weight_bytes_per_gpu(m, n, parallelism)
        if per_gpu < 0.9 * g.mem_bytes - 2e9 - 8e9:
            return n
    assume(False)


case = st.tuples(st.sampled_from(sorted(MODEL_PRESETS)), st.sampled_from(GPUS),
                 st.sampled_from(PARALLELISMS), st.integers(1, 512), st.integers(16, 2000),
                 st.integers(2, 1000))


@PROPS
@given(c=case)
def test_throughput_up_power_capped_itl_down_with_the_cap(c):
    model, gpu, par, batch, prompt, output = c
    n = _fitting_gpus(model, gpu, par)
    g = get_gpu(gpu)
    caps = [g.min_cap_w + f * (g.tdp_w - g.min_cap_w) for f in (0.0, 0.15, 0.35, 0.6, 1.0)]
    ss = [steady_state(model, gpu, n, batch, cap, prompt, output, parallelism=par,
                       output_cv=0.5, prompt_cv=0.5) for cap in caps]
    for a, b in zip(ss, ss[1:]):
        assert b.throughput_tok_s >= a.throughput_tok_s * (1 - 1e-9)
        assert b.itl_median_s <= a.itl_median_s * (1 + 1e-9)
        assert b.itl_p90_s <= a.itl_p90_s * (1 + 1e-9)
    for s, cap in zip(ss, caps):
        # the floor: at the lowest clock a GPU may still draw more than the lowest cap
        floor = steady_state(model, gpu, n, batch, g.min_cap_w, prompt, output, parallelism=par,
                             output_cv=0.5, prompt_cv=0.5).power_w
        assert s.power_w <= max(cap * n, floor) + 1e-6
        assert s.power_w <= g.tdp_w * n + 1e-6
        assert 0 < s.itl_median_s <= s.itl_p90_s


@PROPS
@given(c=case, cap_frac=st.sampled_from([0.2, 0.6, 1.0]))
def test_throughput_rises_with_the_batch_below_kv_saturation(c, cap_frac):
    model, gpu, par, _, prompt, output = c
    n = _fitting_gpus(model, gpu, par)
    g = get_gpu(gpu)
    cap = g.min_cap_w + cap_frac * (g.tdp_w - g.min_cap_w)
    prev = None
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        s = steady_state(model, gpu, n, b, cap, prompt, output, parallelism=par,
                         output_cv=0.5, prompt_cv=0.5)
        if prev is not None and not s.kv_limited:
            # once the cap holds the clock, more batch buys nothing: flat within the solver's
            # precision (clock bisection, 21-point admission mixture), hence the tolerance
            assert s.throughput_tok_s >= prev.throughput_tok_s * (1 - 1e-3), (b, par)
        if s.kv_limited:
            break
        prev = s


@PROPS
@given(model=st.sampled_from(sorted(MODEL_PRESETS)), gpu=st.sampled_from(GPUS),
       batch=st.integers(1, 256), cap_frac=st.floats(0.0, 1.0))
def test_all_parallelisms_agree_on_one_gpu(model, gpu, batch, cap_frac):
    m, g = get_model(model), get_gpu(gpu)
    if weight_bytes_per_gpu(m, 1) > 0.9 * g.mem_bytes - 2e9 - 8e9:
        return
    cap = g.min_cap_w + cap_frac * (g.tdp_w - g.min_cap_w)
    ss = [steady_state(model, gpu, 1, batch, cap, 300, 200, parallelism=p) for p in PARALLELISMS]
    assert ss[0] == ss[1] == ss[2]


def test_dense_model_ep_is_data_parallel():
    """For a dense model, "ep" is plain data parallelism: each GPU runs its share of the
    sequences on a full copy of the weights — no collectives, twice the weights per GPU."""
    gm_tp = group_model(get_model("qwen3-8b"), get_gpu("h100-sxm"), 2, None, "tp")
    gm_ep = group_model(get_model("qwen3-8b"), get_gpu("h100-sxm"), 2, None, "ep")
    assert gm_ep.weight_bytes_per_gpu == pytest.approx(2 * gm_tp.weight_bytes_per_gpu)
    c = gm_ep.step_cost(64, 64 * 1000.0)
    assert c.t_comm_s == 0.0 and gm_tp.step_cost(64, 64 * 1000.0).t_comm_s > 0
    # at small batch tp reads half the weights per GPU and wins; at large batch the same
    one = steady_state("qwen3-8b", "h100-sxm", 1, 8, None, 300, 300)
    ep = steady_state("qwen3-8b", "h100-sxm", 2, 16, None, 300, 300, parallelism="ep")
    assert ep.throughput_tok_s == pytest.approx(2 * one.throughput_tok_s, rel=0.02)


def test_expert_parallel_physics():
    m, g = get_model("qwen3-30b-a3b"), get_gpu("h100-sxm")
    tp = group_model(m, g, 4, None, "tp")
    tep = group_model(m, g, 4, None, "tp+ep")
    ep = group_model(m, g, 4, None, "ep")
    # weights per GPU: all split (tp, tp+ep); dense replicated, experts split (ep)
    assert tp.weight_bytes_per_gpu == tep.weight_bytes_per_gpu < ep.weight_bytes_per_gpu
    # load imbalance of whole experts: above 1, shrinking towards the static skew with tokens
    imb = [ep.expert_imbalance(t) for t in (1, 16, 256, 65536)]
    assert all(x > 1 for x in imb) and imb == sorted(imb, reverse=True)
    assert tp.expert_imbalance(16) == 1.0
    assert tep.step_cost(16, 0.0).exp_imbalance == ep.step_cost(16, 0.0).exp_imbalance > 1
    # data-parallel attention: each GPU reads its own sequences' KV; tp splits the KV heads,
    # but only as far as there are heads (4 here): on 8 GPUs tp holds every head twice
    tp8, ep8 = group_model(m, g, 8, None, "tp"), group_model(m, g, 8, None, "ep")
    assert ep8.step_cost(64, 64e3).m_att_s == pytest.approx(tp8.step_cost(64, 64e3).m_att_s / 2)
    # the expert-parallel step waits for the busiest GPU; that wait draws idle power only
    c = ep.step_cost(64, 64e3)
    balanced = c._replace(exp_imbalance=1.0)
    assert ep.step_time(c, 1.0) > ep.step_time(balanced, 1.0)
    assert ep.power_per_gpu(c, 1.0) < ep.power_per_gpu(balanced, 1.0)
    # all-gather + reduce-scatter per MoE layer instead of two all-reduces per layer
    assert ep.step_cost(64, 0.0).t_comm_s < tp.step_cost(64, 0.0).t_comm_s


@pytest.mark.parametrize("skew", [0.0, 0.4, 1.0])
def test_expert_coverage_grows_from_k_to_all_experts(skew):
    m, g = get_model("deepseek-moe-16b"), get_gpu("a100-sxm4-80gb")
    gm = GroupModel(m, g, 4, PlantConstants(route_skew=skew))
    d = [gm.distinct_experts(t) for t in (1, 2, 8, 64, 512, 10_000, 1e7)]
    assert d[0] == pytest.approx(m.experts_per_token)
    assert all(b >= a for a, b in zip(d, d[1:])) and d[-1] == pytest.approx(m.num_experts)
    if skew == 0.0:   # uniform routing: E (1 - (1 - k/E)^T)
        E, k = m.num_experts, m.experts_per_token
        assert d[3] == pytest.approx(E * (1 - (1 - k / E) ** 64), rel=1e-9)
    # interpolation between table points is continuous and monotone
    xs = [500 + 7.3 * i for i in range(200)]
    vals = [gm.distinct_experts(x) for x in xs]
    assert all(b >= a for a, b in zip(vals, vals[1:]))


def test_skewed_routing_touches_fewer_experts():
    m, g = get_model("qwen3-30b-a3b"), get_gpu("h100-sxm")
    uni = GroupModel(m, g, 1, PlantConstants(route_skew=0.0))
    skew = GroupModel(m, g, 1, PlantConstants(route_skew=0.8))
    assert skew.distinct_experts(32) < uni.distinct_experts(32)
    assert skew.step_cost(32, 0.0).m_exp_s < uni.step_cost(32, 0.0).m_exp_s


def test_itl_median_moves_smoothly_with_the_load():
    """No cliff where the share of steps carrying prefill passes one half."""
    meds = [steady_state("llama-3.1-8b", "h100-sxm", 1, 256, None, 200, o, output_cv=0.8,
                         prompt_cv=1.0).itl_median_s for o in range(300, 460, 10)]
    steps = [abs(b / a - 1) for a, b in zip(meds, meds[1:])]
    assert max(steps) < 0.06, [round(1e3 * x, 2) for x in meds]
    big = [steady_state("llama-3.1-70b", "h100-sxm", 4, b, None, 200, 400, output_cv=0.8,
                        prompt_cv=1.0).itl_median_s for b in (128, 160, 192, 224, 256)]
    assert all(b / a < 1.35 for a, b in zip(big, big[1:])), big


def test_kv_capacity_follows_memory_left_after_weights():
    g = get_gpu("h100-sxm")
    m = get_model("llama-3.1-70b")
    gm = group_model(m, g, 4, None, "tp")
    free = 0.9 * g.mem_bytes - m.weight_bytes / 4 - 2e9
    assert gm.kv_capacity_tokens == int(free / (m.kv_bytes_per_token / 4))
    # a sliding-window model holds far more long contexts than its full-layer bytes suggest
    oss = group_model(get_model("gpt-oss-20b"), g, 1, None, "tp")
    full = get_model("gpt-oss-20b").kv_bytes_per_token
    assert oss.kv_capacity_tokens > 1.9 * (0.9 * g.mem_bytes - get_model("gpt-oss-20b")
                                           .weight_bytes - 2e9) / full
    # past capacity the batch is KV-limited and throughput stops rising
    s = [steady_state("llama-3.1-70b", "h100-sxm", 4, b, None, 2000, 2000) for b in (256, 1024)]
    assert s[1].kv_limited and s[1].batch < 1024
    assert s[1].throughput_tok_s == pytest.approx(
        steady_state("llama-3.1-70b", "h100-sxm", 4, int(s[1].batch), None, 2000, 2000)
        .throughput_tok_s, rel=0.02)


def test_sim_plant_expert_parallel_runs_and_agrees_with_steady_state():
    p = SimPlant("qwen3-30b-a3b", "h100-sxm", 2, max_batch_launch=64, noise=False,
                 parallelism="ep")
    assert p.info.extra["parallelism"] == "ep" and p.parallelism == "ep"
    p.submit([Request(request_id=i, arrival_s=0.0, prompt_tokens=300,
                      output_tokens=150 + (i * 37) % 100) for i in range(3000)])
    p.advance(20.0)
    p.read()
    p.advance(20.0)
    m = p.read()
    s = steady_state("qwen3-30b-a3b", "h100-sxm", 2, 64, None, 300, 199.5, output_cv=0.145,
                     parallelism="ep")
    assert m.throughput_tok_s == pytest.approx(s.throughput_tok_s, rel=0.06)
    assert m.power_w == pytest.approx(s.power_w, rel=0.06)


def test_bad_parallelism_and_a_model_that_only_fits_split():
    with pytest.raises(ConfigError, match="parallelism"):
        SimPlant("qwen3-8b", "h100-sxm", 1, parallelism="pp")
    with pytest.raises(ConfigError, match="parallelism"):
        steady_state("qwen3-8b", "h100-sxm", 1, 8, parallelism="dp")
    # Qwen3-235B on 8×H100 fits split (tp, tp+ep), not with a copy of attention per GPU (ep)
    SimPlant("qwen3-235b-a22b", "h100-sxm", 8, parallelism="tp+ep")
    with pytest.raises(ConfigError, match="does not fit") as ei:
        SimPlant("qwen3-235b-a22b", "h100-sxm", 8, parallelism="ep")
    assert "num_gpus" in str(ei.value)


def test_fp8_uses_fp8_tensor_cores_at_their_own_efficiency():
    c = PlantConstants(flops_eff=0.6, fp8_flops_eff=0.3)
    g = get_gpu("h100-sxm")
    gm8 = GroupModel(get_model("llama-3.1-405b-fp8"), g, 8, c)
    gm16 = GroupModel(get_model("llama-3.1-405b"), g, 8, c)
    assert gm8._flops == pytest.approx(g.fp8_flops * 0.3)
    assert gm16._flops == pytest.approx(g.bf16_flops * 0.6)
    assert gm8.weight_bytes_per_gpu == pytest.approx(gm16.weight_bytes_per_gpu / 2, rel=0.01)
    assert math.isclose(gm8.step_cost(1, 0.0).m_lin_s * 2, gm16.step_cost(1, 0.0).m_lin_s,
                        rel_tol=0.02)
