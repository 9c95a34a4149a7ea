"""Step tests on the simulated plant and models from the offline model's gradients."""
import functools
import math

import numpy as np
import pytest

from palsctl.analysis.identify import fopdt_from_gradients, identify_from_step_test, step_test
from palsctl.analysis.report import analyze_points, operating_points, pi_gains
from palsctl.errors import ConfigError
from palsctl.models import Gradients

sim = pytest.importorskip("palsctl.plants.sim")


def _make(num_gpus=1, dt_s=1.0):
    return functools.partial(sim.SimPlant, "llama-3.1-8b", "h100-sxm", num_gpus, dt_s=dt_s,
                             seed=0, noise=False)


def test_gradients_map_to_each_loops_gain():
    g = Gradients(dthroughput_dcap=2.5, dthroughput_dbatch=40.0, dpower_dcap=4.0,
                  dpower_dbatch=3.0)
    kw = dict(num_gpus=4, dt_s=1.0, window_s=1.0, tau_s=0.1, delay_s=0.0)
    assert fopdt_from_gradients(g, loop="budget", **kw).gain == pytest.approx(1.0)  # per GPU
    assert fopdt_from_gradients(g, loop="margin", **kw).gain == 2.5
    b = fopdt_from_gradients(g, loop="batch", **kw)
    assert b.gain == 40.0 and b.source == "model-gradients" and b.input_name == "batch"
    with pytest.raises(ConfigError):
        fopdt_from_gradients(g, loop="nope", **kw)
    with pytest.raises(ConfigError):
        fopdt_from_gradients(Gradients(dthroughput_dcap=math.nan, dthroughput_dbatch=0,
                                       dpower_dcap=0, dpower_dbatch=0), loop="margin", **kw)


def test_batch_step_test_is_paired_and_finds_a_positive_gain():
    t = step_test(_make(), loop="batch", power_cap_w=700.0, max_batch=32, step=4.0)
    k0 = int(np.flatnonzero(np.diff(t.u))[0]) + 1
    # the paired run removes the engine's own swings before the step: flat at the level
    assert np.ptp(t.y[:k0]) == pytest.approx(0.0, abs=1e-9)
    p = identify_from_step_test(t)
    ss = [sim.steady_state("llama-3.1-8b", "h100-sxm", 1, max_batch=b, prompt_tokens=200,
                           output_tokens=400).throughput_tok_s for b in (32, 36)]
    assert p.gain > 0
    assert p.gain == pytest.approx((ss[1] - ss[0]) / 4.0, rel=0.35)   # vs the steady state


def test_budget_loop_gain_is_per_gpu_on_a_tensor_parallel_group():
    # 2 GPUs: 1 W more cap per GPU is 2 W more total power, i.e. 1 W per GPU
    make = functools.partial(sim.SimPlant, "qwen3-14b", "h100-sxm", 2, dt_s=1.0, seed=0,
                             noise=False)
    p = identify_from_step_test(step_test(make, loop="budget", power_cap_w=300.0,
                                          max_batch=64, step=20.0))
    assert p.gain == pytest.approx(1.0, rel=0.02)


def test_operating_points_span_load_and_budget():
    pts = operating_points(model="llama-3.1-8b", gpu="h100-sxm", num_gpus=1,
                           max_batch_launch=128, cap_min_w=200.0, cap_max_w=700.0,
                           prompt_tokens=200, output_tokens=400)
    assert [(p.load, p.budget) for p in pts] == [
        (ld, b) for ld in ("low", "medium", "high") for b in ("loose", "tight")]
    for p in pts:   # the cap binds
        assert max(200.0, p.power_floor_per_gpu_w) < p.power_cap_w < p.natural_draw_per_gpu_w
    assert [p.max_batch for p in pts[::2]] == [8, 32, 64]


def test_report_uses_model_gradients_beside_the_step_test():
    class FakeModel:           # a model whose gradients say 1 W/W per GPU for the budget loop
        def gradients(self, power_cap_w, max_batch, **kw):
            return Gradients(dthroughput_dcap=1.0, dthroughput_dbatch=10.0, dpower_dcap=0.9,
                             dpower_dbatch=1.0)

    pt = [p for p in operating_points(model="llama-3.1-8b", gpu="h100-sxm", num_gpus=1,
                                      max_batch_launch=128, cap_min_w=200.0, cap_max_w=700.0,
                                      prompt_tokens=200, output_tokens=400)
          if p.name == "high-load/tight-budget"]
    from palsctl.controllers.pi import FALLBACK_GAINS
    rep = analyze_points(experiment="t", model="llama-3.1-8b", gpu="h100-sxm", num_gpus=1,
                         max_batch_launch=128, dt_s=1.0, gains=pi_gains(FALLBACK_GAINS),
                         power_model=FakeModel(), points=pt, recommend=False)
    srcs = {r.model_source: r for r in rep.loops}
    assert set(srcs) == {"step-test", "model-gradients"}
    assert srcs["model-gradients"].analysis.plant.gain == pytest.approx(0.9)
    assert srcs["step-test"].analysis.plant.gain == pytest.approx(1.0, rel=0.02)
    # the model's lag and dead time are the step test's (the model is static)
    assert srcs["model-gradients"].analysis.plant.tau_s == srcs["step-test"].analysis.plant.tau_s
