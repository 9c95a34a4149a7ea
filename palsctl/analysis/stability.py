"""Offline stability analysis of palsctl's feedback loops with python-control.

A loop is one knob driving one measured output around an operating point (for example the
running-sequence limit ``max_batch`` driving ``throughput_tok_s``, or the per-GPU power cap
driving the plant's total ``power_w``). Around the point the plant is modelled as

* first order plus dead time (FOPDT) in continuous time: ``K · e^{-θ s} / (τ s + 1)``
  (``τ`` lumps the actuator's settling lag and the plant's own lag, ``θ`` the dead time), driven
  by a zero-order hold at the control period ``dt_s`` (the actuator holds the knob between
  control steps), and
* read by a sensor that reports the *mean* of the output over the last ``window_s`` seconds
  (the plant's read window, NVML's averaged power).

`discrete_plant` turns that into an exact discrete-time state-space model at ``dt_s`` built with
``ct.c2d(..., 'zoh')`` segment by segment, so fractional dead times and averaging windows that are
not whole periods are exact, not Padé approximations.

The PI controller in velocity form ``Δu_k = Kp·(e_k − e_{k−1}) + Ki·dt·e_k`` is, in the z domain,
``C(z) = Kp + Ki·dt·z/(z − 1)`` (`pi_tf`). `analyze_loop` gives the closed-loop poles, the gain
margin computed correctly with the integrator in the loop (the exact gains at which a closed-loop
pole crosses the unit circle, from the polynomial equations on ``|z| = 1``, checked against the
poles; python-control's ``stability_margins`` may report the integrator's crossing at ω = 0 as a
gain margin of about 0), the phase margin, and the step-response metrics of ``ct.step_info``.
`identify_fopdt` fits the model to a recorded step test.

>>> plant = FOPDT(gain=2.0, tau_s=0.5, delay_s=0.0, dt_s=1.0, window_s=1.0)
>>> res = analyze_loop(plant, kp=0.1, ki=0.2)
>>> res.stable, round(res.gain_margin_db, 1) > 6
(True, True)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import control as ct
import numpy as np

from palsctl.analysis.plant_model import FOPDT, discrete_matrices, fit_percent

__all__ = [
    "FOPDT", "LoopAnalysis", "StepMetrics", "Margins", "StabilityMap", "Recommendation",
    "discrete_plant", "pi_tf", "loop_tf", "margins", "closed_loop_poles", "analyze_loop",
    "step_metrics", "closed_loop", "settling_time_of", "identify_fopdt",
    "simulate_fopdt_response", "stability_map", "recommend_gains", "plot_stability_map",
    "critical_gain_scale", "input_excursion", "predicted_response",
]

#: Settling band of every settling time in this module (fraction of the step), as ct.step_info.
SETTLING_THRESHOLD = 0.02
_UNIT_TOL = 1e-7


# --------------------------------------------------------------------------------------------
# Plant model
# --------------------------------------------------------------------------------------------
def discrete_plant(p: FOPDT, *, method: str = "c2d") -> ct.StateSpace:
    """Exact discrete-time model of `FOPDT` ``p`` at ``p.dt_s`` (input held by a ZOH).

    Sample ``k`` of the output is the sensor reading taken at ``t = k·dt`` (the mean of the
    output over ``[k·dt − window_s, k·dt]``); input sample ``k`` is applied at ``t = k·dt``
    right after that reading. Built from ``ct.c2d(..., 'zoh')`` of the lag augmented with
    integrators of its output, one call per segment of the period in which the delayed input
    and the averaging window are constant (`plant_model.discrete_matrices`).
    ``method="closed-form"`` computes the same ZOH maps from their closed form (exact for a
    scalar lag; used inside fitting loops for speed).
    """
    if method not in ("c2d", "closed-form"):
        raise ValueError(f"method must be 'c2d' or 'closed-form', got {method!r}")
    segment = None
    if method == "c2d":
        # τ = 0 is an instant gain: a lag far faster than one period has the same samples
        a = -1.0 / max(p.tau_s, 1e-6 * p.dt_s)
        b = -a * p.gain

        def segment(h: float, zp_on: bool) -> tuple[np.ndarray, np.ndarray]:
            if h <= 0:
                return np.eye(3), np.zeros((3, 1))
            A = np.array([[a, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0 if zp_on else 0.0, 0.0, 0.0]])
            B = np.array([[b], [0.0], [0.0]])
            sysd = ct.c2d(ct.ss(A, B, np.eye(3), np.zeros((3, 1))), h, method="zoh")
            return np.asarray(sysd.A), np.asarray(sysd.B)

    A, B, C, D = discrete_matrices(p, segment)
    return ct.ss(A, B, C, D, p.dt_s, inputs=p.input_name, outputs=p.output_name)


def simulate_fopdt_response(p: FOPDT, u: np.ndarray, *, method: str = "c2d") -> np.ndarray:
    """Output samples of `discrete_plant` ``p`` (from rest) for input samples ``u``."""
    from scipy.signal import lfilter, ss2tf

    sysd = discrete_plant(p, method=method)
    num, den = ss2tf(*(np.asarray(M, dtype=float) for M in (sysd.A, sysd.B, sysd.C, sysd.D)))
    return lfilter(np.ravel(num), den, np.asarray(u, dtype=float).reshape(-1))


# --------------------------------------------------------------------------------------------
# Controller and loop
# --------------------------------------------------------------------------------------------
def pi_tf(kp: float, ki: float, dt_s: float) -> ct.TransferFunction:
    """Discrete PI ``C(z) = Kp + Ki·dt·z/(z−1)``: the velocity form
    ``Δu_k = Kp·(e_k − e_{k−1}) + Ki·dt·e_k`` as a transfer function from error to input."""
    return ct.tf([kp + ki * dt_s, -kp], [1.0, -1.0], dt_s)


def loop_tf(plant: FOPDT | ct.LTI, controller: ct.LTI) -> ct.TransferFunction:
    """Open loop ``L(z) = C(z)·G(z)`` as a transfer function (negative feedback assumed)."""
    G = discrete_plant(plant) if isinstance(plant, FOPDT) else plant
    L = ct.tf(ct.series(G, controller))
    return L


def _polys(L: ct.TransferFunction) -> tuple[np.ndarray, np.ndarray]:
    num = np.atleast_1d(np.squeeze(np.asarray(L.num[0][0], dtype=float)))
    den = np.atleast_1d(np.squeeze(np.asarray(L.den[0][0], dtype=float)))
    n = max(len(num), len(den))
    num = np.concatenate([np.zeros(n - len(num)), num])
    den = np.concatenate([np.zeros(n - len(den)), den])
    # drop common leading zeros
    while len(num) > 1 and abs(num[0]) < 1e-300 and abs(den[0]) < 1e-300:
        num, den = num[1:], den[1:]
    scale = np.max(np.abs(den))
    return num / scale, den / scale


def closed_loop_poles(L: ct.TransferFunction, gain_scale: float = 1.0) -> np.ndarray:
    """Poles of the unity negative-feedback loop around ``gain_scale·L``: roots of
    ``den(z) + gain_scale·num(z)``."""
    num, den = _polys(L)
    char = den + gain_scale * num
    nz = np.flatnonzero(np.abs(char) > 1e-14 * np.max(np.abs(char)))
    char = char[nz[0]:] if nz.size else char
    return np.roots(char) if len(char) > 1 else np.array([])


def _spectral_radius(L: ct.TransferFunction, k: float) -> float:
    p = closed_loop_poles(L, k)
    return float(np.max(np.abs(p))) if p.size else 0.0


def _padd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = max(len(a), len(b))
    return np.pad(a, (n - len(a), 0)) + np.pad(b, (n - len(b), 0))


def _psub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _padd(a, -np.asarray(b))


def _reciprocal(p: np.ndarray) -> np.ndarray:
    """Coefficients of ``z^n · p(1/z)`` (same degree n)."""
    return p[::-1].copy()


def _unit_circle_roots(poly: np.ndarray) -> np.ndarray:
    """Frequencies ω in [0, π] (rad/sample) of the roots of ``poly`` on the unit circle."""
    nz = np.flatnonzero(poly)
    poly = poly[nz[0]:] if nz.size else poly[:0]
    if poly.size <= 1:
        return np.array([])
    r = np.roots(poly)
    on = r[np.abs(np.abs(r) - 1.0) < 1e-5]
    w = np.abs(np.angle(on))
    return np.unique(np.round(w, 10))


@dataclass(frozen=True, kw_only=True)
class Margins:
    """Stability margins of an open loop L with unity negative feedback.

    ``gain_margin`` (ratio): the smallest factor ``k > 1`` by which L can be multiplied before
    a closed-loop pole reaches the unit circle (``inf`` if none); ``gain_margin_low``: the
    largest factor ``k < 1`` at which stability is lost going down (``0`` if none: the loop
    stays stable down to zero gain). ``gm_freq_hz``: frequency of that crossing.
    ``phase_margin_deg`` at ``pm_freq_hz`` (the gain crossover), ``inf`` if ``|L|`` never
    crosses 1. Margins are reported for a closed loop that is stable at ``k = 1``; for an
    unstable loop ``gain_margin`` is the factor ``< 1`` that would restore stability (or nan).
    """

    gain_margin: float
    gain_margin_low: float
    gm_freq_hz: float
    phase_margin_deg: float
    pm_freq_hz: float

    @property
    def gain_margin_db(self) -> float:
        """The gain margin in dB (-inf when there is none)."""
        return 20 * math.log10(self.gain_margin) if self.gain_margin > 0 else -math.inf


def _sweep_w() -> np.ndarray:
    """Dense frequency sweep over (0, π]: log-spaced near 0 (integrators), linear above 0.5."""
    return np.concatenate([np.geomspace(1e-6, 0.5, 1500), np.linspace(0.5, math.pi, 1500)[1:]])


def _unit_circle_frequencies(poly: np.ndarray) -> list[float]:
    """Frequencies ω in (0, π] of the roots of ``poly`` lying within 1e-2 of the unit circle
    (candidates to refine: such roots are ill-conditioned near z = 1). Leading coefficients
    below 1e-14 of the largest are dropped (a subnormal one would put roots at infinity)."""
    scale = float(np.max(np.abs(poly))) if len(poly) else 0.0
    nz = np.flatnonzero(np.abs(poly) > 1e-14 * scale)
    if not nz.size or len(poly) - nz[0] <= 1:
        return []
    r = np.roots(poly[nz[0]:])
    out = []
    for rv in r[np.abs(np.abs(r) - 1.0) < 1e-2]:
        w0 = abs(float(np.angle(rv)))
        if w0 >= 1e-9:
            out.append(w0)
    return out


def _crossing_gains(L: ct.TransferFunction) -> list[tuple[float, float]]:
    """(gain factor k > 0, ω rad/sample) where ``1 + k·L(e^{jω}) = 0`` for some ω ∈ [0, π].

    ``L(e^{jω})`` is real where ``num(z)·den(1/z) − num(1/z)·den(z) = 0``; multiplied by
    ``z^n`` that is a polynomial whose unit-circle roots are the candidates (taken loosely and
    refined: roots of such polynomials are ill-conditioned), together with the sign changes of
    ``Im L`` over a dense sweep, refined with ``brentq``; ``z = −1`` is always checked exactly.
    The integrator's pole at ``z = 1`` gives ``k = 0`` (L infinite) and is excluded.
    """
    from scipy.optimize import brentq

    num, den = _polys(L)

    def im(w: float) -> float:
        z = np.exp(1j * w)
        # Im(L) has the sign of Im(num·conj(den)); no division (den may vanish at z = 1)
        return float((np.polyval(num, z) * np.conj(np.polyval(den, z))).imag)

    cands = [math.pi]
    w = _sweep_w()
    z = np.exp(1j * w)
    g = (np.polyval(num, z) * np.conj(np.polyval(den, z))).imag
    for i in np.flatnonzero(np.sign(g[:-1]) * np.sign(g[1:]) < 0):
        cands.append(brentq(im, w[i], w[i + 1], xtol=1e-14))
    poly = _psub(np.convolve(num, _reciprocal(den)), np.convolve(_reciprocal(num), den))
    for w0 in _unit_circle_frequencies(poly):
        lo, hi = w0 * 0.98, min(w0 * 1.02, math.pi)
        if np.sign(im(lo)) * np.sign(im(hi)) < 0:
            cands.append(brentq(im, lo, hi, xtol=1e-14))
        else:
            cands.append(w0)
    out = []
    for wv in sorted(set(round(c, 12) for c in cands)):
        zv = np.exp(1j * wv)
        nv, dv = np.polyval(num, zv), np.polyval(den, zv)
        if abs(nv) < 1e-12 * max(1.0, float(abs(dv))):
            continue
        k = -dv / nv
        if abs(k.imag) <= 1e-6 * max(1.0, float(abs(k.real))) and k.real > 1e-9:
            out.append((float(k.real), float(wv)))
    return out


def _gain_crossings(num: np.ndarray, den: np.ndarray, pm_poly: np.ndarray) -> list[float]:
    """Frequencies ω in (0, π] where ``|L(e^{jω})| = 1``, refined by a root finder.

    Candidates: the unit-circle roots of ``pm_poly`` (loosely: roots near ``z = 1`` of an
    integrator loop are ill-conditioned) and the sign changes of ``log|L|`` over a dense
    log-spaced sweep; each is refined with ``brentq`` on ``log|L|``."""
    from scipy.optimize import brentq

    def f(w: float) -> float:
        z = np.exp(1j * w)
        d = abs(np.polyval(den, z))
        nv = abs(np.polyval(num, z))
        if d == 0:
            return math.inf
        if nv == 0:
            return -math.inf
        return math.log(nv / d)

    w = _sweep_w()
    z = np.exp(1j * w)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.log(np.abs(np.polyval(num, z))) - np.log(np.abs(np.polyval(den, z)))
    out = []
    ok = np.isfinite(g[:-1]) & np.isfinite(g[1:])
    idx = np.flatnonzero(ok & (np.sign(g[:-1]) != np.sign(g[1:])))
    for i in idx:
        out.append(brentq(f, w[i], w[i + 1], xtol=1e-14))
    for w0 in _unit_circle_frequencies(pm_poly):
        lo, hi = w0 * 0.98, min(w0 * 1.02, math.pi)
        if np.isfinite(f(lo)) and np.isfinite(f(hi)) and np.sign(f(lo)) != np.sign(f(hi)):
            out.append(brentq(f, lo, hi, xtol=1e-14))
        elif abs(f(w0)) < 1e-9:
            out.append(w0)
    if abs(f(math.pi)) < 1e-12:
        out.append(math.pi)
    return sorted(set(round(x, 12) for x in out))


def margins(L: ct.TransferFunction) -> Margins:
    """Gain and phase margins of ``L`` (discrete, unity negative feedback), exact.

    Gain margin: the crossing gains of `_crossing_gains` are each verified with the closed-loop
    poles (a pole must really leave the unit circle there), and the smallest above 1 is kept.
    Phase margin: at the frequencies where ``|L| = 1`` (roots of
    ``num(z)·num(1/z) − den(z)·den(1/z)`` on the unit circle), ``180° + ∠L``, the smallest.
    """
    dt = float(L.dt)
    stable = _spectral_radius(L, 1.0) < 1.0 - 1e-9
    crossings = _crossing_gains(L)
    ups: list[tuple[float, float]] = []
    lows: list[tuple[float, float]] = []
    for k, wv in crossings:
        # keep a crossing only if stability really changes there
        before = _spectral_radius(L, k * (1 - 1e-6)) < 1.0
        after = _spectral_radius(L, k * (1 + 1e-6)) < 1.0
        if before == after:
            continue
        (ups if k > 1.0 else lows).append((k, wv))
    if stable:
        gm, wgm = min(ups) if ups else (math.inf, math.nan)
        gml = max(lows)[0] if lows else 0.0
    else:
        # unstable at k=1: the largest factor < 1 that makes it stable again, if any
        gm, wgm = max(lows) if lows else (math.nan, math.nan)
        gml = math.nan
    num, den = _polys(L)
    pm_poly = _psub(np.convolve(num, _reciprocal(num)), np.convolve(den, _reciprocal(den)))
    pm, wpm = math.inf, math.nan
    for wv in _gain_crossings(num, den, pm_poly):
        z = np.exp(1j * wv)
        Lv = np.polyval(num, z) / np.polyval(den, z)
        if abs(abs(Lv) - 1.0) > 1e-6:
            continue
        ph = math.degrees(np.angle(Lv))          # in (-180, 180]
        pmv = 180.0 + ph if ph <= 0 else ph - 180.0
        if pmv < pm:
            pm, wpm = pmv, wv
    return Margins(gain_margin=float(gm), gain_margin_low=float(gml),
                   gm_freq_hz=float(wgm / (2 * math.pi * dt)) if math.isfinite(wgm) else math.nan,
                   phase_margin_deg=float(pm),
                   pm_freq_hz=float(wpm / (2 * math.pi * dt)) if math.isfinite(wpm) else math.nan)


def critical_gain_scale(L: ct.TransferFunction, k_max: float = 1e6) -> float:
    """The smallest factor ``k`` at which the loop ``k·L`` is unstable, found by a bisection on
    the closed-loop spectral radius (an independent check of `margins`' gain margin for loops
    stable at small gains)."""
    lo, hi = 1e-9, 1.0
    if _spectral_radius(L, lo) >= 1.0:
        return 0.0
    while _spectral_radius(L, hi) < 1.0:
        hi *= 2.0
        if hi > k_max:
            return math.inf
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if _spectral_radius(L, mid) < 1.0:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-10:
            break
    return hi


# --------------------------------------------------------------------------------------------
# Step response
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class StepMetrics:
    """Closed-loop response of the output to a unit step of the setpoint (``ct.step_info``):
    rise time 10→90 % (s), overshoot (%), settling time into ±2 % (s), peak (of a unit step)."""

    rise_time_s: float
    overshoot_pct: float
    settling_time_s: float
    peak: float
    steady_state: float


def step_metrics(T_cl: ct.TransferFunction, *, horizon_s: float | None = None,
                 poles: np.ndarray | None = None) -> StepMetrics:
    """`StepMetrics` of a stable discrete SISO closed loop (nan when unstable), from
    ``ct.step_info`` on its step response."""
    from scipy.signal import lfilter

    dt = float(T_cl.dt)
    poles = np.asarray(ct.poles(T_cl) if poles is None else poles)
    rho = float(np.max(np.abs(poles))) if poles.size else 0.0
    if rho >= 1.0 - 1e-9:
        nan = math.nan
        return StepMetrics(rise_time_s=nan, overshoot_pct=nan, settling_time_s=nan, peak=nan,
                           steady_state=nan)
    if horizon_s is None:
        # long enough for the slowest pole to decay to 1e-4 of the step, at least 50 samples
        n = 50 if rho < 1e-6 else int(min(20000, max(50, math.log(1e-4) / math.log(rho) + 20)))
    else:
        n = int(math.ceil(horizon_s / dt)) + 1
    t = np.arange(n) * dt
    num, den = _polys(T_cl)
    y = lfilter(num, den, np.ones(n))   # same as ct.step_response for a SISO tf
    yfinal = float(np.sum(num) / np.sum(den))
    info = ct.step_info(y, t, yfinal=yfinal, SettlingTimeThreshold=SETTLING_THRESHOLD)
    return StepMetrics(rise_time_s=float(info["RiseTime"]), overshoot_pct=float(info["Overshoot"]),
                       settling_time_s=float(info["SettlingTime"]), peak=float(info["Peak"]),
                       steady_state=float(info["SteadyStateValue"]))


def settling_time_of(t_s: np.ndarray, y_normalised: np.ndarray, *,
                     threshold: float = SETTLING_THRESHOLD) -> float:
    """Settling time of a measured response already normalised to go from 0 to 1, with
    ``ct.step_info``'s definition (the time of the first sample after the last one outside
    ±``threshold`` of the final value 1), ``t_s`` counted from the setpoint step; nan if the
    record ends outside the band. Unlike ``ct.step_info`` it also answers for a response that
    never reaches 90 % (no rise time)."""
    y = np.asarray(y_normalised, dtype=float)
    t = np.asarray(t_s, dtype=float)
    outside = np.flatnonzero(~(np.abs(y - 1.0) < threshold))
    settled = 0 if outside.size == 0 else int(outside[-1]) + 1
    return float(t[settled]) if settled < len(t) else math.nan


# --------------------------------------------------------------------------------------------
# One loop, end to end
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LoopAnalysis:
    """Everything `analyze_loop` finds about one loop at one operating point."""

    plant: FOPDT
    kp: float
    ki: float
    poles: tuple[complex, ...]
    spectral_radius: float
    stable: bool
    margins: Margins
    step: StepMetrics
    min_gm_db: float = 6.0
    min_pm_deg: float = 45.0

    @property
    def gain_margin_db(self) -> float:
        """The loop's gain margin, dB."""
        return self.margins.gain_margin_db

    @property
    def phase_margin_deg(self) -> float:
        """The loop's phase margin, degrees."""
        return self.margins.phase_margin_deg

    @property
    def meets_margins(self) -> bool:
        """Whether the loop is stable with at least the required gain and phase margins."""
        return (self.stable and self.gain_margin_db >= self.min_gm_db
                and self.margins.gain_margin_low < 10 ** (-self.min_gm_db / 20)
                and self.phase_margin_deg >= self.min_pm_deg)

    def warnings(self) -> list[str]:
        """One line per problem of the loop (instability, margins under the minimum)."""
        out = []
        if not self.stable:
            out.append(f"UNSTABLE: closed-loop spectral radius {self.spectral_radius:.3f} >= 1")
            return out
        if self.gain_margin_db < self.min_gm_db:
            out.append(f"gain margin {self.gain_margin_db:.1f} dB < {self.min_gm_db:g} dB")
        if self.phase_margin_deg < self.min_pm_deg:
            out.append(f"phase margin {self.phase_margin_deg:.1f} deg < {self.min_pm_deg:g} deg")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The analysis as a JSON-serialisable dict (non-finite numbers as None)."""
        def f(x: float) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)
        return {
            "plant": self.plant.to_dict(), "kp": self.kp, "ki": self.ki,
            "poles": [[float(p.real), float(p.imag)] for p in self.poles],
            "spectral_radius": self.spectral_radius, "stable": self.stable,
            "gain_margin": f(self.margins.gain_margin),
            "gain_margin_db": f(self.gain_margin_db),
            "gain_margin_low": f(self.margins.gain_margin_low),
            "gm_freq_hz": f(self.margins.gm_freq_hz),
            "phase_margin_deg": f(self.phase_margin_deg),
            "pm_freq_hz": f(self.margins.pm_freq_hz),
            "rise_time_s": f(self.step.rise_time_s), "overshoot_pct": f(self.step.overshoot_pct),
            "settling_time_s": f(self.step.settling_time_s),
            "meets_margins": self.meets_margins, "warnings": self.warnings(),
        }


@functools.lru_cache(maxsize=256)
def _plant_polys(plant: FOPDT) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator (in z, descending powers) of `discrete_plant`, cached."""
    return _polys(ct.tf(discrete_plant(plant)))


def _loop_polys(plant: FOPDT, kp: float, ki: float) -> tuple[np.ndarray, np.ndarray]:
    gn, gd = _plant_polys(plant)
    C = pi_tf(kp, ki, plant.dt_s)
    cn, cd = _polys(C)
    return np.convolve(cn, gn), np.convolve(cd, gd)


def analyze_loop(plant: FOPDT, *, kp: float, ki: float, min_gm_db: float = 6.0,
                 min_pm_deg: float = 45.0) -> LoopAnalysis:
    """Closed-loop poles, margins and step metrics of PI ``(kp, ki)`` around ``plant``.

    ``kp``/``ki`` are in the plant's units: input per output unit (per second for ``ki``), with
    the sign that makes the feedback negative for a positive plant gain (``e = r − y``). The
    loop is ``L = C·G`` with ``G = discrete_plant(plant)`` and ``C = pi_tf(kp, ki, dt)``; the
    closed loop from setpoint to output is ``ct.feedback(L, 1)`` (`closed_loop`).
    """
    num, den = _loop_polys(plant, kp, ki)
    L = ct.tf(num, den, plant.dt_s)
    char = _padd(den, num)
    poles = closed_loop_poles(L)
    rho = float(np.max(np.abs(poles))) if poles.size else 0.0
    stable = rho < 1.0 - 1e-9
    T_cl = ct.tf(num, char, plant.dt_s)
    return LoopAnalysis(plant=plant, kp=float(kp), ki=float(ki),
                        poles=tuple(complex(p) for p in poles), spectral_radius=rho,
                        stable=stable, margins=margins(L), step=step_metrics(T_cl, poles=poles),
                        min_gm_db=min_gm_db, min_pm_deg=min_pm_deg)


def closed_loop(plant: FOPDT, *, kp: float, ki: float) -> ct.LTI:
    """The closed loop from setpoint to measured output, ``ct.feedback(C·G, 1)``."""
    return ct.feedback(ct.series(discrete_plant(plant), pi_tf(kp, ki, plant.dt_s)), 1)


def predicted_response(plant: FOPDT, *, kp: float, ki: float, n: int) -> np.ndarray:
    """The first ``n`` samples of the closed loop's response to a unit setpoint step."""
    from scipy.signal import lfilter

    num, den = _loop_polys(plant, kp, ki)
    return lfilter(num, _padd(den, num), np.ones(n))


def input_excursion(plant: FOPDT, *, kp: float, ki: float, horizon_s: float = 60.0
                    ) -> tuple[float, float]:
    """(min, max) of the controller's output (the knob) over the response to a unit setpoint
    step, as deviations from the operating point (``U/R = C/(1 + C·G)``; the final value is
    ``1/gain``). With a step of size ``s`` the knob moves within ``s·min .. s·max`` (for
    ``s > 0``): the linear analysis holds only while that stays inside the actuator's range.
    nan for an unstable loop."""
    from scipy.signal import lfilter

    num, den = _loop_polys(plant, kp, ki)
    if _spectral_radius(ct.tf(num, den, plant.dt_s), 1.0) >= 1.0 - 1e-9:
        return math.nan, math.nan
    cn, cd = _polys(pi_tf(kp, ki, plant.dt_s))
    gn, gd = _plant_polys(plant)
    # U/R = C/(1 + C G) = cn·gd / (cd·gd + cn·gn)
    un = np.convolve(cn, gd)
    ud = _padd(np.convolve(cd, gd), np.convolve(cn, gn))
    n = int(math.ceil(horizon_s / plant.dt_s)) + 1
    u = lfilter(un, ud, np.ones(n))
    return float(min(0.0, u.min())), float(max(0.0, u.max()))


# --------------------------------------------------------------------------------------------
# Identification from a step test
# --------------------------------------------------------------------------------------------
def identify_fopdt(y: np.ndarray, u: np.ndarray, *, dt_s: float, window_s: float,
                   input_name: str = "u", output_name: str = "y",
                   max_delay_s: float | None = None) -> FOPDT:
    """Fit `FOPDT` ``(gain, tau_s, delay_s)`` to a step test by least squares.

    ``y[k]`` is the sensor reading at ``t = k·dt_s`` and ``u[k]`` the input applied right after
    it (deviations from the operating point are taken from the first samples: the test must
    start at steady state with the input constant until the step). ``window_s`` is the sensor's
    averaging window (known from the sensor, not fitted).
    """
    from scipy.optimize import least_squares

    y = np.asarray(y, dtype=float)
    u = np.asarray(u, dtype=float)
    if y.shape != u.shape or y.ndim != 1:
        raise ValueError("y and u must be 1-D arrays of the same length")
    changes = np.flatnonzero(np.abs(np.diff(u)) > 0)
    if changes.size == 0:
        raise ValueError("the input never changes: no step to identify from")
    k0 = int(changes[0]) + 1                 # first sample of the new input
    if k0 < 1:
        raise ValueError("need at least one sample before the step")
    y0 = float(np.mean(y[: max(1, k0 - 0)][-max(1, min(3, k0)):]))
    du = u - u[0]
    dy = y - y0
    T = dt_s
    horizon = len(y) * T
    max_delay = max_delay_s if max_delay_s is not None else min(5 * T, horizon / 3)
    du_step = float(du[-1]) if du[-1] != 0 else float(du[k0])
    gain0 = float(np.mean(dy[-max(3, len(dy) // 5):])) / du_step

    def model(theta: np.ndarray) -> np.ndarray:
        K, tau, delay = theta
        p = FOPDT(gain=K, tau_s=tau, delay_s=delay, dt_s=T, window_s=window_s)
        return simulate_fopdt_response(p, du, method="closed-form")

    def resid(theta: np.ndarray) -> np.ndarray:
        return model(theta) - dy

    best = None
    scale_g = abs(gain0) if gain0 != 0 else 1.0
    lo = [-10 * scale_g - 1e-12, 0.0, 0.0]
    hi = [10 * scale_g + 1e-12, horizon / 2, max_delay]
    for tau0 in (0.1 * T, T):
        for d0 in (0.0, 0.6 * T):
            if d0 > max_delay:
                continue
            x0 = np.clip([gain0, tau0, d0], lo, hi)
            r = least_squares(resid, x0, bounds=(lo, hi), x_scale=[scale_g, T, T],
                              diff_step=1e-4, max_nfev=120)
            if best is None or r.cost < best.cost:
                best = r
    assert best is not None  # at least one start point is always tried
    K, tau, delay = (float(v) for v in best.x)
    rms = float(np.sqrt(np.mean(best.fun ** 2)))
    # the fit over the response (from the step on), in per cent of its spread
    fit = fit_percent(dy[k0:], model(best.x)[k0:])
    return FOPDT(gain=K, tau_s=tau, delay_s=delay, dt_s=T, window_s=window_s,
                 input_name=input_name, output_name=output_name, source="step-test", fit_rms=rms,
                 fit_pct=fit)


# --------------------------------------------------------------------------------------------
# Stability map and gain recommendation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class StabilityMap:
    """(Kp, Ki) grid: ``stable``, ``gain_margin_db``, ``phase_margin_deg``, ``settling_time_s``
    have shape ``(len(ki), len(kp))`` (rows: Ki)."""

    plant: FOPDT
    kp: np.ndarray
    ki: np.ndarray
    stable: np.ndarray
    gain_margin_db: np.ndarray
    phase_margin_deg: np.ndarray
    settling_time_s: np.ndarray
    overshoot_pct: np.ndarray


def stability_map(plant: FOPDT, kp: np.ndarray, ki: np.ndarray) -> StabilityMap:
    """Analyse every (Kp, Ki) of the grid ``kp × ki``."""
    kp = np.asarray(kp, float)
    ki = np.asarray(ki, float)
    shape = (len(ki), len(kp))
    st = np.zeros(shape, bool)
    gm = np.full(shape, np.nan)
    pm = np.full(shape, np.nan)
    ts = np.full(shape, np.nan)
    os_ = np.full(shape, np.nan)
    for i, kiv in enumerate(ki):
        for j, kpv in enumerate(kp):
            r = analyze_loop(plant, kp=kpv, ki=kiv)
            st[i, j] = r.stable
            if r.stable:
                gm[i, j] = r.gain_margin_db
                pm[i, j] = r.phase_margin_deg
                ts[i, j] = r.step.settling_time_s
                os_[i, j] = r.step.overshoot_pct
    return StabilityMap(plant=plant, kp=kp, ki=ki, stable=st, gain_margin_db=gm,
                        phase_margin_deg=pm, settling_time_s=ts, overshoot_pct=os_)


@dataclass(frozen=True, kw_only=True)
class Recommendation:
    """Gains meeting the margins with the fastest settling (None when no grid point does)."""

    kp: float | None
    ki: float | None
    analysis: LoopAnalysis | None
    min_gm_db: float
    min_pm_deg: float
    candidates: int


def _default_grid(plant: FOPDT, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A grid scaled to the plant: Kp up to ~1.5/|K| and Ki up to ~1.5/(|K|·dt) cover the
    stable region of a one-sample-delay loop (``Ki·dt·K < 2``)."""
    g = abs(plant.gain) if plant.gain != 0 else 1.0
    sign = 1.0 if plant.gain >= 0 else -1.0
    kp = sign * np.linspace(0.0, 1.5 / g, n)
    ki = sign * np.linspace(1.5 / (g * plant.dt_s) / n, 1.5 / (g * plant.dt_s), n)
    return kp, ki


def recommend_gains(plant: FOPDT, *, kp: np.ndarray | None = None, ki: np.ndarray | None = None,
                    grid_points: int = 25, min_gm_db: float = 6.0,
                    min_pm_deg: float = 45.0, smap: StabilityMap | None = None) -> Recommendation:
    """The (Kp, Ki) of the grid with the shortest predicted settling time among those with
    gain margin ≥ ``min_gm_db`` and phase margin ≥ ``min_pm_deg`` (ties: smaller overshoot)."""
    if smap is None:
        if kp is None or ki is None:
            dkp, dki = _default_grid(plant, grid_points)
            kp = dkp if kp is None else kp
            ki = dki if ki is None else ki
        smap = stability_map(plant, kp, ki)
    ok = smap.stable & (smap.gain_margin_db >= min_gm_db) & (smap.phase_margin_deg >= min_pm_deg) \
        & np.isfinite(smap.settling_time_s)
    idx = np.argwhere(ok)
    if idx.size == 0:
        return Recommendation(kp=None, ki=None, analysis=None, min_gm_db=min_gm_db,
                              min_pm_deg=min_pm_deg, candidates=0)
    keys = [(smap.settling_time_s[i, j], smap.overshoot_pct[i, j], -smap.gain_margin_db[i, j])
            for i, j in idx]
    i, j = idx[min(range(len(keys)), key=lambda n: keys[n])]
    kpv, kiv = float(smap.kp[j]), float(smap.ki[i])
    return Recommendation(kp=kpv, ki=kiv,
                          analysis=analyze_loop(plant, kp=kpv, ki=kiv, min_gm_db=min_gm_db,
                                                min_pm_deg=min_pm_deg),
                          min_gm_db=min_gm_db, min_pm_deg=min_pm_deg, candidates=len(idx))


def plot_stability_map(smap: StabilityMap, path: str, *, title: str = "",
                       current: tuple[float, float] | None = None,
                       recommended: tuple[float, float] | None = None,
                       min_gm_db: float = 6.0, min_pm_deg: float = 45.0) -> str:
    """Write the (Kp, Ki) map as a PNG: unstable region, gain/phase-margin contours at the
    thresholds, settling time colour map; marks the current and recommended gains."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    KP, KI = np.meshgrid(smap.kp, smap.ki)
    ts = np.where(smap.stable, smap.settling_time_s, np.nan)
    if np.any(np.isfinite(ts) & (ts > 0)):
        from matplotlib.colors import LogNorm

        pos = ts[np.isfinite(ts) & (ts > 0)]
        norm = LogNorm(vmin=float(pos.min()), vmax=float(max(pos.max(), pos.min() * 1.01)))
        cs = ax.pcolormesh(KP, KI, np.where(ts > 0, ts, np.nan), shading="auto",
                           cmap="viridis_r", norm=norm)
        fig.colorbar(cs, ax=ax, label="predicted settling time (s, log scale)")
    ax.contourf(KP, KI, (~smap.stable).astype(float), levels=[0.5, 1.5], colors=["#d62728"],
                alpha=0.35)
    for arr, lvl, style, lab in ((smap.gain_margin_db, min_gm_db, "--", f"GM = {min_gm_db:g} dB"),
                                 (smap.phase_margin_deg, min_pm_deg, ":",
                                  f"PM = {min_pm_deg:g} deg")):
        a = np.where(np.isfinite(arr), arr, -1e9)
        if np.nanmin(a) < lvl < np.nanmax(a):
            c = ax.contour(KP, KI, a, levels=[lvl], colors="k", linestyles=style)
            ax.clabel(c, fmt={lvl: lab}, fontsize=8)
    if current is not None:
        ax.plot(*current, "wo", mec="k", label="configured")
    if recommended is not None:
        ax.plot(*recommended, "w*", mec="k", ms=12, label="recommended")
    if current is not None or recommended is not None:
        ax.legend(loc="upper right", fontsize=8)
    p = smap.plant
    ax.set_xlabel(f"Kp ({p.input_name} per {p.output_name})")
    ax.set_ylabel(f"Ki ({p.input_name} per {p.output_name} per s)")
    ax.set_title(title or f"stability map (red: unstable), K={p.gain:.3g}, "
                          f"τ={p.tau_s:.2f}s, θ={p.delay_s:.2f}s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
