"""Profiling sweeps on the simulated plant: space-filling samples, resumability, agreement with
the plant's steady state."""
import math

import pytest

from palsctl.errors import PalsctlError
from palsctl.models.profile import (
    COLUMNS,
    grid_points,
    parse_batches,
    parse_caps,
    point_seed,
    profile_plant,
    read_profile,
    sample_points,
)
from palsctl.plants.sim import SimPlant, steady_state

MODEL, GPU, N = "mixtral-8x7b", "a100-sxm4-80gb", 4
CAPS = [100.0, 150.0, 200.0, 250.0, 300.0, 350.0, 400.0]
BATCHES = [1, 2, 4, 8, 16, 32, 64]
KW = dict(warmup_s=20.0, window_s=20.0, prompt_tokens=512, output_tokens=256, seed=7)


def make(seed):
    return SimPlant(model=MODEL, gpu=GPU, num_gpus=N, seed=seed)


def test_parse_caps_and_batches():
    assert parse_caps("100:400:50") == CAPS
    assert parse_caps("100,250") == [100.0, 250.0]
    assert parse_batches("1,2,4,8,16,32,64") == BATCHES
    for bad in ("100:50:10", "a:b:c", "100:400", "-5,10", ""):
        with pytest.raises(PalsctlError, match="--caps"):
            parse_caps(bad)
    for bad in ("1,x", "0,2", ""):
        with pytest.raises(PalsctlError, match="--batches"):
            parse_batches(bad)


@pytest.mark.parametrize("n", [1, 5, 9, 12, 20])
def test_sample_points_space_filling(n):
    pts = sample_points(CAPS, BATCHES, n)
    assert len(pts) == n and len(set(pts)) == n
    assert set(pts) <= set(grid_points(CAPS, BATCHES))
    corners = [(100.0, 1), (400.0, 64), (100.0, 64), (400.0, 1)]
    assert pts[: min(n, 4)] == corners[: min(n, 4)]
    if n >= 5:
        assert (250.0, 8) in pts  # centre
    if n >= 7:  # every cap and every batch level covered (Latin-hypercube-like projections)
        assert {c for c, _ in pts} == set(CAPS) and {b for _, b in pts} == set(BATCHES)
    assert sample_points(CAPS, BATCHES, n) == pts  # deterministic
    assert sample_points(CAPS, BATCHES, 100) == grid_points(CAPS, BATCHES)


def test_point_seed_depends_only_on_seed_cap_batch():
    assert point_seed(0, 150.0, 8) == point_seed(0, 150.0, 8)
    assert len({point_seed(0, 150.0, 8), point_seed(1, 150.0, 8), point_seed(0, 200.0, 8),
                point_seed(0, 150.0, 16)}) == 4


def test_profile_agrees_with_steady_state():
    pts = [(100.0, 1), (150.0, 64), (400.0, 64), (250.0, 8)]
    rows = profile_plant(make, pts, out_csv=None, **KW)
    for (cap, b), r in zip(pts, rows):
        ss = steady_state(MODEL, GPU, N, b, cap, 512, 256)
        assert r["power_cap_w"] == cap and r["max_batch"] == b and r["applied_max_batch"] == b
        assert r["throughput_tok_s"] == pytest.approx(ss.throughput_tok_s, rel=0.05)
        assert r["power_w"] == pytest.approx(ss.power_w, rel=0.05)
        assert r["tokens_per_joule"] == pytest.approx(r["throughput_tok_s"] / r["power_w"])
        assert r["energy_j"] == pytest.approx(r["power_w"] * r["measured_s"])
        assert r["measured_s"] == pytest.approx(20.0)
        assert r["running_mean"] > 0.9 * b  # kept saturated
        assert r["requests_completed"] > 0 and r["tpot_p90_s"] > 0 and r["ttft_p90_s"] > 0
        assert math.isfinite(r["sm_clock_mhz"]) and r["model"] == MODEL and r["num_gpus"] == N


class Interrupt(Exception):
    pass


def test_resumed_sweep_equals_uninterrupted(tmp_path):
    pts = sample_points(CAPS, BATCHES, 6)
    full_csv = tmp_path / "full.csv"
    full = profile_plant(make, pts, out_csv=full_csv, **KW)
    assert [(r["power_cap_w"], r["max_batch"]) for r in full] == pts

    part_csv = tmp_path / "part.csv"

    def stop_after_3(done, total, row):
        if done == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        profile_plant(make, pts, out_csv=part_csv, progress=stop_after_3, **KW)
    assert len(read_profile(part_csv)) == 3
    # a row cut short by a kill mid-write is dropped and measured again
    with part_csv.open("a") as f:
        f.write("300.0,32,512,256,7,20.0")
    measured = []
    resumed = profile_plant(lambda s: measured.append(s) or make(s), list(reversed(pts)),
                            out_csv=part_csv, **KW)
    assert len(measured) == 3  # only the missing points
    by_key = {(r["power_cap_w"], r["max_batch"]): r for r in resumed}
    for r in full:
        assert by_key[(r["power_cap_w"], r["max_batch"])] == r  # identical, bit for bit
    assert sorted(map(tuple, (map(str, r.values()) for r in read_profile(part_csv)))) == \
        sorted(map(tuple, (map(str, r.values()) for r in read_profile(full_csv))))
    assert list(read_profile(full_csv)[0]) == list(COLUMNS)


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "p.csv"
    profile_plant(make, [(100.0, 1)], out_csv=out, **KW)
    with pytest.raises(PalsctlError, match="seed"):
        profile_plant(make, [(100.0, 1)], out_csv=out, **{**KW, "seed": 8})
    with pytest.raises(PalsctlError, match="model"):
        profile_plant(lambda s: SimPlant(model="llama-3.1-8b", gpu=GPU, num_gpus=1, seed=s),
                      [(150.0, 1)], out_csv=out, **KW)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(PalsctlError, match="missing column"):
        profile_plant(make, [(100.0, 1)], out_csv=bad, **KW)
    with pytest.raises(PalsctlError):
        profile_plant(make, [(100.0, 1)], out_csv=None, **{**KW, "window_s": 0.0})


def test_resume_refuses_another_plants_rows_for_the_same_points(tmp_path):
    # the points already in the file are not reused for another plant (they measured mixtral)
    out = tmp_path / "p.csv"
    profile_plant(make, [(150.0, 1)], out_csv=out, **KW)
    with pytest.raises(PalsctlError, match="existing rows profile model='mixtral-8x7b'"):
        profile_plant(lambda s: SimPlant(model="llama-3.1-8b", gpu="h100-sxm", num_gpus=1,
                                         seed=s), [(150.0, 1)], out_csv=out, **KW)
    assert len(read_profile(out)) == 1


def test_profile_csv_that_is_a_folder_is_one_error_and_a_new_folder_is_made(tmp_path):
    with pytest.raises(PalsctlError, match="not a file"):
        profile_plant(make, [(150.0, 1)], out_csv=tmp_path, **KW)
    out = tmp_path / "new" / "p.csv"
    profile_plant(make, [(150.0, 1)], out_csv=out, **{**KW, "warmup_s": 1.0, "window_s": 1.0})
    assert len(read_profile(out)) == 1


class _ExternalLoadPlant:
    """Wraps a SimPlant and refuses submit(), like a real server fed by a load generator."""

    def __init__(self, plant):
        self._p = plant

    def __getattr__(self, name):
        return getattr(self._p, name)

    def submit(self, requests):
        raise NotImplementedError


def test_plant_without_submit_is_measured_as_is():
    rows = profile_plant(lambda s: _ExternalLoadPlant(make(s)), [(250.0, 8)], out_csv=None, **KW)
    assert rows[0]["throughput_tok_s"] == 0.0  # no load came from outside: honest zero
    assert rows[0]["power_w"] > 0


class _FlakySensorPlant(_ExternalLoadPlant):
    """Every third reading is stale: it repeats the previous good values (energy counter
    included), like a sensor that could not read."""

    def __init__(self, plant):
        super().__init__(plant)
        self._n = 0
        self._last = None

    def submit(self, requests):
        return self._p.submit(requests)

    def read(self):
        import dataclasses

        m = self._p.read()
        self._n += 1
        if self._n % 3 == 0 and self._last is not None:
            return dataclasses.replace(self._last, t_s=m.t_s, window_s=m.window_s, stale=True)
        self._last = m
        return m


def test_stale_readings_do_not_bias_power():
    cap, b = 250.0, 8
    rows = profile_plant(lambda s: _FlakySensorPlant(make(s)), [(cap, b)], out_csv=None, **KW)
    ss = steady_state(MODEL, GPU, N, b, cap, 512, 256)
    assert rows[0]["power_w"] == pytest.approx(ss.power_w, rel=0.03)
