"""steady_state: the closed-form saturated operating point, and its agreement with SimPlant."""
import numpy as np
import pytest

from palsctl.errors import ConfigError, UnknownNameError
from palsctl.plants.sim import SimPlant, SteadyState, get_model, steady_state
from palsctl.types import Request


def test_fields_and_units():
    s = steady_state("llama-3.1-8b", "h100-sxm", 1, 64, prompt_tokens=200, output_tokens=400)
    assert isinstance(s, SteadyState)
    assert s.tokens_per_joule == pytest.approx(s.throughput_tok_s / s.power_w)
    assert 0 < s.itl_median_s <= s.itl_p90_s
    assert 0 < s.sm_clock_mhz <= 1980 and s.power_w <= 700 + 1e-6
    # accepts spec objects as well as names
    s2 = steady_state(get_model("llama-3.1-8b"), "h100-sxm", 1, 64, prompt_tokens=200,
                      output_tokens=400)
    assert s2 == s


def test_bad_input():
    with pytest.raises(ConfigError, match="max_batch"):
        steady_state("llama-3.1-8b", "h100-sxm", 1, 0)
    with pytest.raises(ConfigError, match="power_cap_w"):
        steady_state("llama-3.1-8b", "h100-sxm", 1, 8, power_cap_w=100)
    with pytest.raises(UnknownNameError, match="known: .*qwen3-8b"):
        steady_state("llama-9", "h100-sxm", 1, 8)


@pytest.mark.parametrize("model, gpu, n, batch, cap, prompt, output", [
    ("llama-3.1-8b", "h100-sxm", 1, 8, None, 200, 400),
    ("llama-3.1-8b", "h100-sxm", 1, 256, None, 200, 400),
    ("qwen3-30b-a3b", "h100-sxm", 1, 64, 400, 200, 900),
    ("mixtral-8x7b", "a100-sxm4-80gb", 4, 64, None, 100, 6),
    ("mixtral-8x7b", "a100-sxm4-80gb", 4, 64, 200, 100, 6),
    ("mixtral-8x7b", "a100-sxm4-80gb", 4, 1, None, 100, 6),
    ("qwen3-32b", "h100-sxm", 2, 256, None, 1500, 250),      # KV-limited: batch < 256
])
def test_saturated_plant_matches_steady_state(model, gpu, n, batch, cap, prompt, output):
    """A saturated run (big backlog at t=0, output lengths varying ±50 %) settles where
    steady_state says: throughput and power within 6 %."""
    rng = np.random.default_rng(0)
    guess = steady_state(model, gpu, n, batch, cap, prompt, output)
    # the backlog starts as one synchronised wave: warm up over a few request lifetimes
    warm = max(15.0, 4.0 * guess.request_latency_s)
    window = max(20.0, 3.0 * guess.request_latency_s)
    count = int(guess.throughput_tok_s * (warm + window) / output * 1.5) + 100
    outs = rng.integers(output // 2, output + output // 2 + 1, size=count)
    p = SimPlant(model, gpu, n, max_batch_launch=batch, power_cap_w=cap, noise=False)
    p.submit([Request(request_id=i, arrival_s=0.0, prompt_tokens=prompt,
                      output_tokens=int(o)) for i, o in enumerate(outs)])
    p.advance(warm)
    p.read()
    p.advance(window)
    m = p.read()
    assert m.waiting > 0, "backlog ran dry"
    s = steady_state(model, gpu, n, batch, cap, prompt, float(outs.mean()),
                     output_cv=float(outs.std() / outs.mean()))
    assert m.throughput_tok_s == pytest.approx(s.throughput_tok_s, rel=0.06)
    assert m.power_w == pytest.approx(s.power_w, rel=0.06)
    assert m.sm_clock_mhz == pytest.approx(s.sm_clock_mhz, rel=0.06)
    if s.kv_limited:
        assert m.running == pytest.approx(s.batch, rel=0.06)
