"""Shared pieces of the model-based controllers (`search`, `mpc`, `oracle`): the candidate grid,
the online residual correction, the effective throughput requirement and the constrained ranking.

All functions are pure (numpy in, numpy out); nothing here reads a clock or does I/O.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np

from palsctl.errors import ConfigError
from palsctl.types import SETPOINT_FIELDS, Limits, Measurement, Setpoint

__all__ = ["Choice", "Grid", "Residuals", "batch_values", "cap_values", "capacity_estimate",
           "check_int", "check_number", "effective_batch", "is_saturated", "model_grid", "rank",
           "rank_throughput_first", "required_throughput", "setpoint_changed"]

# -- config validation helpers ---------------------------------------------------------------


def check_number(value: Any, key: str, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, allow_none: bool = False) -> None:
    """Raise `ConfigError` naming ``controller.<key>`` unless ``value`` is a finite number in
    range (``lo < value`` when ``lo_open``, else ``lo <= value``; ``value <= hi``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError("must be a finite number", key=f"controller.{key}", value=value)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"must be {'>' if lo_open else '>='} {lo}", key=f"controller.{key}",
                          value=value)
    if hi is not None and value > hi:
        raise ConfigError(f"must be <= {hi}", key=f"controller.{key}", value=value)


def check_int(value: Any, key: str, *, lo: int = 1, allow_none: bool = False) -> None:
    """Raise `ConfigError` (key ``controller.<key>``) unless ``value`` is an integer >= ``lo``
    (or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"must be an integer >= {lo}", key=f"controller.{key}", value=value)


# -- candidate grid --------------------------------------------------------------------------


def batch_values(lo: int, hi: int) -> np.ndarray:
    """Batch limits considered by the grid controllers: every value up to 16, then steps that
    grow with the batch (2 to 32, 4 to 64, 8 to 128, 16 beyond), always including ``hi``."""
    vals: list[int] = []
    b = max(1, int(lo))
    while b <= hi:
        vals.append(b)
        b += 1 if b < 16 else 2 if b < 32 else 4 if b < 64 else 8 if b < 128 else 16
    if not vals or vals[-1] != hi:
        vals.append(int(hi))
    return np.asarray(sorted(set(vals)), dtype=float)


def cap_values(limits: Limits, step_w: float) -> np.ndarray:
    """Per-GPU caps from the minimum to the maximum limit, every ``step_w`` watts (at least the
    plant's cap step), always including both ends and the default limit."""
    step = max(step_w, limits.power_cap_step_w)
    n = int(math.floor((limits.power_cap_max_w - limits.power_cap_min_w) / step + 1e-9))
    caps = [limits.clamp_cap_w(limits.power_cap_min_w + i * step) for i in range(n + 1)]
    caps += [limits.power_cap_max_w, limits.clamp_cap_w(limits.power_cap_default_w)]
    return np.asarray(sorted(set(caps)), dtype=float)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grid:
    """Flattened (cap, batch) candidates with their *uncorrected* predictions (totals over the
    plant's GPUs): ``throughput_tok_s``, ``power_w``, ``itl_p90_s`` (NaN when unknown).
    Row-major over ``shape = (caps, batches)``: index = cap_index × batches + batch_index."""

    cap_w: np.ndarray
    batch: np.ndarray
    throughput_tok_s: np.ndarray
    power_w: np.ndarray
    itl_p90_s: np.ndarray
    shape: tuple[int, int]

    def __len__(self) -> int:
        return int(self.cap_w.size)

    def index_of(self, cap_w: float | None, batch: int | float | None) -> int:
        """Index of the grid point nearest to (cap, batch): relative cap distance plus log-batch
        distance (an axis given as None is ignored)."""
        d = np.zeros(len(self))
        if cap_w is not None:
            d += np.abs(self.cap_w - cap_w) / max(float(self.cap_w.max()), 1.0)
        if batch is not None:
            d += np.abs(np.log(self.batch) - math.log(max(float(batch), 1.0)))
        return int(np.argmin(d))


    def interp(self, cap_w: float, batch: float) -> tuple[float, float, float]:
        """(throughput, power, p90 ITL) at one configuration, bilinear in (cap, log batch)
        between grid points (clamped to the grid): a few microseconds, no model call."""
        nc, nb = self.shape
        caps = self.cap_w[::nb]
        lb = np.log(self.batch[:nb])
        x, y = float(cap_w), math.log(max(float(batch), 1e-9))
        i = min(max(int(np.searchsorted(caps, x)) - 1, 0), nc - 2) if nc > 1 else 0
        j = min(max(int(np.searchsorted(lb, y)) - 1, 0), nb - 2) if nb > 1 else 0
        fx = 0.0 if nc == 1 else min(max((x - caps[i]) / (caps[i + 1] - caps[i]), 0.0), 1.0)
        fy = 0.0 if nb == 1 else min(max((y - lb[j]) / (lb[j + 1] - lb[j]), 0.0), 1.0)
        out = []
        for arr in (self.throughput_tok_s, self.power_w, self.itl_p90_s):
            a = arr.reshape(nc, nb)
            i1, j1 = min(i + 1, nc - 1), min(j + 1, nb - 1)
            v = ((1 - fx) * (1 - fy) * a[i, j] + fx * (1 - fy) * a[i1, j]
                 + (1 - fx) * fy * a[i, j1] + fx * fy * a[i1, j1])
            out.append(float(v))
        return out[0], out[1], out[2]


def _field(pred: Any, name: str, n: int) -> np.ndarray:
    v = getattr(pred, name, None)
    if v is None:
        return np.full(n, np.nan)
    return np.broadcast_to(np.asarray(v, dtype=float), (n,)).copy()


def model_grid(model: Any, limits: Limits, *, cap_step_w: float,
               max_batch: int | None = None) -> Grid:
    """Predict every (cap, batch) candidate with an offline model in one vectorised call.
    Warnings about extrapolating beyond the model's training ranges are silenced here: the grid
    deliberately spans the plant's whole limits."""
    caps = cap_values(limits, cap_step_w)
    hi = limits.max_batch_max if max_batch is None else min(max_batch, limits.max_batch_max)
    batches = batch_values(limits.max_batch_min, max(hi, limits.max_batch_min))
    cc, bb = np.meshgrid(caps, batches, indexing="ij")
    cc, bb = cc.ravel(), bb.ravel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = model.predict(power_cap_w=cc, max_batch=bb)
    n = cc.size
    return Grid(cap_w=cc, batch=bb, throughput_tok_s=_field(pred, "throughput_tok_s", n),
                power_w=_field(pred, "power_w", n), itl_p90_s=_field(pred, "itl_p90_s", n),
                shape=(caps.size, batches.size))


# -- online residual correction --------------------------------------------------------------


def is_saturated(m: Measurement, batch_in_force: float | None) -> bool:
    """True when the measured throughput reflects the configuration's capacity rather than the
    offered load: requests are waiting, or the running count is at the batch limit."""
    if m.waiting > 0:
        return True
    return batch_in_force is not None and m.running >= max(1.0, 0.95 * batch_in_force)


def capacity_estimate(m: Measurement, batch_in_force: float | None) -> float:
    """Generated tokens/s the configuration in force could deliver, from one measurement: the
    measured throughput when saturated, else ``throughput × batch / running`` (free batch slots
    mean spare capacity; optimistic since time per token grows with the batch), clipped to
    ``[y, 4 y]`` (4 y when nothing runs)."""
    y = m.throughput_tok_s
    if is_saturated(m, batch_in_force):
        return y
    if m.running <= 0 or batch_in_force is None:
        return 4 * y
    return min(max(y * batch_in_force / m.running, y), 4 * y)


def effective_batch(m: Measurement, batch_in_force: float | None) -> float:
    """The batch the plant actually runs: the batch limit when saturated, else the running
    count. The offline model predicts the saturated steady state for a batch limit, which is the
    operating point of a plant running that many sequences — so comparing the measurement with
    the prediction at the *effective* batch gives a residual at every step, not only under
    saturation."""
    if batch_in_force is None:
        return float(max(m.running, 1))
    if is_saturated(m, batch_in_force):
        return float(batch_in_force)
    return float(min(max(m.running, 1), batch_in_force))


class Residuals:
    """EWMA of the measured/predicted ratio per output (throughput, power, p90 ITL), clipped to
    ``[1/bound, bound]``. The prediction compared is the model's at the cap in force and the
    *effective* batch (`effective_batch`). Nothing is learned from a window where nothing ran."""

    def __init__(self, alpha: float, bound: float) -> None:
        self.alpha, self.bound = alpha, bound
        self.reset()

    def reset(self) -> None:
        """Forget the corrections (every ratio back to 1)."""
        self.throughput = 1.0
        self.power = 1.0
        self.itl = 1.0

    def _mix(self, old: float, measured: float | None, predicted: float) -> float:
        if measured is None or not math.isfinite(measured) or not math.isfinite(predicted) \
                or predicted <= 0 or measured <= 0:
            return old
        ratio = min(max(measured / predicted, 1.0 / self.bound), self.bound)
        return (1 - self.alpha) * old + self.alpha * ratio

    def update(self, m: Measurement, predicted: tuple[float, float, float]) -> None:
        """``predicted``: (throughput, power, p90 ITL) at the cap in force and effective batch."""
        if m.running <= 0 or m.throughput_tok_s <= 0:
            return
        thr_p, pw_p, itl_p = predicted
        self.throughput = self._mix(self.throughput, m.throughput_tok_s, thr_p)
        self.power = self._mix(self.power, m.power_w, pw_p)
        self.itl = self._mix(self.itl, m.tpot_p90_s, itl_p)

    def as_dict(self) -> dict[str, float]:
        """The corrections as diagnostics (``residual_throughput``, ``_power``, ``_itl``)."""
        return {"residual_throughput": self.throughput, "residual_power": self.power,
                "residual_itl": self.itl}


# -- the throughput requirement ---------------------------------------------------------------


def required_throughput(m: Measurement, sp: Setpoint, *, margin: float, drain_s: float,
                        output_tokens_mean: float | None) -> float | None:
    """Generated tokens/s the configuration must be able to sustain: the target (or, without
    one, the measured demand) × (1 + margin), plus what drains the waiting queue in ``drain_s``
    (at most half the target; only when the measured demand does not exceed the target).
    None when neither a target nor a demand is known (then the fastest configuration that fits
    the budget and the latency objective is chosen). ``margin=0`` gives the expected operating
    throughput."""
    base = sp.throughput_tok_s if sp.throughput_tok_s is not None else m.demand_tok_s
    if base is None or not math.isfinite(base):
        return None
    base = max(base, 0.0)
    req = base * (1.0 + margin)
    # drain the queue only when it can be drained: the offered load is not above the target
    # (under a saturating load the target, not the queue, is what the operator asked for)
    drainable = m.demand_tok_s is None or m.demand_tok_s <= base * (1.0 + max(margin, 0.05))
    if m.waiting > 0 and output_tokens_mean and drain_s > 0 and drainable:
        req += min(m.waiting * output_tokens_mean / drain_s, 0.5 * base)
    return req


@dataclasses.dataclass(frozen=True, kw_only=True)
class Choice:
    """The outcome of ranking: ``index`` into the grid, which constraints were relaxed
    (``mode``: ``ok``, ``relaxed_latency``, ``relaxed_throughput``, ``relaxed_budget``), the
    candidates acceptable in that mode and their scores (higher is better; -inf unacceptable),
    and ``operating_index``: the candidate (same cap) whose batch just meets the requirement —
    the predicted operating point."""

    index: int
    mode: str
    feasible: np.ndarray
    score: np.ndarray
    operating_index: int | None = None


def rank(grid_cap_w: np.ndarray, thr: np.ndarray, power: np.ndarray, itl: np.ndarray, *,
         shape: tuple[int, int], num_gpus: int, required_tok_s: float | None,
         budget_w: float | None, tpot_slo_s: float | None,
         operating_tok_s: float | None = None, batch_headroom: float = 0.0,
         batch_values: np.ndarray | None = None) -> Choice:
    """Choose a (cap, batch limit) from predicted saturated steady states on a cap × batch grid
    (row-major ``shape = (caps, batches)``, batches increasing along a row).

    A plant delivering ``operating`` tokens/s (default: ``required``) at cap c runs about b*(c)
    sequences — the smallest batch whose saturated throughput reaches it — and draws
    power(c, b*(c)): that operating point, not the saturated one at the batch limit, is what the
    energy bill pays. So each cap is scored by its *operating* tokens/J,
    ``operating / power(c, b*(c))``; every batch limit of that cap whose capacity meets the
    (larger) requirement, the latency objective and the budget gets that score. The best cap
    wins, with the smallest such batch limit raised by ``batch_headroom`` (a fraction of that
    batch, capped by the acceptable ones; ``inf``: the largest acceptable batch — what `search`
    does by default, since free batch slots absorb bursts at no energy cost in steady state,
    whereas under a saturating load the plant runs at its limit and a tight limit bounds the
    energy). Without a requirement the fastest candidate is chosen.

    Constraints: predicted throughput (capacity at the batch limit) ≥ required, predicted
    power ≤ budget and cap × GPUs ≤ budget, predicted p90 ITL ≤ TPOT objective. **Degradation
    order** when nothing is feasible — the budget is kept first, then throughput, then latency:
    (1) drop the latency objective; (2) drop the throughput requirement and take the fastest
    candidate within the budget (those meeting the latency objective preferred); (3) drop the
    budget and take the lowest-power candidate (the safety guard then clamps the cap)."""
    nc, nb = shape
    ok_budget = np.ones(thr.shape, dtype=bool)
    if budget_w is not None:
        ok_budget = (power <= budget_w) & (grid_cap_w * num_gpus <= budget_w + 1e-6)
    ok_lat = np.ones_like(ok_budget) if tpot_slo_s is None else ~(itl > tpot_slo_s)
    tpj = np.where(power > 0, thr / np.maximum(power, 1e-9), 0.0)

    def fastest(pool: np.ndarray, mode: str) -> Choice:
        score = np.where(pool, thr + 1e-6 * tpj, -np.inf)
        return Choice(index=int(np.argmax(score)), mode=mode, feasible=pool, score=score)

    if required_tok_s is None:
        pool = ok_budget & ok_lat
        if pool.any():
            return fastest(pool, "ok")
    else:
        op_tok_s = required_tok_s if operating_tok_s is None else min(operating_tok_s,
                                                                       required_tok_s)
        meets = thr >= required_tok_s
        reach = (thr >= op_tok_s).reshape(nc, nb)
        for mode, extra in (("ok", ok_lat), ("relaxed_latency", np.ones_like(ok_lat))):
            pool = ok_budget & extra
            feas = (meets & pool).reshape(nc, nb)
            if not feas.any():
                continue
            # b*(c): first batch of each row reaching the operating throughput
            first = np.where(feas.any(axis=1), reach.argmax(axis=1), -1)
            rows = np.nonzero(first >= 0)[0]
            p2 = power.reshape(nc, nb)
            row_score = np.full(nc, -np.inf)
            row_score[rows] = op_tok_s / np.maximum(p2[rows, first[rows]], 1e-9)
            score2 = np.where(feas, row_score[:, None], -np.inf)
            # pick the best row; its batch limit is the smallest that meets the requirement,
            # raised by ``batch_headroom`` (fraction of the batch) within the acceptable ones
            best_row = int(np.argmax(row_score))
            ok_j = np.nonzero(feas[best_row])[0]
            j = int(ok_j.min())
            if batch_headroom > 0 and batch_values is not None:
                want = batch_values[best_row * nb + j] * (1.0 + batch_headroom)
                cand = ok_j[batch_values[best_row * nb + ok_j] <= want + 1e-9]
                j = int(cand.max()) if cand.size else j
            return Choice(index=best_row * nb + j, mode=mode, feasible=feas.ravel(),
                          score=score2.ravel(),
                          operating_index=best_row * nb + int(first[best_row]))
    if ok_budget.any():
        pool = ok_budget & ok_lat if (ok_budget & ok_lat).any() else ok_budget
        return fastest(pool, "relaxed_throughput")
    score = -power
    return Choice(index=int(np.argmax(score)), mode="relaxed_budget",
                  feasible=np.zeros_like(ok_budget), score=score)


def rank_throughput_first(grid_cap_w: np.ndarray, thr: np.ndarray, power: np.ndarray,
                          itl: np.ndarray, *, shape: tuple[int, int], num_gpus: int,
                          required_tok_s: float | None, budget_w: float | None,
                          tpot_slo_s: float | None, operating_tok_s: float | None = None,
                          batch_headroom: float = 0.0,
                          batch_values: np.ndarray | None = None) -> Choice:
    """`rank`, with the relaxed modes changed so that throughput capacity really is kept before
    latency (what `search` uses; `rank`'s own fallbacks stay as they are for its other callers).

    (1) Everything feasible: `rank`'s choice (mode ``ok``). (2) The requirement can be met within
    the budget but not together with the latency objective: among the candidates within the
    budget that meet the requirement, the one with the lowest predicted p90 ITL — latency
    degraded least (``relaxed_latency``; `rank` takes the best tokens/J there, i.e. the lowest
    cap and the largest batch, the worst latency). (3) The requirement cannot be met within the
    budget: the fastest candidate within the budget, latency ignored (``relaxed_throughput``;
    `rank` prefers candidates meeting the latency objective, which under a binding budget
    means a smaller batch limit, less capacity, a growing queue and time-to-first-token
    windows over the SLO). (4) Nothing fits the budget: `rank`'s lowest-power candidate
    (``relaxed_budget``)."""
    first = rank(grid_cap_w, thr, power, itl, shape=shape, num_gpus=num_gpus,
                 required_tok_s=required_tok_s, budget_w=budget_w, tpot_slo_s=tpot_slo_s,
                 operating_tok_s=operating_tok_s, batch_headroom=batch_headroom,
                 batch_values=batch_values)
    if first.mode in ("ok", "relaxed_budget"):
        return first
    ok_budget = np.ones(thr.shape, dtype=bool)
    if budget_w is not None:
        ok_budget = (power <= budget_w) & (grid_cap_w * num_gpus <= budget_w + 1e-6)
    tpj = np.where(power > 0, thr / np.maximum(power, 1e-9), 0.0)
    if first.mode == "relaxed_latency" and required_tok_s is not None:
        pool = ok_budget & (thr >= required_tok_s)
        lat = np.where(np.isfinite(itl), itl, np.inf)
        score = np.where(pool, -lat + 1e-9 * tpj, -np.inf)
        if np.isfinite(score).any():
            return Choice(index=int(np.argmax(score)), mode="relaxed_latency", feasible=pool,
                          score=score)
    score = np.where(ok_budget, thr + 1e-6 * tpj, -np.inf)
    return Choice(index=int(np.argmax(score)), mode="relaxed_throughput", feasible=ok_budget,
                  score=score)


def setpoint_changed(a: Setpoint | None, b: Setpoint, rel_tol: float = 0.01,
                     ignore: tuple[str, ...] = ()) -> bool:
    """True when a setpoint field (target, budget, power target, an SLO) differs by more than
    ``rel_tol`` (relative); the fields named in ``ignore`` do not count."""
    if a is None:
        return True
    for name in SETPOINT_FIELDS:
        if name in ignore:
            continue
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None):
            return True
        if x is not None and abs(x - y) > rel_tol * max(abs(x), abs(y), 1e-12):
            return True
    return False
