"""Lightweight offline power-performance models (PALS-style).

A `PowerPerfModel` is fitted from a small profile of (power cap x batch) points and predicts,
for any configuration, the saturated generated-token throughput, the plant's total power, the
p90 inter-token latency and tokens per joule.

Two kinds:

``"parametric"``
    A physically shaped model with 14 parameters (per GPU; 16 when the profile varies the
    workload), fitted jointly to throughput, power and — when recorded — the SM clock with
    ``scipy.optimize.least_squares`` (bounded, log residuals, robust loss, a few deterministic
    starts):

    * an engine step of ``n`` tokens from ``s`` sequences costs, at full clock, a memory time
      ``t_mem = m0 + m_moe * (1 - exp(-n / b_moe)) + m1 * s`` (weights, MoE experts touched —
      saturating in the tokens —, KV reads), a compute time ``k1 * n`` and per-sequence work
      ``s1 * s``; at clock ratio ``r`` the step takes
      ``t = max(t_mem, k1 n / r) + s1 s / r + f0`` (roofline + host overhead ``f0``);
    * per-GPU power ``p_idle + d_full * r * max(r, v0)**2 * activity`` (dynamic power ~ f V^2
      with a voltage floor ``v0``), the activity being 1 while computing, ``a_mem`` while
      stalled on memory, 0 during host overhead;
    * saturated chunked-prefill serving: a request finishes every ``output / b`` steps and its
      prompt rides in a "mixed" step (``b`` decodes + the prompt's tokens); the rest are pure
      decode steps;
    * the power cap: the firmware holds the mean power of the step mix within ``eta * cap``
      with one clock, the highest in ``[r_min, 1]`` (bisection + false position, vectorised);
      at the clock floor the draw may exceed the cap;
    * ``throughput_tok_s = b / t_mean`` (saturating in batch and in cap),
      ``power_w = num_gpus * p_mean``, ``itl_p90_s = a_itl * t_mean + d_itl``.

    When the profile varies the prompt/output lengths, the compute part scales with
    ``1 + rho * prompt/output`` and the per-sequence memory part with
    ``1 + lam * (prompt + output/2) / 1000``; otherwise these are pinned to 0. Without prompt
    and output columns there are no mixed steps (their cost is absorbed in the constants).

``"gbt"`` / ``"forest"``
    scikit-learn gradient-boosted trees / random forest on log-targets (as the PALS authors
    used), stored as plain node arrays in the JSON file and evaluated with numpy.

Model files are JSON with ``schema_version``; `PowerPerfModel.load` refuses unknown versions and
missing or malformed fields with a `ModelFileError` naming the field. No pickle.

>>> rows = [dict(power_cap_w=c, max_batch=b, throughput_tok_s=100.0 * b / (b + 4) * min(1, c / 300),
...              power_w=min(80 + 10 * b, c)) for c in (150, 250, 350) for b in (1, 4, 16, 64)]
>>> m = PowerPerfModel.fit(rows, kind="parametric", cv_folds=0)
>>> p = m.predict(power_cap_w=250.0, max_batch=16)
>>> round(p.tokens_per_joule, 3) == round(p.throughput_tok_s / p.power_w, 3)
True
"""
from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from palsctl.errors import ModelFileError, PalsctlError

SCHEMA_VERSION = 1
KINDS = ("parametric", "gbt", "forest")
TARGETS = ("throughput_tok_s", "power_w", "itl_p90_s")
BASE_FEATURES = ("power_cap_w", "max_batch")
WORKLOAD_FEATURES = ("prompt_tokens", "output_tokens")

__all__ = ["PowerPerfModel", "Prediction", "Gradients", "ModelRangeWarning", "SCHEMA_VERSION",
           "KINDS", "read_rows"]


class ModelRangeWarning(UserWarning):
    """A prediction was asked outside the model's training ranges (extrapolation)."""


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """Predicted steady state of configurations.

    Floats for scalar inputs, else numpy arrays broadcast over the inputs.

    Parameters
    ----------
    throughput_tok_s : float or numpy.ndarray
        Generated tokens per second, tok/s.
    power_w : float or numpy.ndarray
        Total power over the plant's GPUs, W.
    itl_p90_s : float or numpy.ndarray
        p90 inter-token latency, s (NaN when the profile had no latency column).
    tokens_per_joule : float or numpy.ndarray
        ``throughput_tok_s / power_w``.
    """

    throughput_tok_s: Any
    power_w: Any
    itl_p90_s: Any
    tokens_per_joule: Any


@dataclass(frozen=True, kw_only=True)
class Gradients:
    """Local sensitivities at a configuration (per-GPU cap in W, batch in sequences).

    Parameters
    ----------
    dthroughput_dcap : float or numpy.ndarray
        tok/s per W of per-GPU cap.
    dthroughput_dbatch : float or numpy.ndarray
        tok/s per sequence of batch limit.
    dpower_dcap : float or numpy.ndarray
        W of total power per W of per-GPU cap.
    dpower_dbatch : float or numpy.ndarray
        W of total power per sequence of batch limit.
    """

    dthroughput_dcap: Any
    dthroughput_dbatch: Any
    dpower_dcap: Any
    dpower_dbatch: Any


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------

def read_rows(source: str | Path | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows as a list of dicts: from a CSV path or any iterable of mappings."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise PalsctlError(f"{path}: profile file not found")
        with path.open(newline="") as f:
            return [dict(r) for r in csv.DictReader(f)]
    return [dict(r) for r in source]


def _float_or_nan(v: Any) -> float:
    if v is None or v == "":
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _column(rows: Sequence[Mapping[str, Any]], name: str) -> np.ndarray:
    return np.array([_float_or_nan(r.get(name)) for r in rows], dtype=float)


def _mape(pred: np.ndarray, true: np.ndarray) -> float:
    ok = np.isfinite(pred) & np.isfinite(true) & (true != 0)
    if not ok.any():
        return math.nan
    return float(np.mean(np.abs(pred[ok] - true[ok]) / np.abs(true[ok])))


# --------------------------------------------------------------------------------------------
# Parametric backend
# --------------------------------------------------------------------------------------------

_POWER_PARAMS = ("p_idle", "d_full", "a_mem", "v0", "r_min", "eta", "f_max")
_THR_PARAMS = ("m0", "m_moe", "b_moe", "m1", "k1", "s1", "f0", "rho", "lam")
_ITL_PARAMS = ("a_itl", "d_itl")
_ALL_PARAMS = _POWER_PARAMS + _THR_PARAMS
_BISECT_STEPS = 5
_FALSE_POSITION_STEPS = 2
_CHUNK_TOKENS = 8192  # vLLM's default chunked-prefill token budget per step
_UNKNOWN_PROMPT, _UNKNOWN_OUTPUT = 1.0, 1e9  # workload not recorded: no prefill steps



def _shrink_bracket(lo, hi, p_lo, p_hi, r, power, limit) -> None:
    """In place: where ``power`` at clock ratio ``r`` fits ``limit``, ``r`` becomes the lower end
    of the bracket, elsewhere the upper end (with the powers at the ends)."""
    below = power <= limit
    np.copyto(lo, r, where=below)
    np.copyto(p_lo, power, where=below)
    np.logical_not(below, out=below)
    np.copyto(hi, r, where=below)
    np.copyto(p_hi, power, where=below)

class _Parametric:
    """The physically shaped model (see the module docstring). Parameters per GPU, in seconds
    and watts; ``f_max`` (MHz) is NaN when the profile did not record the SM clock."""

    kind = "parametric"

    def __init__(self, params: dict[str, float], *, num_gpus: int, workload_ref: dict[str, float]):
        self.params = {k: float(v) for k, v in params.items()}
        self.num_gpus = int(num_gpus)
        self.workload_ref = workload_ref
        self._x = np.array([self.params[k] for k in _ALL_PARAMS])

    # physics ----------------------------------------------------------------------------------
    @staticmethod
    def _step_parts(x, b, prompt, output):
        """Clock-independent parts of one step: memory time, compute time and per-sequence
        time at full clock (s)."""
        m0, m_moe, b_moe, m1, k1, s1, _f0, rho, lam = x[7:]
        t_mem = (m0 + m_moe * (1.0 - np.exp(-b / b_moe))
                 + m1 * b * (1.0 + lam * (prompt + 0.5 * output) / 1000.0))
        t_c1 = k1 * b * (1.0 + rho * prompt / output)
        t_s1 = s1 * b
        return t_mem, t_c1, t_s1

    @staticmethod
    def _at_clock(x, r, t_mem, t_c1, t_s1):
        """(step time s, per-GPU power W) at clock ratio ``r``: roofline kernel time (memory
        or compute bound), per-sequence work and a fixed host overhead; the GPU's activity is
        full while computing, ``a_mem`` while stalled on memory, nil during host overhead."""
        p_idle, d_full, a_mem, v0 = x[0], x[1], x[2], x[3]
        f0 = x[13]
        inv = 1.0 / r
        tc = t_c1 * inv
        ts = t_s1 * inv
        kern = np.maximum(t_mem, tc)
        t = kern + ts + f0
        busy = a_mem * (kern - tc) + tc + ts
        v = np.maximum(r, v0)
        return t, p_idle + d_full * r * v * v * busy / t

    @classmethod
    def _mix_at(cls, x, r, parts, mixed):
        """(mean step time s, mean per-GPU power W) of the step mix at clock ratio ``r``;
        ``parts``: (t_mem, t_c1, t_s1), each stacked (decode steps, mixed steps) x points;
        ``mixed``: fraction of mixed steps."""
        t, p = cls._at_clock(x, r, *parts)
        w_d = (1.0 - mixed) * t[0]
        w_m = mixed * t[1]
        tt = w_d + w_m
        return tt, (p[0] * w_d + p[1] * w_m) / tt

    @classmethod
    def _core(cls, x, cap, b, prompt, output):
        """(throughput_tok_s, per-GPU power W, clock ratio, mean step time s).

        Saturated chunked-prefill serving: a request finishes every ``output/b`` steps and its
        prompt is prefilled in a "mixed" step that carries the prompt tokens besides the
        decodes; the other steps are pure decode. The firmware holds the power averaged over
        its window within the cap: one clock for the mix, the highest in [r_min, 1] whose mean
        power fits ``eta * cap`` (at the clock floor the draw may exceed the cap)."""
        r_min, eta = x[4], x[5]
        shape = np.broadcast_shapes(np.shape(cap), np.shape(b), np.shape(prompt), np.shape(output))
        cap, b, prompt, output = (np.broadcast_to(np.asarray(v, float), shape).reshape(-1)
                                  for v in (cap, b, prompt, output))
        limit = eta * cap
        pref = b * prompt / output                        # prefill tokens per step, mean
        chunk = np.minimum(np.maximum(prompt, pref), _CHUNK_TOKENS)
        mixed = np.minimum(1.0, pref / chunk)             # fraction of mixed steps
        tm_d, tc_d, ts_d = cls._step_parts(x, b, prompt, output)
        tm_m, tc_m, _ = cls._step_parts(x, b + chunk, prompt, output)
        # mixed steps: the chunk's tokens add compute (and experts); one more sequence
        parts = (np.stack([tm_d, tm_m]), np.stack([tc_d, tc_m]), np.stack([ts_d, ts_d + ts_d / b]))
        t1, p1 = cls._mix_at(x, 1.0, parts, mixed)
        # bracket [r_min, 1] where the cap binds, [1, 1] where it does not
        binding = p1 > limit
        lo = np.where(binding, r_min, 1.0)
        hi = np.ones_like(lo)
        p_lo = np.where(binding, cls._mix_at(x, lo, parts, mixed)[1], p1)
        p_hi = p1.copy()
        for _ in range(_BISECT_STEPS):
            mid = 0.5 * (lo + hi)
            _, pm = cls._mix_at(x, mid, parts, mixed)
            _shrink_bracket(lo, hi, p_lo, p_hi, mid, pm, limit)
        # false-position steps inside the bracket (keep r smooth in the parameters); at the
        # clock floor the interpolation stays at r_min and the draw may exceed the cap
        for _ in range(_FALSE_POSITION_STEPS):
            frac = np.clip((limit - p_lo) / np.maximum(p_hi - p_lo, 1e-12), 0.0, 1.0)
            r = lo + frac * (hi - lo)
            t, power = cls._mix_at(x, r, parts, mixed)
            _shrink_bracket(lo, hi, p_lo, p_hi, r, power, limit)
        # where the cap binds above the clock floor the firmware holds the power at the limit
        power = np.where(binding & (p_lo <= limit), limit, power)
        if np.ndim(r_min):  # a batch of parameter vectors: (K, points)
            return b / t, power, r, t
        thr = b / t
        return thr.reshape(shape), power.reshape(shape), r.reshape(shape), t.reshape(shape)

    def predict(self, cap, b, prompt, output):
        thr, power, _r, t = self._core(self._x, cap, b, prompt, output)
        itl = self.params["a_itl"] * t + self.params["d_itl"]
        return thr, self.num_gpus * power, itl

    # fitting ----------------------------------------------------------------------------------
    @classmethod
    def fit(cls, X: dict[str, np.ndarray], Y: dict[str, np.ndarray], *, num_gpus: int,
            workload_ref: dict[str, float], varies_workload: bool, seed: int = 0,
            init: dict[str, float] | None = None) -> "_Parametric":
        """Joint bounded least squares on log residuals of throughput, power and (when
        recorded) the SM clock; several starts (only ``init`` when given)."""
        from scipy.optimize import least_squares

        cap, b = X["power_cap_w"], X["max_batch"]
        prompt, output = X["prompt_tokens"], X["output_tokens"]
        pw = Y["power_w"] / num_gpus
        thr = Y["throughput_tok_s"]
        clock = Y.get("sm_clock_mhz")
        has_clock = clock is not None and bool(np.all(np.isfinite(clock) & (clock > 0)))
        log_pw, log_thr = np.log(pw), np.log(thr)
        log_clk = np.log(clock) if has_clock and clock is not None else None

        pmin, pmax = float(np.min(pw)), float(np.max(pw))
        t_obs = b / thr
        tmin, tmax = float(np.min(t_obs)), float(np.max(t_obs))
        tps = float(np.max(t_obs / b))
        tseq = float(np.min(t_obs / b))  # per-sequence step time at the largest batches
        fmax_obs = float(np.max(clock)) if has_clock and clock is not None else 1.0
        eps = 1e-12
        w = 1.0 if varies_workload else 0.0
        lo = np.array([0.0, 0.0, 0.0, 0.3, 0.02, 0.7, (0.8 * fmax_obs) if has_clock else 1.0,
                       0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
        hi = np.array([pmin, 10.0 * pmax, 1.0, 1.0, 0.9, 1.1,
                       (2.0 * fmax_obs) if has_clock else 1.0 + eps,
                       10 * tmax, 10 * tmax, 512.0, 10 * tps, 10 * tps, 10 * tps, 10 * tmax,
                       50.0 * w + eps, 10.0 * w + eps])

        # parameters pinned by their bounds (workload terms of a constant workload, f_max
        # without clock readings) stay out of the optimisation
        free = (hi - lo) > 1e-9
        base = lo.copy()

        def full(z):
            x = base.copy()
            x[free] = z
            return x

        def resid_of(x):
            t_pred, p_pred, r, _ = cls._core(x, cap, b, prompt, output)
            parts = [np.log(np.maximum(t_pred, 1e-12)) - log_thr,
                     np.log(np.maximum(p_pred, 1e-12)) - log_pw]
            if has_clock:
                parts.append(0.5 * (np.log(x[6] * r) - log_clk))
            return np.concatenate(parts, axis=-1)

        def residuals(z):
            return resid_of(full(z))

        span = (hi - lo)[free]

        def jacobian(z):
            """Forward differences, all parameters perturbed in one batched evaluation."""
            h = 1e-6 * np.maximum(np.abs(z), 1e-3 * span)
            h = np.where(z + h > hi[free], -h, h)
            Z = np.repeat(z[None, :], len(z) + 1, axis=0)
            Z[1:] += np.diag(h)
            X = np.repeat(base[None, :], len(Z), axis=0)
            X[:, free] = Z
            R = resid_of([X[:, i][:, None] for i in range(X.shape[1])])
            return ((R[1:] - R[0]) / h[:, None]).T

        def start(idle_frac, a_mem, v0, b_moe, mem_share, r_min=0.15):
            return [idle_frac * pmin, 2.0 * pmax, a_mem, v0, r_min, 1.0,
                    fmax_obs if has_clock else 1.0,
                    mem_share * tmin, 0.3 * tmin, b_moe, 0.05 * tseq, 0.5 * tseq, 0.2 * tseq,
                    0.1 * tmin, 0.1 * w, 0.1 * w]

        if init is not None:
            starts = [[init[k] for k in _ALL_PARAMS]]
        else:
            starts = [start(0.4, 0.5, 0.8, 4.0, 0.6), start(0.25, 0.3, 0.6, 2.0, 0.3),
                      start(0.6, 0.8, 0.9, 8.0, 0.8)]

        def solve(x0, max_nfev):
            x0 = np.minimum(np.maximum(np.asarray(x0, float), lo), hi)
            x0 = np.where(x0 <= lo, lo + 1e-6 * (hi - lo),
                          np.where(x0 >= hi, hi - 1e-6 * (hi - lo), x0))
            res = least_squares(residuals, x0[free], jac=jacobian, bounds=(lo[free], hi[free]),
                                x_scale="jac", loss="soft_l1", f_scale=0.05, ftol=1e-7,
                                max_nfev=max_nfev)
            res.x = full(res.x)
            return res

        # a short run from every start, then the best one refined
        best = min((solve(x0, 100 if init is None else 60) for x0 in starts),
                   key=lambda r: r.cost)
        if init is None and best.status == 0:
            best = solve(best.x, 150)
        x = best.x
        params = dict(zip(_ALL_PARAMS, map(float, x)))
        if not has_clock:
            params["f_max"] = math.nan

        # itl_p90 = a * step_time + d  (least squares on relative residuals, a, d >= 0)
        a_itl, d_itl = math.nan, math.nan
        itl = Y.get("itl_p90_s")
        if itl is not None:
            ok = np.isfinite(itl) & (itl > 0)
            if ok.sum() >= 2:
                t = cls._core(x, cap, b, prompt, output)[3][ok]
                wi = 1.0 / itl[ok]
                r = least_squares(lambda z: (z[0] * t + z[1]) * wi - 1.0, [1.0, 0.0],
                                  bounds=([0.0, 0.0], [np.inf, np.inf]))
                a_itl, d_itl = float(r.x[0]), float(r.x[1])
        params.update(a_itl=a_itl, d_itl=d_itl)
        return cls(params, num_gpus=num_gpus, workload_ref=workload_ref)

    def init_params(self) -> dict[str, float]:
        p = dict(self.params)
        if not math.isfinite(p["f_max"]):
            p["f_max"] = 1.0
        return p

    def to_json(self) -> dict[str, Any]:
        return {k: (None if not math.isfinite(v) else v) for k, v in self.params.items()}

    @classmethod
    def from_json(cls, data: Any, *, num_gpus: int, workload_ref: dict[str, float]):
        if not isinstance(data, Mapping):
            raise ModelFileError("field 'params' must be an object")
        params = {}
        for k in _ALL_PARAMS + _ITL_PARAMS:
            if k not in data:
                raise ModelFileError(f"missing field 'params.{k}'")
            v = data[k]
            if v is None:
                v = math.nan
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ModelFileError(f"field 'params.{k}' must be a number, got {v!r}")
            params[k] = float(v)
        for k in _ALL_PARAMS:
            if k != "f_max" and not math.isfinite(params[k]):
                raise ModelFileError(f"field 'params.{k}' must be a finite number")
        return cls(params, num_gpus=num_gpus, workload_ref=workload_ref)


# --------------------------------------------------------------------------------------------
# Tree ensembles (fitted with scikit-learn, stored as arrays, evaluated with numpy)
# --------------------------------------------------------------------------------------------

class _TreeEnsemble:
    """Sum of regression trees: ``offset + scale * sum_t tree_t(x)`` (forest: scale = 1/n)."""

    def __init__(self, *, offset: float, scale: float, left, right, feature, threshold, value,
                 roots, depth: int):
        self.offset, self.scale = float(offset), float(scale)
        self.left = np.asarray(left, dtype=np.int64)
        self.right = np.asarray(right, dtype=np.int64)
        self.feature = np.asarray(feature, dtype=np.int64)
        self.threshold = np.asarray(threshold, dtype=float)
        self.value = np.asarray(value, dtype=float)
        self.roots = np.asarray(roots, dtype=np.int64)
        self.depth = int(depth)
        n = len(self.left)
        if not (len(self.right) == len(self.feature) == len(self.threshold) == len(self.value)
                == n):
            raise ModelFileError("tree arrays have different lengths")
        if n and (self.left.max() >= n or self.right.max() >= n or self.roots.max(initial=0) >= n):
            raise ModelFileError("tree node index out of range")
        self._leaf = self.left < 0
        self._feat = np.where(self._leaf, 0, self.feature)

    @classmethod
    def from_sklearn(cls, estimators: Sequence[Any], *, offset: float, scale: float):
        left, right, feat, thr, val, roots = [], [], [], [], [], []
        base, depth = 0, 0
        for est in estimators:
            t = est.tree_
            lc, r = t.children_left.copy(), t.children_right.copy()
            roots.append(base)
            left.append(np.where(lc >= 0, lc + base, -1))
            right.append(np.where(r >= 0, r + base, -1))
            feat.append(t.feature.copy())
            thr.append(t.threshold.copy())
            val.append(t.value[:, 0, 0].copy())
            base += t.node_count
            depth = max(depth, int(t.max_depth))
        return cls(offset=offset, scale=scale, left=np.concatenate(left),
                   right=np.concatenate(right), feature=np.concatenate(feat),
                   threshold=np.concatenate(thr), value=np.concatenate(val), roots=roots,
                   depth=depth)

    def __call__(self, Xf32: np.ndarray) -> np.ndarray:
        """``Xf32``: (n, n_features) float32 (scikit-learn compares in float32).

        The ensemble is constant on the cells of the grid spanned by its thresholds; with few
        features (the usual case) it is tabulated once on that grid and evaluated by a binary
        search per feature, which keeps predicting a whole candidate grid well under a
        millisecond."""
        table = self._table(Xf32.shape[1])
        if table is None:
            return self._traverse(Xf32)
        cuts, values = table
        X = Xf32.astype(float)
        cell = tuple(np.searchsorted(c, X[:, j], side="left") for j, c in enumerate(cuts))
        return values[cell]

    _TABLE_MAX_CELLS = 1_000_000

    def _table(self, n_features: int):
        cached = getattr(self, "_table_cache", None)
        if cached is not None and cached[0] == n_features:
            return cached[1]
        internal = ~self._leaf
        cuts = [np.unique(self.threshold[internal & (self.feature == j)])
                for j in range(n_features)]
        n_cells = int(np.prod([len(c) + 1 for c in cuts]))
        table = None
        if n_cells <= self._TABLE_MAX_CELLS:
            reps = [np.append(c, (c[-1] + 1.0) if len(c) else 0.0) for c in cuts]
            mesh = np.meshgrid(*reps, indexing="ij")
            pts = np.column_stack([m.ravel() for m in mesh])
            table = (cuts, self._traverse(pts).reshape(mesh[0].shape))
        self._table_cache = (n_features, table)
        return table

    def _traverse(self, Xf32: np.ndarray) -> np.ndarray:
        n = Xf32.shape[0]
        idx = np.repeat(self.roots[:, None], n, axis=1)  # (trees, n)
        cols = np.arange(n)[None, :]
        for _ in range(self.depth):
            x = Xf32[cols, self._feat[idx]]
            go_left = x <= self.threshold[idx]
            nxt = np.where(go_left, self.left[idx], self.right[idx])
            idx = np.where(self._leaf[idx], idx, nxt)
        return self.offset + self.scale * self.value[idx].sum(axis=0)

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "scale": self.scale, "depth": self.depth,
                "roots": self.roots.tolist(), "left": self.left.tolist(),
                "right": self.right.tolist(), "feature": self.feature.tolist(),
                "threshold": self.threshold.tolist(), "value": self.value.tolist()}

    @classmethod
    def from_json(cls, data: Any, where: str):
        if not isinstance(data, Mapping):
            raise ModelFileError(f"field '{where}' must be an object")
        kw = {}
        for k in ("offset", "scale", "depth", "roots", "left", "right", "feature", "threshold",
                  "value"):
            if k not in data:
                raise ModelFileError(f"missing field '{where}.{k}'")
            kw[k] = data[k]
        try:
            return cls(**kw)
        except ModelFileError as exc:
            raise ModelFileError(f"field '{where}': {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"field '{where}' is malformed: {exc}") from None


class _Trees:
    def __init__(self, kind: str, ensembles: dict[str, _TreeEnsemble], features: Sequence[str],
                 workload_ref: dict[str, float]):
        self.kind = kind
        self.ensembles = ensembles
        self.features = tuple(features)
        self.workload_ref = workload_ref

    @classmethod
    def fit(cls, kind: str, X: dict[str, np.ndarray], Y: dict[str, np.ndarray],
            features: Sequence[str], workload_ref: dict[str, float], seed: int = 0) -> "_Trees":
        from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor

        A = np.column_stack([X[f] for f in features])
        ensembles = {}
        for target, y in Y.items():
            ok = np.isfinite(y) & (y > 0)
            if ok.sum() < 2:
                continue
            ly = np.log(y[ok])
            if kind == "gbt":
                est = GradientBoostingRegressor(n_estimators=150, learning_rate=0.1, max_depth=3,
                                                min_samples_leaf=1, subsample=1.0,
                                                random_state=seed)
                est.fit(A[ok], ly)
                offset = float(np.asarray(est.init_.constant_).ravel()[0])
                ens = _TreeEnsemble.from_sklearn(est.estimators_[:, 0], offset=offset,
                                                 scale=est.learning_rate)
            else:
                est = RandomForestRegressor(n_estimators=100, min_samples_leaf=1,
                                            random_state=seed)
                est.fit(A[ok], ly)
                ens = _TreeEnsemble.from_sklearn(est.estimators_, offset=0.0,
                                                 scale=1.0 / len(est.estimators_))
            ens.sklearn_estimator = est  # kept in memory only (tests compare against it)
            ensembles[target] = ens
        return cls(kind, ensembles, features, workload_ref)

    def predict(self, cap, b, prompt, output):
        cols = {"power_cap_w": cap, "max_batch": b, "prompt_tokens": prompt,
                "output_tokens": output}
        shape = np.shape(cap)
        A = np.column_stack([np.ravel(cols[f]) for f in self.features]).astype(np.float32)
        out = []
        for target in TARGETS:
            ens = self.ensembles.get(target)
            if ens is None:
                out.append(np.full(shape, math.nan))
            else:
                out.append(np.exp(ens(A)).reshape(shape))
        return tuple(out)

    def to_json(self) -> dict[str, Any]:
        return {t: e.to_json() for t, e in self.ensembles.items()}

    @classmethod
    def from_json(cls, kind: str, data: Any, features, workload_ref):
        if not isinstance(data, Mapping):
            raise ModelFileError("field 'params' must be an object")
        ens = {}
        for t in ("throughput_tok_s", "power_w"):
            if t not in data:
                raise ModelFileError(f"missing field 'params.{t}'")
        for t in TARGETS:
            if t in data:
                ens[t] = _TreeEnsemble.from_json(data[t], f"params.{t}")
                if ens[t].feature.max(initial=0) >= len(features):
                    raise ModelFileError(f"field 'params.{t}': feature index out of range")
        return cls(kind, ens, features, workload_ref)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class PowerPerfModel:
    """Predicts throughput, total power, p90 ITL and tokens/J of (power cap, batch) configurations.

    Build with `PowerPerfModel.fit` or `PowerPerfModel.load`; the constructor takes what they
    computed.

    Parameters
    ----------
    kind : {"parametric", "gbt", "forest"}
        The model family.
    backend : object
        The fitted predictor of that family.
    num_gpus : int
        GPUs of the plant profiled (power is their total).
    features : sequence of str
        Input features (``power_cap_w``, ``max_batch``, and the lengths when they varied).
    training_ranges : dict of str to (float, float)
        Feature -> (min, max) seen in the profile (predictions outside warn).
    cv_mape : dict of str to float
        Target -> k-fold cross-validated mean absolute percentage error, as a fraction.
    fit_mape : dict of str to float
        Target -> in-sample mean absolute percentage error, as a fraction.
    plant : dict
        Description of the plant profiled (model, GPU, simulated).
    workload : dict of str to float
        Reference prompt and output lengths, tokens.
    n_points : int
        Profiled configurations.
    """

    def __init__(self, *, kind: str, backend: Any, num_gpus: int, features: Sequence[str],
                 training_ranges: dict[str, tuple[float, float]], cv_mape: dict[str, float],
                 fit_mape: dict[str, float], plant: dict[str, Any], workload: dict[str, float],
                 n_points: int):
        self.kind = kind
        self._backend = backend
        self.num_gpus = int(num_gpus)
        self.features = tuple(features)
        self.training_ranges = {k: (float(v[0]), float(v[1])) for k, v in training_ranges.items()}
        self.cv_mape = dict(cv_mape)
        self.fit_mape = dict(fit_mape)
        self.plant = dict(plant)
        self.workload = dict(workload)
        self.n_points = int(n_points)
        self._warned = False

    def __repr__(self) -> str:
        cv = ", ".join(f"{k}={v:.1%}" for k, v in self.cv_mape.items() if math.isfinite(v))
        return (f"PowerPerfModel(kind={self.kind!r}, num_gpus={self.num_gpus}, "
                f"n_points={self.n_points}, cv_mape: {cv or 'n/a'})")

    # ---------------------------------------------------------------------------------- fit
    @classmethod
    def fit(cls, rows: str | Path | Iterable[Mapping[str, Any]], kind: str = "parametric", *,
            num_gpus: int | None = None, plant: Mapping[str, Any] | None = None,
            cv_folds: int = 5, seed: int = 0) -> "PowerPerfModel":
        """Fit from profile rows (dicts or a CSV path) with columns ``power_cap_w`` (per GPU),
        ``max_batch``, ``throughput_tok_s``, ``power_w`` (total), optionally ``itl_p90_s``,
        ``prompt_tokens``, ``output_tokens``, ``num_gpus``, ``model``, ``gpu``, ``simulated``.

        ``cv_folds``: k of the k-fold cross-validation reported in ``cv_mape`` (0 skips it).
        """
        if kind not in KINDS:
            raise PalsctlError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
        rows = read_rows(rows)
        for col in ("power_cap_w", "max_batch", "throughput_tok_s", "power_w"):
            if rows and col not in rows[0]:
                raise PalsctlError(f"profile has no column {col!r}")
        cap = _column(rows, "power_cap_w")
        b = _column(rows, "max_batch")
        Y = {t: _column(rows, t) for t in TARGETS}
        ok = (np.isfinite(cap) & np.isfinite(b) & (cap > 0) & (b > 0)
              & np.isfinite(Y["throughput_tok_s"]) & (Y["throughput_tok_s"] > 0)
              & np.isfinite(Y["power_w"]) & (Y["power_w"] > 0))
        rows = [r for r, k in zip(rows, ok) if k]
        if len(rows) < 4:
            raise PalsctlError(f"need at least 4 valid profile points to fit, got {len(rows)}")
        cap, b = cap[ok], b[ok]
        Y = {t: v[ok] for t, v in Y.items()}
        if not np.isfinite(Y["itl_p90_s"]).any():
            del Y["itl_p90_s"]

        if num_gpus is None:
            g = _column(rows, "num_gpus")
            g = g[np.isfinite(g)]
            num_gpus = int(g[0]) if len(g) else 1
            if len(g) and np.any(g != g[0]):
                raise PalsctlError("profile mixes different num_gpus values")
        if plant is None:
            plant = {}
            for key in ("model", "gpu", "simulated"):
                vals = {str(r[key]) for r in rows if r.get(key) not in (None, "")}
                if len(vals) == 1:
                    plant[key] = vals.pop()
            plant["num_gpus"] = num_gpus
        plant = dict(plant)

        prompt = _column(rows, "prompt_tokens")
        output = _column(rows, "output_tokens")
        varies = False
        workload: dict[str, float] = {}
        for name, arr in (("prompt_tokens", prompt), ("output_tokens", output)):
            fin = arr[np.isfinite(arr)]
            workload[name] = float(np.median(fin)) if len(fin) else math.nan
            if len(fin) and np.ptp(fin) > 0:
                varies = True
        if varies and (not np.isfinite(prompt).all() or not np.isfinite(output).all()):
            raise PalsctlError("profile varies prompt/output lengths but some rows lack them")
        # constant workload: fill the reference (1 when unknown: the terms are then inert)
        # unknown workload: no prefill steps (the prefill cost is absorbed in the constants)
        prompt = np.where(np.isfinite(prompt), prompt,
                          np.nan_to_num(workload["prompt_tokens"], nan=_UNKNOWN_PROMPT))
        output = np.where(np.isfinite(output), output,
                          np.nan_to_num(workload["output_tokens"], nan=_UNKNOWN_OUTPUT))
        features = list(BASE_FEATURES) + (list(WORKLOAD_FEATURES) if varies else [])
        X = {"power_cap_w": cap, "max_batch": b, "prompt_tokens": prompt, "output_tokens": output}
        ranges = {f: (float(np.min(X[f])), float(np.max(X[f]))) for f in features}
        for f in WORKLOAD_FEATURES:  # the profiled lengths, also when they are not features
            values = _column(rows, f)
            if f not in ranges and np.isfinite(values).all():
                ranges[f] = (float(np.min(values)), float(np.max(values)))

        clock = _column(rows, "sm_clock_mhz")

        def build(idx, init=None):
            Xi = {k: v[idx] for k, v in X.items()}
            Yi = {k: v[idx] for k, v in Y.items()}
            if kind == "parametric":
                Yi["sm_clock_mhz"] = clock[idx]
                return _Parametric.fit(Xi, Yi, num_gpus=num_gpus, workload_ref=workload,
                                       varies_workload=varies, seed=seed, init=init)
            return _Trees.fit(kind, Xi, Yi, features, workload, seed=seed)

        n = len(rows)
        backend = build(np.arange(n))
        init = backend.init_params() if kind == "parametric" else None
        model = cls(kind=kind, backend=backend, num_gpus=num_gpus, features=features,
                    training_ranges=ranges, cv_mape={}, fit_mape={}, plant=plant,
                    workload=workload, n_points=n)
        pred = model._raw_predict(cap, b, prompt, output)
        model.fit_mape = {t: _mape(pred[i], Y[t]) for i, t in enumerate(TARGETS) if t in Y}

        if cv_folds:
            k = min(int(cv_folds), n)
            order = np.random.default_rng(seed).permutation(n)
            folds = np.array_split(order, k)
            cv_pred = {t: np.full(n, math.nan) for t in Y}
            for test_idx in folds:
                train_idx = np.setdiff1d(order, test_idx)
                if len(train_idx) < 4:
                    continue
                sub = build(train_idx, init)
                out = sub.predict(cap[test_idx], b[test_idx], prompt[test_idx], output[test_idx])
                for i, t in enumerate(TARGETS):
                    if t in cv_pred:
                        cv_pred[t][test_idx] = out[i]
            model.cv_mape = {t: _mape(cv_pred[t], Y[t]) for t in Y}
        return model

    # ------------------------------------------------------------------------------ predict
    def _raw_predict(self, cap, b, prompt, output):
        return self._backend.predict(cap, b, prompt, output)

    def _check_range(self, arrays: dict[str, np.ndarray]) -> None:
        if self._warned:
            return
        for f, arr in arrays.items():
            rng = self.training_ranges.get(f)
            if rng is None or arr.size == 0:
                continue
            lo, hi = rng
            tol = 1e-6 * max(abs(lo), abs(hi), 1.0)
            amin, amax = float(np.min(arr)), float(np.max(arr))
            if amin < lo - tol or amax > hi + tol:
                self._warned = True
                warnings.warn(
                    f"PowerPerfModel: {f} in [{amin:g}, {amax:g}] outside the training range "
                    f"[{lo:g}, {hi:g}]; predictions extrapolate (warned once per model)",
                    ModelRangeWarning, stacklevel=3)
                return

    def _inputs(self, power_cap_w, max_batch, prompt_tokens, output_tokens):
        if prompt_tokens is None:
            prompt_tokens = self.workload.get("prompt_tokens", math.nan)
        if output_tokens is None:
            output_tokens = self.workload.get("output_tokens", math.nan)
        cap, b, p, o = np.broadcast_arrays(
            np.asarray(power_cap_w, dtype=float), np.asarray(max_batch, dtype=float),
            np.asarray(prompt_tokens, dtype=float), np.asarray(output_tokens, dtype=float))
        if not (np.isfinite(p).all() and np.isfinite(o).all()):
            p = np.where(np.isfinite(p), p, _UNKNOWN_PROMPT)
            o = np.where(np.isfinite(o), o, _UNKNOWN_OUTPUT)
        return cap, b, p, o

    def predict(self, *, power_cap_w, max_batch, prompt_tokens=None,
                output_tokens=None) -> Prediction:
        """Predict configurations. Inputs are scalars or numpy arrays (broadcast together);
        ``power_cap_w`` is per GPU. ``prompt_tokens``/``output_tokens`` default to the profiled
        workload's. Warns once (`ModelRangeWarning`) when asked outside the training ranges."""
        scalar = all(np.ndim(v) == 0 for v in (power_cap_w, max_batch, prompt_tokens,
                                               output_tokens))
        cap, b, p, o = self._inputs(power_cap_w, max_batch, prompt_tokens, output_tokens)
        check = {"power_cap_w": cap, "max_batch": b}
        if prompt_tokens is not None or "prompt_tokens" in self.features:
            check["prompt_tokens"] = p
        if output_tokens is not None or "output_tokens" in self.features:
            check["output_tokens"] = o
        self._check_range(check)
        thr, pw, itl = self._raw_predict(cap, b, p, o)
        tpj = thr / pw
        if scalar:
            return Prediction(throughput_tok_s=float(thr), power_w=float(pw),
                              itl_p90_s=float(itl), tokens_per_joule=float(tpj))
        return Prediction(throughput_tok_s=thr, power_w=pw, itl_p90_s=itl, tokens_per_joule=tpj)

    def gradients(self, power_cap_w, max_batch, *, prompt_tokens=None,
                  output_tokens=None) -> Gradients:
        """Central finite-difference sensitivities of throughput and total power with respect to
        the per-GPU cap (W) and the batch (sequences). Parametric: steps of 1e-3 of the training
        range; tree models (piecewise constant) use a smoothing step of 10 % of the range."""
        scalar = np.ndim(power_cap_w) == 0 and np.ndim(max_batch) == 0
        cap, b, p, o = self._inputs(power_cap_w, max_batch, prompt_tokens, output_tokens)
        self._check_range({"power_cap_w": cap, "max_batch": b})
        frac = 1e-3 if self.kind == "parametric" else 0.1
        (clo, chi) = self.training_ranges["power_cap_w"]
        (blo, bhi) = self.training_ranges["max_batch"]
        hc = frac * max(chi - clo, 1.0)
        hb = frac * max(bhi - blo, 1.0)
        b_lo = np.maximum(b - hb, 1e-6)
        c_lo = np.maximum(cap - hc, 1e-6)
        tc1, pc1, _ = self._raw_predict(cap + hc, b, p, o)
        tc0, pc0, _ = self._raw_predict(c_lo, b, p, o)
        tb1, pb1, _ = self._raw_predict(cap, b + hb, p, o)
        tb0, pb0, _ = self._raw_predict(cap, b_lo, p, o)
        dc = cap + hc - c_lo
        db = b + hb - b_lo
        vals = dict(dthroughput_dcap=(tc1 - tc0) / dc, dthroughput_dbatch=(tb1 - tb0) / db,
                    dpower_dcap=(pc1 - pc0) / dc, dpower_dbatch=(pb1 - pb0) / db)
        if scalar:
            vals = {k: float(v) for k, v in vals.items()}
        return Gradients(**vals)

    # ---------------------------------------------------------------------------- save/load
    def to_dict(self) -> dict[str, Any]:
        """The model as a JSON-serialisable dict (what `save` writes; `from_dict` reads it)."""

        def clean(d):
            return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in d.items()}
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "num_gpus": self.num_gpus,
            "features": list(self.features),
            "training_ranges": {k: list(v) for k, v in self.training_ranges.items()},
            "cv_mape": clean(self.cv_mape),
            "fit_mape": clean(self.fit_mape),
            "n_points": self.n_points,
            "plant": self.plant,
            "workload": clean(self.workload),
            "params": self._backend.to_json(),
        }

    def save(self, path: str | Path) -> None:
        """Write the model as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PowerPerfModel":
        """Read a model file; `ModelFileError` (naming the file and field) when it is not a
        valid model of a known schema version."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelFileError(f"{path}: model file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{path}: not a JSON model file ({exc})") from None
        try:
            return cls.from_dict(data)
        except ModelFileError as exc:
            raise ModelFileError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Any) -> "PowerPerfModel":
        """Rebuild a model from `to_dict`'s output (`ModelFileError` naming a bad field)."""
        if not isinstance(data, Mapping):
            raise ModelFileError("model file must hold a JSON object")
        if "schema_version" not in data:
            raise ModelFileError("missing field 'schema_version'")
        if data["schema_version"] != SCHEMA_VERSION:
            raise ModelFileError(f"field 'schema_version': unknown version "
                                 f"{data['schema_version']!r} (this palsctl reads "
                                 f"{SCHEMA_VERSION})")
        for key in ("kind", "num_gpus", "features", "training_ranges", "cv_mape", "plant",
                    "workload", "params", "n_points"):
            if key not in data:
                raise ModelFileError(f"missing field {key!r}")
        kind = data["kind"]
        if kind not in KINDS:
            raise ModelFileError(f"field 'kind': unknown kind {kind!r}; known: {', '.join(KINDS)}")
        num_gpus = data["num_gpus"]
        if not isinstance(num_gpus, int) or isinstance(num_gpus, bool) or num_gpus < 1:
            raise ModelFileError(f"field 'num_gpus' must be a positive integer, got {num_gpus!r}")
        features = data["features"]
        if (not isinstance(features, list)
                or features[:2] != list(BASE_FEATURES)
                or any(f not in BASE_FEATURES + WORKLOAD_FEATURES for f in features)):
            raise ModelFileError(f"field 'features' is malformed: {features!r}")
        ranges = data["training_ranges"]
        if not isinstance(ranges, Mapping):
            raise ModelFileError("field 'training_ranges' must be an object")
        clean_ranges = {}
        for f in list(features) + [w for w in WORKLOAD_FEATURES
                                   if w not in features and w in ranges]:
            r = ranges.get(f)
            if (not isinstance(r, list) or len(r) != 2
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in r)
                    or r[0] > r[1]):
                raise ModelFileError(f"field 'training_ranges.{f}' must be [min, max], got {r!r}")
            clean_ranges[f] = (float(r[0]), float(r[1]))
        for key in ("cv_mape", "workload", "plant"):
            if not isinstance(data[key], Mapping):
                raise ModelFileError(f"field {key!r} must be an object")

        def nums(d, key):
            out = {}
            for k, v in d.items():
                if v is None:
                    v = math.nan
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise ModelFileError(f"field '{key}.{k}' must be a number, got {v!r}")
                out[k] = float(v)
            return out

        workload = nums(data["workload"], "workload")
        cv = nums(data["cv_mape"], "cv_mape")
        fit_mape = nums(data.get("fit_mape") or {}, "fit_mape")
        if kind == "parametric":
            backend = _Parametric.from_json(data["params"], num_gpus=num_gpus,
                                            workload_ref=workload)
        else:
            backend = _Trees.from_json(kind, data["params"], features, workload)
        return cls(kind=kind, backend=backend, num_gpus=num_gpus, features=features,
                   training_ranges=clean_ranges, cv_mape=cv, fit_mape=fit_mape,
                   plant=dict(data["plant"]), workload=workload, n_points=int(data["n_points"]))
