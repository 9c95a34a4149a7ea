"""The loop's plant model and its exact sampled form, with numpy only (no python-control import).

`FOPDT` is a first order plus dead time plant read by an averaging sensor; `discrete_matrices`
gives its exact discrete-time state-space matrices at the control period (zero-order hold on the
input), built segment by segment so that fractional dead times and averaging windows that are
not whole periods are exact, not Padé approximations. `palsctl.analysis.stability` wraps them in
python-control objects; `palsctl.analysis.gains` uses them directly to stay fast.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["FOPDT", "discrete_matrices", "closed_form_segment", "fit_percent"]

#: A ZOH segment: (duration h, the window integrator is on) -> (state map, input map) of the
#: continuous state [x, Zf, Zp] (the lag's output, its integral over the period and over the
#: window's tail).
Segment = Callable[[float, bool], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True, kw_only=True)
class FOPDT:
    """First order plus dead time plant seen through an averaging sensor, sampled at ``dt_s``.

    ``gain``: output units per input unit at steady state (e.g. tok/s per sequence, W per W of
    cap). ``tau_s``: time constant (actuator settling lag + plant lag), seconds (0 = instant).
    ``delay_s``: dead time, seconds. ``window_s``: the sensor reports the mean of the output
    over the last ``window_s`` seconds (``0`` = an instantaneous sample). ``dt_s``: control
    period (zero-order hold on the input). ``source`` says where the numbers come from
    ("step-test", "model-gradients", ...); ``fit_rms`` is the step-test fit's RMS residual in
    output units and ``fit_pct`` its normalised fit (`fit_percent`, 100 = exact) when
    identified from data.
    """

    gain: float
    tau_s: float
    delay_s: float
    dt_s: float
    window_s: float
    input_name: str = "u"
    output_name: str = "y"
    source: str = "given"
    fit_rms: float | None = None
    fit_pct: float | None = None

    def __post_init__(self) -> None:
        for name in ("gain", "tau_s", "delay_s", "dt_s", "window_s"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"FOPDT.{name} must be finite, got {v}")
        if self.dt_s <= 0:
            raise ValueError(f"FOPDT.dt_s must be > 0, got {self.dt_s}")
        for name in ("tau_s", "delay_s", "window_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"FOPDT.{name} must be >= 0, got {getattr(self, name)}")

    def with_gain(self, gain: float, *, source: str | None = None) -> "FOPDT":
        """The same model with another gain (and where it came from)."""
        d = asdict(self)
        d["gain"] = float(gain)
        if source is not None:
            d["source"] = source
        return FOPDT(**d)

    def to_dict(self) -> dict[str, Any]:
        """The model as a JSON-serialisable dict."""
        return asdict(self)


def fit_percent(y: np.ndarray, y_model: np.ndarray) -> float:
    """Normalised fit of a model's output to data, in per cent (the system-identification
    convention): ``100 · (1 − ‖y − ŷ‖ / ‖y − mean(y)‖)``. 100 is exact; 0 explains no more
    than the mean; negative is worse than the mean. nan for constant data."""
    y = np.asarray(y, dtype=float)
    y_model = np.asarray(y_model, dtype=float)
    spread = float(np.linalg.norm(y - np.mean(y)))
    if spread == 0.0:
        return math.nan
    return 100.0 * (1.0 - float(np.linalg.norm(y - y_model)) / spread)


def closed_form_segment(p: FOPDT) -> Segment:
    """The ZOH maps of a segment of the period for the scalar lag of ``p``, in closed form."""
    tau = max(p.tau_s, 1e-6 * p.dt_s)

    def seg(h: float, zp_on: bool) -> tuple[np.ndarray, np.ndarray]:
        if h <= 0:
            return np.eye(3), np.zeros((3, 1))
        e = math.exp(-h / tau)
        i1 = (1.0 - e) * tau          # ∫_0^h e^{-σ/τ} dσ
        on = 1.0 if zp_on else 0.0
        ph = np.array([[e, 0.0, 0.0], [i1, 1.0, 0.0], [on * i1, 0.0, 1.0]])
        gx = p.gain * (1.0 - e)
        gz = p.gain * (h - i1)
        return ph, np.array([[gx], [gz], [on * gz]])

    return seg


def discrete_matrices(p: FOPDT, segment: Segment | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact discrete-time ``(A, B, C, D)`` of `FOPDT` ``p`` at ``p.dt_s`` (input held by a ZOH).

    Sample ``k`` of the output is the sensor reading taken at ``t = k·dt`` (the mean of the
    output over ``[k·dt − window_s, k·dt]``); input sample ``k`` is applied at ``t = k·dt``
    right after that reading (so ``D = 0``). The continuous lag ``x' = (K·v − x)/τ`` is
    augmented with integrators of its output; ``segment`` gives the ZOH maps of each piece of
    the period in which the delayed input and the averaging window are constant (default:
    `closed_form_segment`; `palsctl.analysis.stability` passes python-control's ``c2d``).
    """
    seg = segment or closed_form_segment(p)
    T = p.dt_s
    d_int = int(math.floor(p.delay_s / T + 1e-12))
    theta_f = p.delay_s - d_int * T
    if theta_f < 1e-12 * T:
        theta_f = 0.0
    W = p.window_s
    if W <= 1e-12 * T:
        m, w = 0, 0.0           # instantaneous sample
    else:
        m = int(math.ceil(W / T - 1e-12))
        w = W - (m - 1) * T     # part of the window inside the last period, in (0, T]

    # Breakpoints in the period: θf (delayed input switches from u_{k-d-1} to u_{k-d}) and T − w.
    cuts = sorted({0.0, T, *(t for t in (theta_f, T - w if m else T) if 0.0 < t < T)})
    Phi = np.eye(3)
    G_old = np.zeros((3, 1))
    G_new = np.zeros((3, 1))
    for t0, t1 in zip(cuts[:-1], cuts[1:], strict=True):
        Ph, Gh = seg(t1 - t0, bool(m) and t0 >= T - w - 1e-12)
        Phi = Ph @ Phi
        G_old, G_new = Ph @ G_old, Ph @ G_new
        if t0 < theta_f - 1e-12:
            G_old = G_old + Gh
        else:
            G_new = G_new + Gh
    # Discrete state ξ = [x_k, F_k .. F_{k-m+1}, P_k .. P_{k-m+1}, u_{k-1} .. u_{k-q}]: F_j is
    # the integral of x over the period ending at j·dt, P_j over its last w seconds. The reading
    # y_k averages [k·dt − W, k·dt] = the last m−1 whole periods plus the tail of the one before:
    # y_k = (F_k + ... + F_{k-m+2} + P_{k-m+1}) / W.
    nH = max(m, 1)
    q = d_int + (1 if theta_f > 0 else 0)
    n = 1 + 2 * nH + q
    iF, iP, iU = 1, 1 + nH, 1 + 2 * nH
    A = np.zeros((n, n))
    B = np.zeros((n, 1))
    C = np.zeros((1, n))
    D = np.zeros((1, 1))

    def add_input(col_gain: np.ndarray, lag: int) -> None:
        # contribution of u_{k-lag} to rows (x, F_{k+1}, P_{k+1})
        for r, g in zip((0, iF, iP), col_gain[:, 0], strict=True):
            if lag == 0:
                B[r, 0] += g
            else:
                A[r, iU + lag - 1] += g

    for r, src in ((0, 0), (iF, 1), (iP, 2)):
        A[r, 0] = Phi[src, 0]   # Zf, Zp start each period at 0: only x_k matters
    add_input(G_new, d_int)
    if theta_f > 0:
        add_input(G_old, d_int + 1)
    for j in range(1, nH):      # shift the F and P histories
        A[iF + j, iF + j - 1] = 1.0
        A[iP + j, iP + j - 1] = 1.0
    if q:
        B[iU, 0] = 1.0          # u_k enters the input buffer
        for j in range(1, q):
            A[iU + j, iU + j - 1] = 1.0
    if m == 0:
        C[0, 0] = 1.0           # instantaneous sample of x
    else:
        for j in range(m - 1):  # F_k .. F_{k-m+2}
            C[0, iF + j] = 1.0 / W
        C[0, iP + m - 1] = 1.0 / W
    return A, B, C, D
