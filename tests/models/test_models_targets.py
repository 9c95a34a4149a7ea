"""Accuracy targets of the offline model on the simulated plant, against the plant's
deterministic steady state over the full 7 caps x 7 batches grid. The model sees only 12
*measured* profile points (noisy sensors, finite windows), never the steady state."""
import numpy as np
import pytest

from palsctl.models import build_model_for
from palsctl.models.profile import default_grid
from palsctl.plants.sim import SimPlant, steady_state

PROMPT, OUTPUT = 512, 256
PLANTS = [("mixtral-8x7b", "a100-sxm4-80gb", 4), ("llama-3.1-8b", "h100-sxm", 1)]
TARGET_FRACTIONS = (0.3, 0.5, 0.7, 0.85, 0.9)


def choose(pred_thr, pred_tpj, target):
    """Index of the candidate with the best predicted tokens/J among those predicted to meet
    the throughput target (the PALS search rule)."""
    ok = pred_thr >= target
    assert ok.any()
    return int(np.argmax(np.where(ok, pred_tpj, -np.inf)))


@pytest.fixture(scope="module", params=PLANTS, ids=[p[0] for p in PLANTS])
def case(request):
    model, gpu, n = request.param
    caps, batches = default_grid(SimPlant(model=model, gpu=gpu, num_gpus=n).limits)
    assert len(caps) == 7 and len(batches) == 7
    C, B = (a.ravel() for a in np.meshgrid(caps, batches, indexing="ij"))
    truth = [steady_state(model, gpu, n, int(b), float(c), PROMPT, OUTPUT) for c, b in zip(C, B)]
    T = np.array([s.throughput_tok_s for s in truth])
    P = np.array([s.power_w for s in truth])
    m = build_model_for(model, gpu, n, prompt_tokens=PROMPT, output_tokens=OUTPUT, points=12,
                        seed=0, cv_folds=0)
    assert m.n_points == 12
    return m, C, B, T, P


def test_parametric_mape_on_full_grid_at_most_8_percent(case):
    m, C, B, T, P = case
    p = m.predict(power_cap_w=C, max_batch=B)
    mape_t = np.mean(np.abs(p.throughput_tok_s / T - 1))
    mape_p = np.mean(np.abs(p.power_w / P - 1))
    assert mape_t <= 0.08, mape_t
    assert mape_p <= 0.08, mape_p


@pytest.mark.parametrize("frac", TARGET_FRACTIONS)
def test_best_tokens_per_joule_within_3_percent(case, frac):
    """The model's best configuration for a throughput target is within 3 % of the true best.

    The configuration the model ranks best by tokens/J among those it predicts to meet a
    throughput target reaches at least 97 % of the best true tokens/J
    of the configurations that meet the target with a 3 % margin, while really delivering at
    least 97 % of the target. (A 3 % band on both axes: a configuration whose true throughput
    lies within a fraction of a per cent of the target is a coin toss for any model fitted to
    noisy measurements; the strict comparison is reported by bench/bench_models.py.)"""
    m, C, B, T, P = case
    p = m.predict(power_cap_w=C, max_batch=B)
    target = frac * T.max()
    i = choose(p.throughput_tok_s, p.tokens_per_joule, target)
    tpj = T / P
    best = tpj[T >= 1.03 * target].max()
    assert tpj[i] >= 0.97 * best, (C[i], B[i], tpj[i], best)
    assert T[i] >= 0.97 * target, (C[i], B[i], T[i], target)


@pytest.mark.parametrize("changes", [
    dict(bw_eff=0.65, flops_eff=0.45, dyn_power_frac=0.9, mem_activity=0.45, v_floor=0.7),
    dict(bw_eff=0.9, flops_eff=0.75, step_overhead_s=4e-3, dyn_power_frac=1.3, v_floor=0.9),
], ids=["slower-cooler", "faster-hotter"])
def test_targets_hold_under_another_calibration(changes):
    """The model is not tuned to one set of plant constants."""
    import dataclasses

    from palsctl.plants.sim.gpu import default_constants

    consts = dataclasses.replace(default_constants(), **changes)
    model, gpu, n = PLANTS[0]
    caps, batches = default_grid(SimPlant(model=model, gpu=gpu, num_gpus=n).limits)
    C, B = (a.ravel() for a in np.meshgrid(caps, batches, indexing="ij"))
    truth = [steady_state(model, gpu, n, int(b), float(c), PROMPT, OUTPUT, constants=consts)
             for c, b in zip(C, B)]
    T = np.array([s.throughput_tok_s for s in truth])
    P = np.array([s.power_w for s in truth])
    m = build_model_for(model, gpu, n, prompt_tokens=PROMPT, output_tokens=OUTPUT,
                        plant_kwargs={"constants": consts})
    p = m.predict(power_cap_w=C, max_batch=B)
    assert np.mean(np.abs(p.throughput_tok_s / T - 1)) <= 0.08
    assert np.mean(np.abs(p.power_w / P - 1)) <= 0.08
    tpj = T / P
    for frac in TARGET_FRACTIONS:
        target = frac * T.max()
        i = choose(p.throughput_tok_s, p.tokens_per_joule, target)
        assert tpj[i] >= 0.97 * tpj[T >= 1.03 * target].max(), (frac, C[i], B[i])
        assert T[i] >= 0.97 * target, (frac, C[i], B[i])
