"""The firmware's clock search: the grid search over the points a 16-halving bisection can end
on gives the bisection's answer, bit for bit, in a fraction of its power evaluations."""
from hypothesis import given, settings
from hypothesis import strategies as st

from palsctl.plants.sim import SimPlant
from palsctl.plants.sim.engine import _GRID_HALVINGS, _GRID_N, _clock_grid, _grid_search
from palsctl.plants.sim.gpu import StepCost


def _bisect_point(r_min: float, k: int) -> float:
    """Where a bisection of [r_min, 1] ends when it takes the upper half at k's 1-bits."""
    lo, hi = r_min, 1.0
    for bit in range(_GRID_HALVINGS - 1, -1, -1):
        mid = 0.5 * (lo + hi)
        if k >> bit & 1:
            lo = mid
        else:
            hi = mid
    return lo


@given(st.floats(0.05, 0.9), st.lists(st.integers(0, _GRID_N - 1), min_size=1, max_size=20))
@settings(max_examples=50, deadline=None)
def test_grid_points_are_the_bisections_end_points(r_min, ks):
    grid = _clock_grid(r_min)
    assert len(grid) == _GRID_N + 1 and grid[-1] == 1.0 and grid[0] == r_min
    assert all(a < b for a, b in zip(grid[:64], grid[1:65], strict=True))
    for k in ks:
        assert grid[k] == _bisect_point(r_min, k)       # equal floats, not close ones


def _bisect_highest(grid, value):
    """Reference: the bisection's answer on the grid (-1 where even the lowest point fails)."""
    def ok(m):
        return m <= 0.0
    if ok(value(grid[-1])):
        return len(grid) - 1
    if not ok(value(grid[0])):
        return -1
    lo, hi = 0, len(grid) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(value(grid[mid])):
            lo = mid
        else:
            hi = mid
    return lo


@given(root=st.floats(-0.2, 1.2), curve=st.sampled_from(["linear", "cubic", "kinked", "step"]),
       guess=st.integers(-5, _GRID_N + 5))
@settings(max_examples=300, deadline=None)
def test_grid_search_equals_bisection_with_few_evaluations(root, curve, guess):
    grid = _clock_grid(0.2)
    calls = []

    def value(r):
        calls.append(r)
        x = r - root
        if curve == "linear":
            return x
        if curve == "cubic":
            return x ** 3 + 0.01 * x
        if curve == "kinked":        # flat below the root's neighbourhood, steep above
            return max(x, 1e-4 * x) if x < 0 else 50.0 * x
        return -1.0 if x <= 0 else 1.0
    want = _bisect_highest(grid, value)
    calls.clear()
    assert _grid_search(grid, value, guess) == want
    assert len(calls) <= 2 * 8 + _GRID_HALVINGS + 2


def test_grid_search_from_a_near_guess_takes_two_or_three_evaluations():
    grid = _clock_grid(0.1)
    root = grid[40000] + 0.3 * (grid[40001] - grid[40000])
    calls = []

    def value(r):
        calls.append(r)
        return (r - root) * (1.0 + r * r)
    for guess in (40000, 39999, 40001, 40010):
        calls.clear()
        assert _grid_search(grid, value, guess) == 40000
        assert len(calls) <= 4, (guess, len(calls))


def _engine_at(e_win_w: float, cap_w: float):
    """A Llama-8B/H100 engine 1 s into a run at constant power ``e_win_w`` (per GPU), cap set."""
    eng = SimPlant("llama-3.1-8b", "h100-sxm", 1, noise=False).engine
    eng._segment(1.0, e_win_w * eng.n_gpus, 1.0)
    eng.cap_set_w = eng.cap_eff_w = cap_w
    return eng


@given(e_win_w=st.floats(100.0, 900.0), cap_w=st.floats(200.0, 700.0),
       tokens=st.integers(1, 512), ctx=st.floats(1e3, 4e5), n=st.integers(1, 400),
       scale=st.floats(0.2, 5.0), guess=st.integers(0, _GRID_N - 1))
@settings(max_examples=300, deadline=None)
def test_throttled_clock_equals_the_bisection(e_win_w, cap_w, tokens, ctx, n, scale, guess):
    eng = _engine_at(e_win_w, cap_w)
    gm = eng.gm
    c = gm.step_cost(float(tokens), ctx)
    c = StepCost(*[x * scale for x in c[:4]], c.exp_imbalance, *[x * scale for x in c[5:]])
    ws = max(eng.t - 0.1, 0.0)
    e_win = (eng.energy_j - eng.energy_at(ws)) / eng.n_gpus
    want = eng._throttled_clock_bisect(c, n, e_win, eng.t - ws)
    eng._clock_k = [guess] * 4
    if gm.power_per_gpu(c, 1.0) > cap_w:       # the firmware searches only then
        assert eng._throttled_clock(c, n, 0) == want
        assert eng._firmware_clock(c, n, 1) == want
    else:
        assert eng._firmware_clock(c, n, 1) == 1.0


@given(model=st.sampled_from([("llama-3.1-8b", 1, "tp"), ("qwen3-30b-a3b", 2, "ep"),
                              ("mixtral-8x7b", 4, "tp")]),
       tokens=st.integers(1, 4096), ctx=st.floats(0.0, 1e6), r=st.floats(0.05, 1.0))
@settings(max_examples=200, deadline=None)
def test_time_power_is_step_time_and_power_bit_for_bit(model, tokens, ctx, r):
    name, n, par = model
    gpu = "a100-sxm4-80gb" if name == "mixtral-8x7b" else "h100-sxm"
    gm = SimPlant(name, gpu, n, parallelism=par, noise=False).engine.gm
    c = gm.step_cost(float(tokens), ctx)
    assert gm.time_power(c, r) == (gm.step_time(c, r), gm.power_per_gpu(c, r))
