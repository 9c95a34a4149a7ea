"""PowerPerfModel on synthetic data from a known function: fit, recover, predict, gradients,
save/load and rejection of bad files."""
import dataclasses
import functools
import json
import math
import warnings

import numpy as np
import pytest

from palsctl.errors import ModelFileError, PalsctlError
from palsctl.models import Gradients, ModelRangeWarning, PowerPerfModel, Prediction
from palsctl.models.power_perf import _ALL_PARAMS, _Parametric
from palsctl.models.profile import sample_points

CAPS = np.arange(100.0, 401.0, 50.0)
BATCHES = np.array([1, 2, 4, 8, 16, 32, 64], dtype=float)
PROMPT, OUTPUT = 512.0, 256.0
# a known plant-like function (per GPU): idle 60 W, memory-bound small batches, cap-limited clock
TRUE = dict(p_idle=60.0, d_full=300.0, a_mem=0.5, v0=0.8, r_min=0.15, eta=1.0, f_max=1400.0,
            m0=0.012, m_moe=0.01, b_moe=3.0, m1=2e-5, k1=4e-4, s1=5e-5, f0=2e-3, rho=0.0, lam=0.0)
TRUE_PARAMS = {**TRUE, "a_itl": 1.2, "d_itl": 1e-3}
NUM_GPUS = 4


def truth(cap, b):
    x = np.array([TRUE[k] for k in _ALL_PARAMS])
    thr, p_gpu, r, t = _Parametric._core(x, cap, b, PROMPT, OUTPUT)
    return thr, NUM_GPUS * p_gpu, r * TRUE["f_max"], 1.2 * t + 1e-3


def make_rows(points, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c, b in points:
        thr, pw, clk, itl = (float(v) for v in truth(np.float64(c), np.float64(b)))
        rows.append(dict(power_cap_w=c, max_batch=b, prompt_tokens=PROMPT, output_tokens=OUTPUT,
                         num_gpus=NUM_GPUS, model="toy", gpu="toy-gpu", simulated="true",
                         throughput_tok_s=thr * (1 + noise * rng.standard_normal()),
                         power_w=pw * (1 + noise * rng.standard_normal()),
                         sm_clock_mhz=clk * (1 + noise * rng.standard_normal()),
                         itl_p90_s=itl * (1 + noise * rng.standard_normal())))
    return rows


@pytest.fixture(scope="module")
def rows12():
    return make_rows(sample_points(CAPS, BATCHES.astype(int), 12))


@pytest.fixture(scope="module")
def model(rows12):
    return PowerPerfModel.fit(rows12, kind="parametric", cv_folds=3)


def grid():
    return np.meshgrid(CAPS, BATCHES, indexing="ij")


def test_recovers_known_function_from_12_points(model):
    C, B = grid()
    T, P, _, itl = truth(C, B)
    p = model.predict(power_cap_w=C, max_batch=B)
    assert np.mean(np.abs(p.throughput_tok_s / T - 1)) < 0.03
    assert np.mean(np.abs(p.power_w / P - 1)) < 0.03
    assert np.mean(np.abs(p.itl_p90_s / itl - 1)) < 0.05
    assert model.num_gpus == NUM_GPUS and model.kind == "parametric"
    assert set(model.cv_mape) == {"throughput_tok_s", "power_w", "itl_p90_s"}
    assert all(0 <= v < 0.2 for v in model.cv_mape.values())
    assert model.training_ranges["power_cap_w"] == (100.0, 400.0)
    assert model.training_ranges["max_batch"] == (1.0, 64.0)
    assert model.plant == {"model": "toy", "gpu": "toy-gpu", "simulated": "true", "num_gpus": 4}


def test_predict_scalars_and_broadcasting(model):
    p = model.predict(power_cap_w=250.0, max_batch=16)
    assert isinstance(p, Prediction)
    assert all(isinstance(getattr(p, f), float) for f in
               ("throughput_tok_s", "power_w", "itl_p90_s", "tokens_per_joule"))
    assert p.tokens_per_joule == pytest.approx(p.throughput_tok_s / p.power_w)
    caps = np.array([150.0, 250.0, 350.0])[:, None]
    batches = np.array([1, 4, 16, 64])[None, :]
    g = model.predict(power_cap_w=caps, max_batch=batches)
    assert g.throughput_tok_s.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            s = model.predict(power_cap_w=float(caps[i, 0]), max_batch=int(batches[0, j]))
            assert g.throughput_tok_s[i, j] == pytest.approx(s.throughput_tok_s, rel=1e-12)
            assert g.power_w[i, j] == pytest.approx(s.power_w, rel=1e-12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.power_w = 1.0  # frozen


def test_physical_shape(model):
    b = np.array([1, 2, 4, 8, 16, 32, 64.0])
    for cap in (100.0, 250.0, 400.0):
        thr = model.predict(power_cap_w=cap, max_batch=b).throughput_tok_s
        assert np.all(np.diff(thr) > -1e-6 * thr[1:])  # never falls with batch
        assert thr[-1] > 2 * thr[0]  # and rises steeply from batch 1
    caps = np.linspace(100, 400, 13)
    p = model.predict(power_cap_w=caps, max_batch=64)
    assert np.all(np.diff(p.throughput_tok_s) >= -1e-9)
    assert np.all(p.power_w <= NUM_GPUS * caps * 1.1 + 1e-9)


def test_warns_once_outside_training_range(rows12):
    m = PowerPerfModel.fit(rows12, kind="parametric", cv_folds=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.predict(power_cap_w=CAPS, max_batch=64)  # inside: silent
    with pytest.warns(ModelRangeWarning, match="power_cap_w"):
        m.predict(power_cap_w=500.0, max_batch=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.predict(power_cap_w=50.0, max_batch=128)  # already warned once


def _fd_truth(cap, b, h_c=1e-3, h_b=1e-4):
    t1, p1, _, _ = truth(cap + h_c, b)
    t0, p0, _, _ = truth(cap - h_c, b)
    tb1, pb1, _, _ = truth(cap, b + h_b)
    tb0, pb0, _, _ = truth(cap, b - h_b)
    return ((t1 - t0) / (2 * h_c), (tb1 - tb0) / (2 * h_b), (p1 - p0) / (2 * h_c),
            (pb1 - pb0) / (2 * h_b))


@pytest.mark.parametrize("cap,batch", [(150.0, 32.0), (200.0, 8.0), (380.0, 4.0)])
def test_gradients_match_the_known_function(model, cap, batch):
    g = model.gradients(cap, batch)
    assert isinstance(g, Gradients)
    dtc, dtb, dpc, dpb = (float(v) for v in _fd_truth(np.float64(cap), np.float64(batch)))
    scale_t = float(truth(np.float64(cap), np.float64(batch))[0])
    scale_p = float(truth(np.float64(cap), np.float64(batch))[1])
    # sensitivities relative to the level: per 100 W of cap and per doubling of the batch
    approx = functools.partial(pytest.approx, rel=0.1)
    assert g.dthroughput_dcap * 100 / scale_t == approx(dtc * 100 / scale_t, abs=0.03)
    assert g.dthroughput_dbatch * batch / scale_t == approx(dtb * batch / scale_t, abs=0.05)
    assert g.dpower_dcap * 100 / scale_p == approx(dpc * 100 / scale_p, abs=0.03)
    assert g.dpower_dbatch * batch / scale_p == approx(dpb * batch / scale_p, abs=0.03)


def test_gradients_vectorised_and_consistent_with_predict(model):
    caps = np.array([150.0, 300.0])
    g = model.gradients(caps, np.array([8.0, 32.0]))
    assert g.dthroughput_dcap.shape == (2,)
    h = 1e-2
    for i, (c, b) in enumerate(zip(caps, [8.0, 32.0])):
        p1 = model.predict(power_cap_w=c + h, max_batch=b)
        p0 = model.predict(power_cap_w=c - h, max_batch=b)
        assert g.dpower_dcap[i] == pytest.approx((p1.power_w - p0.power_w) / (2 * h), rel=0.02,
                                                 abs=1e-3)
    s = model.gradients(150.0, 8.0)
    assert isinstance(s.dthroughput_dcap, float)
    assert s.dthroughput_dcap == pytest.approx(float(g.dthroughput_dcap[0]))


@pytest.mark.parametrize("kind", ["parametric", "gbt", "forest"])
def test_save_load_round_trip(tmp_path, rows12, model, kind):
    m = model if kind == "parametric" else PowerPerfModel.fit(rows12, kind=kind, cv_folds=2)
    path = tmp_path / "model.json"
    m.save(path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["kind"] == kind
    m2 = PowerPerfModel.load(path)
    C, B = grid()
    a = m.predict(power_cap_w=C, max_batch=B)
    b = m2.predict(power_cap_w=C, max_batch=B)
    for f in ("throughput_tok_s", "power_w", "itl_p90_s", "tokens_per_joule"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert m2.cv_mape == pytest.approx(m.cv_mape)
    assert m2.training_ranges == m.training_ranges
    assert m2.plant == m.plant and m2.num_gpus == m.num_gpus and m2.kind == kind


@pytest.mark.parametrize("kind", ["gbt", "forest"])
def test_tree_evaluator_matches_scikit_learn(rows12, kind):
    m = PowerPerfModel.fit(rows12, kind=kind, cv_folds=0)
    rng = np.random.default_rng(3)
    caps = rng.uniform(100, 400, 300)
    batches = rng.uniform(1, 64, 300)
    p = m.predict(power_cap_w=caps, max_batch=batches)
    X = np.column_stack([caps, batches])
    for target in ("throughput_tok_s", "power_w"):
        est = m._backend.ensembles[target].sklearn_estimator
        np.testing.assert_allclose(getattr(p, target), np.exp(est.predict(X)), rtol=1e-12)


def _saved(tmp_path, model):
    path = tmp_path / "m.json"
    model.save(path)
    return path, json.loads(path.read_text())


def test_load_rejects_unknown_version(tmp_path, model):
    path, data = _saved(tmp_path, model)
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match="schema_version.*99"):
        PowerPerfModel.load(path)


@pytest.mark.parametrize("field", ["schema_version", "kind", "num_gpus", "features",
                                   "training_ranges", "cv_mape", "plant", "params"])
def test_load_rejects_missing_field_naming_it(tmp_path, model, field):
    path, data = _saved(tmp_path, model)
    del data[field]
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match=field):
        PowerPerfModel.load(path)


def test_load_rejects_missing_or_bad_parameter(tmp_path, model):
    path, data = _saved(tmp_path, model)
    del data["params"]["k1"]
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match="params.k1"):
        PowerPerfModel.load(path)
    path, data = _saved(tmp_path, model)
    data["params"]["d_full"] = "lots"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match="params.d_full"):
        PowerPerfModel.load(path)
    path, data = _saved(tmp_path, model)
    data["training_ranges"]["power_cap_w"] = [400, 100]
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match="training_ranges.power_cap_w"):
        PowerPerfModel.load(path)


def test_load_rejects_corrupted_files(tmp_path, model, rows12):
    path, _ = _saved(tmp_path, model)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(ModelFileError, match="not a JSON model file"):
        PowerPerfModel.load(path)
    path.write_bytes(b"\x80\x04\x95pickle")
    with pytest.raises(ModelFileError):
        PowerPerfModel.load(path)
    with pytest.raises(ModelFileError, match="not found"):
        PowerPerfModel.load(tmp_path / "absent.json")
    gbt = PowerPerfModel.fit(rows12, kind="gbt", cv_folds=0)
    path, data = _saved(tmp_path, gbt)
    data["params"]["power_w"]["left"] = data["params"]["power_w"]["left"][:-3]
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match="params.power_w"):
        PowerPerfModel.load(path)


def test_fit_from_csv_and_bad_inputs(tmp_path, rows12):
    import csv
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows12[0]))
        w.writeheader()
        w.writerows(rows12)
    m = PowerPerfModel.fit(path, cv_folds=0)
    assert m.n_points == 12 and m.num_gpus == NUM_GPUS
    assert m.workload == {"prompt_tokens": PROMPT, "output_tokens": OUTPUT}
    with pytest.raises(PalsctlError, match="kind"):
        PowerPerfModel.fit(rows12, kind="magic")
    with pytest.raises(PalsctlError, match="at least 4"):
        PowerPerfModel.fit(rows12[:3])
    with pytest.raises(PalsctlError, match="power_w"):
        PowerPerfModel.fit([{k: v for k, v in r.items() if k != "power_w"} for r in rows12])
    with pytest.raises(PalsctlError, match="not found"):
        PowerPerfModel.fit(tmp_path / "none.csv")


def test_fit_without_clock_or_workload_columns(rows12):
    slim = [{k: r[k] for k in ("power_cap_w", "max_batch", "throughput_tok_s", "power_w")}
            for r in rows12]
    m = PowerPerfModel.fit(slim, cv_folds=0, num_gpus=NUM_GPUS)
    assert math.isnan(m.predict(power_cap_w=200.0, max_batch=8).itl_p90_s)
    C, B = grid()
    T, P, _, _ = truth(C, B)
    p = m.predict(power_cap_w=C, max_batch=B)
    assert np.mean(np.abs(p.power_w / P - 1)) < 0.05
    assert np.mean(np.abs(p.throughput_tok_s / T - 1)) < 0.08


def test_varying_workload_becomes_a_feature():
    pts = sample_points(CAPS, BATCHES.astype(int), 12)
    rows = make_rows(pts)
    global PROMPT
    saved = PROMPT
    try:
        PROMPT = 2048.0
        rows += make_rows(pts, seed=1)
    finally:
        PROMPT = saved
    m = PowerPerfModel.fit(rows, cv_folds=0)
    assert m.features == ("power_cap_w", "max_batch", "prompt_tokens", "output_tokens")
    short = m.predict(power_cap_w=300.0, max_batch=32, prompt_tokens=512, output_tokens=256)
    long = m.predict(power_cap_w=300.0, max_batch=32, prompt_tokens=2048, output_tokens=256)
    assert long.throughput_tok_s < short.throughput_tok_s



def test_warns_for_other_workload_lengths_than_profiled(rows12):
    m = PowerPerfModel.fit(rows12, kind="parametric", cv_folds=0)
    assert m.training_ranges["prompt_tokens"] == (PROMPT, PROMPT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.predict(power_cap_w=200.0, max_batch=8, prompt_tokens=PROMPT, output_tokens=OUTPUT)
    with pytest.warns(ModelRangeWarning, match="prompt_tokens"):
        m.predict(power_cap_w=200.0, max_batch=8, prompt_tokens=4 * PROMPT)
