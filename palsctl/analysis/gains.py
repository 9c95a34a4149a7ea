"""Recommended gains of the `pi` controller for a plant preset or a model's gradients.

`recommend_pi_gains` is pure (no I/O, no clock, no simulation run: the plant's gains come from
the simulator's closed-form steady state or from the given gradients) and fast (numpy only, about
a tenth of a second; results are cached), so a controller can call it at setup.

For each loop of `pi` (see `palsctl.analysis.identify.LOOPS`) it builds the loop's plant at the
low / medium / high load operating points of ``palsctl analyze`` (`points.operating_points`),
each with the lags that bracket what step tests identify (below), and picks the PI gains that
meet the margins (gain margin ≥ ``min_gm_db``, phase margin ≥ ``min_pm_deg``) at *every* one of
those plants with the shortest worst-case settling time: one set of gains for the whole load
range, as the controller runs with one set.

Lags (`LOOP_LAGS`), per loop, the plants cover both ends of each range:

* cap loops (``budget``: cap → power; ``margin``: cap → throughput): the firmware follows a new
  power limit with a lag of about 0.1 s and averages power over 0.1 s (step tests on the
  simulated plant identify τ = 0.12–0.13 s, no dead time): τ ∈ {0, 0.3 s}.
* batch loop (batch limit → throughput): the sequences a larger limit admits are prefilled
  first, which lowers the throughput of the period they join (an inverse response) before it
  rises; step tests fit that as a dead time of 0.25–1.6 control periods: θ ∈ {0, 1.6·dt}.

The sensor averages over one control period (the plants' read window). The gains are in the
units of `PIConfig` (``palsctl.controllers.pi``): `PIGains.params` gives its keyword arguments.

>>> g = recommend_pi_gains(model="llama-3.1-8b", gpu="h100-sxm", num_gpus=1, dt_s=1.0,
...                        max_batch_launch=128)
>>> g.loops["budget"].min_gain_margin_db >= 6.0 and g.loops["budget"].min_phase_margin_deg >= 45
True
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from palsctl.analysis.plant_model import FOPDT, discrete_matrices
from palsctl.errors import ConfigError

__all__ = ["LoopGains", "PIGains", "recommend_pi_gains", "recommend_loop_gains",
           "preset_gradients", "LOOP_LAGS", "PI_PARAM_NAMES"]

#: (tau_s values, delay values in control periods) each loop's plants are built with.
LOOP_LAGS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "budget": ((0.0, 0.3), (0.0,)),
    "margin": ((0.0, 0.3), (0.0,)),
    "batch": ((0.0,), (0.0, 1.6)),
}

#: `PIConfig` field names of each loop's (Kp, Ki).
PI_PARAM_NAMES: dict[str, tuple[str, str]] = {
    "batch": ("kp_batch_per_tok_s", "ki_batch_per_tok"),
    "margin": ("kp_cap_w_per_tok_s", "ki_cap_w_per_tok"),
    "budget": ("kp_cap_budget", "ki_cap_budget_per_s"),
}

_SETTLING_BAND = 0.02       # ±2 %, as ct.step_info and palsctl.analysis.stability
_HORIZON_SAMPLES = 400
_RHO_MAX = (0.1 * _SETTLING_BAND) ** (1.0 / (_HORIZON_SAMPLES - 20))
_GRID = 18                  # normalised (Kp·K, Ki·K·dt) grid per axis
_PM_SLACK_DEG = 1.0         # the screening's frequency grid is approximate: ask a little more
_GM_SLACK = 1.03


@dataclass(frozen=True, kw_only=True)
class LoopGains:
    """Gains of one loop and how they do over the loop's plants (the worst case of each).

    ``kp``/``ki`` in the loop's units (input per output unit, per second for ``ki``);
    ``worst_settling_time_s`` (±2 % band) and ``worst_overshoot_pct`` of the closed loop's
    response to a setpoint step; the smallest gain margin (dB) and phase margin (degrees);
    ``plants``: the plant models the gains were checked on."""

    loop: str
    kp: float
    ki: float
    worst_settling_time_s: float
    worst_overshoot_pct: float
    min_gain_margin_db: float
    min_phase_margin_deg: float
    plants: tuple[FOPDT, ...]


@dataclass(frozen=True, kw_only=True)
class PIGains:
    """Recommended gains of every `pi` loop; `params` gives `PIConfig`'s keyword arguments.

    Parameters
    ----------
    loops : dict of str to LoopGains
        Loop name (``batch``, ``margin``, ``budget``) -> its recommended gains.
    dt_s : float
        The control period the gains are for, s.
    source : str
        Where the plant gains came from (a preset's step tests, a model's gradients).
    """

    loops: dict[str, LoopGains]
    dt_s: float
    source: str

    def params(self) -> dict[str, float]:
        """``{"kp_batch_per_tok_s": ..., "ki_batch_per_tok": ..., ...}`` (`PIConfig` names)."""
        out: dict[str, float] = {}
        for loop, g in self.loops.items():
            kp_name, ki_name = PI_PARAM_NAMES[loop]
            out[kp_name], out[ki_name] = g.kp, g.ki
        return out


def _tf(p: FOPDT) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator of the plant's discrete transfer function (descending powers
    of z, same length)."""
    A, B, C, _ = discrete_matrices(p)
    den = np.poly(A)
    num = np.poly(A - B @ C) - den          # C (zI − A)⁻¹ B with D = 0
    num[np.abs(num) < 1e-14 * np.max(np.abs(den))] = 0.0
    return num, den


def _screen(plants: Sequence[FOPDT], kp: np.ndarray, ki: np.ndarray, dt: float,
            min_gm_db: float, min_pm_deg: float) -> tuple[np.ndarray, ...]:
    """For every candidate (kp[i], ki[i]): worst settling time (s, inf when it fails a check or
    does not settle), worst overshoot (%), whether it passes, and the smallest phase margin
    (deg) over the plants. Candidates are dropped at their first failed check."""
    n = len(kp)
    c1_all = kp + ki * dt                   # C(z) = (c1·z − c0)/(z − 1)
    worst_ts = np.zeros(n)
    worst_os = np.zeros(n)
    min_pm = np.full(n, np.inf)
    alive = np.arange(n)
    gm_factor = 10 ** (min_gm_db / 20) * _GM_SLACK
    w = np.concatenate([np.geomspace(1e-4, 0.5, 200), np.linspace(0.5, math.pi, 200)[1:]])
    z = np.exp(1j * w)
    for p in plants:
        num, den = _tf(p)
        # characteristic polynomial den·(z − 1) + s·num·(c1·z − c0), for loop-gain scales s
        base = np.convolve(den, [1.0, -1.0])
        nz = np.convolve(num, [1.0, 0.0])
        nn = np.concatenate([[0.0], num])
        for s in (1.0, gm_factor, 1.0 / gm_factor):
            c1, c0 = c1_all[alive], kp[alive]
            char = base[None, :] + s * (c1[:, None] * nz[None, :] - c0[:, None] * nn[None, :])
            rho = _spectral_radius(char)
            if s == 1.0:
                # a mode that decays too slowly to settle within the horizon is dropped
                keep = rho < _RHO_MAX
                alive, rho1 = alive[keep], rho[keep]
            else:
                alive, rho1 = alive[rho < 1.0 - 1e-9], rho1[rho < 1.0 - 1e-9]
        c1, c0 = c1_all[alive], kp[alive]
        # phase margin on a frequency grid: 180° + ∠L where |L| crosses 1
        G = np.polyval(num, z) / np.polyval(den, z)
        L = G[None, :] * (c1[:, None] * z[None, :] - c0[:, None]) / (z[None, :] - 1.0)
        mag = np.abs(L)
        cross = (mag[:, :-1] >= 1.0) != (mag[:, 1:] >= 1.0)
        ph = np.degrees(np.arctan2(L[:, 1:].imag, L[:, 1:].real))
        pm = np.where(cross, np.where(ph <= 0, 180.0 + ph, ph - 180.0), np.inf).min(axis=1)
        min_pm[alive] = np.minimum(min_pm[alive], pm)
        keep = pm >= min_pm_deg + _PM_SLACK_DEG
        alive, c1, c0 = alive[keep], c1[keep], c0[keep]
        rho1 = rho1[keep]
        # simulate until the slowest mode has decayed to 1/10 of the settling band
        n_steps = _HORIZON_SAMPLES if not len(rho1) else int(min(_HORIZON_SAMPLES, max(
            60, math.log(0.1 * _SETTLING_BAND) / math.log(max(float(rho1.max()), 1e-3)) + 20)))
        ts, os_ = _step(p, c1, c0, n_steps)
        worst_ts[alive] = np.maximum(worst_ts[alive], ts)
        worst_os[alive] = np.maximum(worst_os[alive], os_)
        alive = alive[np.isfinite(ts)]
    ok = np.zeros(n, bool)
    ok[alive] = True
    return np.where(ok, worst_ts, np.inf), worst_os, ok, min_pm


def _spectral_radius(char: np.ndarray) -> np.ndarray:
    """Largest root modulus of each row's polynomial (leading coefficient 1)."""
    char = char / char[:, :1]
    d = char.shape[1] - 1
    comp = np.zeros((char.shape[0], d, d))
    comp[:, 0, :] = -char[:, 1:]
    if d > 1:
        comp[:, np.arange(1, d), np.arange(d - 1)] = 1.0
    return np.max(np.abs(np.linalg.eigvals(comp)), axis=1)


def _step(p: FOPDT, c1: np.ndarray, c0: np.ndarray, n_steps: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Settling time (s) and overshoot (%) of each candidate's closed-loop response to a unit
    setpoint step (velocity-form PI: ``u_k = u_{k−1} + c1·e_k − c0·e_{k−1}``)."""
    A, B, C, _ = discrete_matrices(p)
    n = len(c1)
    x = np.zeros((n, A.shape[0]))
    u = np.zeros(n)
    e_prev = np.zeros(n)
    ys = np.empty((n_steps, n))
    At, Bt, Ct = A.T, B[:, 0], C[0]
    for k in range(n_steps):
        y = x @ Ct
        ys[k] = y
        e = 1.0 - y
        u = u + c1 * e - c0 * e_prev
        e_prev = e
        x = x @ At + u[:, None] * Bt[None, :]
    with np.errstate(invalid="ignore", over="ignore"):
        outside = ~(np.abs(ys - 1.0) < _SETTLING_BAND)
    last = n_steps - 1 - np.argmax(outside[::-1], axis=0)
    settled = np.where(outside.any(axis=0), last + 1, 0)
    ts = np.where(settled < n_steps - 10, settled * p.dt_s, np.inf)
    with np.errstate(invalid="ignore"):
        os_ = np.nan_to_num(np.max(ys, axis=0) - 1.0, nan=np.inf) * 100.0
    return ts, np.maximum(os_, 0.0)


def recommend_loop_gains(plants: Sequence[FOPDT], *, loop: str = "loop", min_gm_db: float = 6.0,
                         min_pm_deg: float = 45.0) -> LoopGains:
    """The PI gains with the shortest worst-case settling time over ``plants`` among those with
    gain margin ≥ ``min_gm_db`` and phase margin ≥ ``min_pm_deg`` at every plant (ties: smaller
    overshoot). The plants must share ``dt_s`` and the sign of their gain.

    Searches a grid of normalised gains ``(Kp·K, Ki·K·dt)`` in ``[0, 1.5] × (0, 1.5]`` (K the
    largest gain: beyond that range a one-period-delay loop is unstable), then refines around
    the best point. Raises `ConfigError` when no gains meet the margins."""
    plants = tuple(plants)
    if not plants:
        raise ValueError("need at least one plant")
    dt = plants[0].dt_s
    if any(abs(p.dt_s - dt) > 1e-9 * dt for p in plants):
        raise ValueError("the plants must share dt_s")
    gains = np.array([p.gain for p in plants])
    if np.any(gains == 0) or not (np.all(gains > 0) or np.all(gains < 0)):
        raise ConfigError("the loop's plant gain is zero or changes sign over the operating "
                          "points: no PI gains hold for all of them", key=loop,
                          value=[float(g) for g in gains])
    k_ref = float(np.max(np.abs(gains)))
    sign = float(np.sign(gains[0]))
    a_axis = np.linspace(0.0, 1.5, _GRID)
    b_axis = np.geomspace(1e-3, 1.5, _GRID)
    best = None
    for _ in range(2):                       # coarse grid, then a finer one around the best
        A_, B_ = np.meshgrid(a_axis, b_axis)
        a, b = A_.ravel(), B_.ravel()
        ts, os_, ok, pm = _screen(plants, sign * a / k_ref, sign * b / (k_ref * dt), dt,
                                  min_gm_db, min_pm_deg)
        if ok.any():
            order = np.lexsort((os_, ts))
            i = int(order[0])
            if best is None or ts[i] < best[2] or (ts[i] == best[2] and os_[i] < best[3]):
                best = (a[i], b[i], ts[i], os_[i], pm[i])
        if best is None:
            break
        ab, bb = best[0], best[1]
        a_axis = np.clip(np.linspace(ab - 0.1, ab + 0.1, _GRID), 0.0, 1.5)
        b_axis = np.geomspace(max(bb / 1.5, 1e-4), min(bb * 1.5, 1.5), _GRID)
    if best is None:
        raise ConfigError(f"no PI gains give GM >= {min_gm_db:g} dB and PM >= {min_pm_deg:g} "
                          f"deg at every operating point of the {loop} loop", key=loop)
    kp = float(sign * best[0] / k_ref)
    ki = float(sign * best[1] / (k_ref * dt))
    gm_db = _worst_gain_margin_db(plants, kp, ki)
    return LoopGains(loop=loop, kp=kp, ki=ki, worst_settling_time_s=float(best[2]),
                     worst_overshoot_pct=float(best[3]), min_gain_margin_db=gm_db,
                     min_phase_margin_deg=float(best[4]), plants=plants)


def _worst_gain_margin_db(plants: Sequence[FOPDT], kp: float, ki: float) -> float:
    """Smallest upward gain margin over the plants (dB), by bisection on the loop-gain scale."""
    out = math.inf
    for p in plants:
        num, den = _tf(p)
        base = np.convolve(den, [1.0, -1.0])
        term = (kp + ki * p.dt_s) * np.convolve(num, [1.0, 0.0]) - kp * np.concatenate([[0.0],
                                                                                      num])

        def rho(s: float, base=base, term=term) -> float:
            return float(_spectral_radius((base + s * term)[None, :])[0])

        lo, hi = 1.0, 2.0
        while rho(hi) < 1.0 and hi < 1e6:
            lo, hi = hi, hi * 2.0
        if hi >= 1e6:
            continue
        for _ in range(50):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if rho(mid) < 1.0 else (lo, mid)
        out = min(out, 20 * math.log10(hi))
    return out


@dataclass(frozen=True, kw_only=True)
class _PointGradients:
    dthroughput_dcap: float
    dthroughput_dbatch: float
    dpower_dcap: float
    dpower_dbatch: float


@functools.lru_cache(maxsize=64)
def preset_gradients(model: str, gpu: str, num_gpus: int, max_batch_launch: int,
                     prompt_tokens: float, output_tokens: float) -> dict[str, tuple[Any, ...]]:
    """Each loop's plant gains at the operating points of ``palsctl analyze``, from the
    simulator's closed-form steady state (forward differences with the step tests' step sizes):
    ``{"batch": (Gradients at the loose points), "margin": (...), "budget": (tight points)}``."""
    from palsctl.analysis.points import operating_points, step_size
    from palsctl.plants.sim import SteadyState, get_gpu, steady_state

    spec = get_gpu(gpu)
    lo_w, hi_w = spec.min_cap_w, spec.tdp_w
    pts = operating_points(model=model, gpu=gpu, num_gpus=num_gpus,
                           max_batch_launch=max_batch_launch, cap_min_w=lo_w, cap_max_w=hi_w,
                           prompt_tokens=prompt_tokens, output_tokens=output_tokens)

    def ss(cap: float, b: float) -> SteadyState:
        return steady_state(model, gpu, num_gpus, max_batch=int(b),
                            power_cap_w=min(max(cap, lo_w), hi_w),
                            prompt_tokens=int(prompt_tokens), output_tokens=int(output_tokens))

    out: dict[str, list] = {"batch": [], "margin": [], "budget": []}
    for pt in pts:
        base = ss(pt.power_cap_w, pt.max_batch)
        db = step_size("batch", pt)
        dc = step_size("margin", pt)
        sb, sc = ss(pt.power_cap_w, pt.max_batch + db), ss(pt.power_cap_w + dc, pt.max_batch)
        g = _PointGradients(
            dthroughput_dcap=(sc.throughput_tok_s - base.throughput_tok_s) / dc,
            dthroughput_dbatch=(sb.throughput_tok_s - base.throughput_tok_s) / db,
            dpower_dcap=(sc.power_w - base.power_w) / dc,
            dpower_dbatch=(sb.power_w - base.power_w) / db)
        for loop in (("batch", "margin") if pt.budget == "loose" else ("budget",)):
            out[loop].append(g)
    return {k: tuple(v) for k, v in out.items()}


def _loop_gain(g: Any, loop: str, num_gpus: int) -> float:
    if loop == "budget":
        return float(g.dpower_dcap) / num_gpus
    return float(g.dthroughput_dcap if loop == "margin" else g.dthroughput_dbatch)


@functools.lru_cache(maxsize=64)
def _recommend(gains_by_loop: tuple[tuple[str, tuple[float, ...]], ...], dt_s: float,
               window_s: float, min_gm_db: float, min_pm_deg: float,
               loops: tuple[str, ...]) -> dict[str, LoopGains]:
    by_loop = dict(gains_by_loop)
    out = {}
    for loop in loops:
        taus, delays = LOOP_LAGS[loop]
        plants = [FOPDT(gain=k, tau_s=tau, delay_s=d * dt_s, dt_s=dt_s, window_s=window_s,
                        input_name="cap" if loop != "batch" else "batch",
                        output_name="power_per_gpu" if loop == "budget" else "throughput",
                        source="recommendation")
                  for k in by_loop[loop] for tau in taus for d in delays]
        out[loop] = recommend_loop_gains(plants, loop=loop, min_gm_db=min_gm_db,
                                         min_pm_deg=min_pm_deg)
    return out


def recommend_pi_gains(*, dt_s: float, model: str | None = None, gpu: str | None = None,
                       num_gpus: int = 1, max_batch_launch: int = 256,
                       prompt_tokens: float = 200.0, output_tokens: float = 400.0,
                       gradients: Sequence[Any] | None = None, window_s: float | None = None,
                       min_gm_db: float = 6.0, min_pm_deg: float = 45.0,
                       loops: Sequence[str] = ("batch", "margin", "budget")) -> PIGains:
    """Recommended `pi` gains for a plant preset or for a power-performance model's gradients.

    Parameters
    ----------
    dt_s : float
        Control period, seconds (the gains are per period: they change with it).
    model, gpu : str, optional
        Simulator presets (``palsctl.plants.sim``): the plant gains come from its closed-form
        steady state at the operating points of ``palsctl analyze``. Give these or ``gradients``.
    num_gpus : int
        GPUs of the tensor-parallel group (the cap is per GPU, power is the group's total).
    max_batch_launch : int
        The engine's launch ``max_num_seqs`` (sets the low / medium / high load batches).
    prompt_tokens, output_tokens : float
        Mean request lengths, tokens.
    gradients : sequence of Gradients, optional
        `palsctl.models.Gradients` (or any object with ``dthroughput_dcap``,
        ``dthroughput_dbatch``, ``dpower_dcap``, ``dpower_dbatch``) at the operating points the
        gains must hold at, e.g. ``model.gradients(cap, batch)`` at low, medium and high load.
    window_s : float, optional
        The sensor's averaging window, seconds (default: one control period).
    min_gm_db, min_pm_deg : float
        Required gain margin (dB) and phase margin (degrees) at every operating point.
    loops : sequence of str
        Which loops to design (``batch``, ``margin``, ``budget``).

    Returns
    -------
    PIGains
        ``.params()`` is a dict of `PIConfig` gains; ``.loops[name]`` has each loop's predicted
        worst-case settling time, overshoot and margins.

    Raises
    ------
    ConfigError
        Unknown preset or loop, neither presets nor gradients given, a non-positive period, a
        zero plant gain, or no gains that meet the margins.
    """
    if not (isinstance(dt_s, (int, float)) and math.isfinite(dt_s) and dt_s > 0):
        raise ConfigError("must be a positive number of seconds", key="dt_s", value=dt_s)
    window = float(dt_s if window_s is None else window_s)
    loops = tuple(loops)
    for loop in loops:
        if loop not in PI_PARAM_NAMES:
            raise ConfigError(f"unknown loop; known: {', '.join(PI_PARAM_NAMES)}", key="loops",
                              value=loop)
    if gradients is not None:
        gs = tuple(gradients)
        if not gs:
            raise ConfigError("gradients is empty", key="gradients")
        by_loop = {loop: tuple(_loop_gain(g, loop, num_gpus) for g in gs) for loop in loops}
        source = f"model gradients at {len(gs)} operating points"
    elif model is not None and gpu is not None:
        from palsctl.errors import PalsctlError

        try:
            pg = preset_gradients(str(model), str(gpu), int(num_gpus), int(max_batch_launch),
                                  float(prompt_tokens), float(output_tokens))
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"cannot evaluate the preset: {exc}", key="model",
                              value=f"{model}/{gpu}") from None
        except PalsctlError:
            raise
        by_loop = {loop: tuple(_loop_gain(g, loop, num_gpus) for g in pg[loop])
                   for loop in loops}
        source = (f"preset {model} on {num_gpus}x {gpu} (steady state, "
                  f"{len(pg['batch'])} load points)")
    else:
        raise ConfigError("give a plant preset (model and gpu) or gradients")
    for loop, ks in by_loop.items():
        if not all(math.isfinite(k) for k in ks):
            raise ConfigError("a plant gain is not finite", key=loop, value=list(ks))
    res = _recommend(tuple(sorted(by_loop.items())), float(dt_s), window, float(min_gm_db),
                     float(min_pm_deg), loops)
    return PIGains(loops=dict(res), dt_s=float(dt_s), source=source)
