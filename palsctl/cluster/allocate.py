"""Splitting a site power budget among replicas: pure functions, no Ray, no I/O, no clock.

`allocate(replicas, budget_w, policy=..., reserve_w=...)` returns one share (watts, total over
the replica's GPUs) per replica. Every policy keeps each share within the replica's
``[min_w, max_w]`` and the shares' sum at or below ``budget_w - reserve_w`` (when even the
floors do not fit, the floors are scaled down and the allocation says it is infeasible).

Policies:

``equal``
    one level for all, clipped to each replica's bounds (water-filling of equal shares);
``proportional``
    shares proportional to each replica's demand, expressed as the power it needs to serve it
    (``need_w``, see below; demands of different models are not comparable in tokens/s),
    clipped to the bounds;
``marginal``
    from each replica's power-performance `Envelope` — the concave envelope of generated
    tokens/s against power over (cap, batch) — water-filled so that the marginal tokens/s per
    watt are equal among replicas strictly inside their bounds. Watts first go to the power
    each replica needs to serve its demand within its SLOs (``need_w``: tokens/s beyond the
    demand are worth nothing), at the best marginal gain first; once every need is met, the
    rest is water-filled on the envelopes above the needs (headroom for bursts, where it buys
    the most tokens/s), and what no envelope can use is spread up to ``max_w``.

For every policy the shares are non-decreasing in the budget. ``marginal`` maximises the
modelled tokens/s served, ``Σ min(X_i(share_i), demand_i)``, over all allocations with the
same bounds (a greedy fill of concave pieces), so it is never below ``equal`` in that measure.

>>> env = Envelope(power_w=(400.0, 800.0, 1600.0), throughput_tok_s=(1000.0, 3000.0, 4000.0))
>>> r = [Replica(name="a", min_w=400, max_w=1600, envelope=env, demand_tok_s=2000.0),
...      Replica(name="b", min_w=400, max_w=1600, envelope=env, demand_tok_s=3500.0)]
>>> allocate(r, 2000.0, policy="marginal").shares_w
(600.0, 1400.0)
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Envelope", "Replica", "Allocation", "POLICIES", "allocate", "envelope_from_model",
           "served_tok_s"]

POLICIES = ("equal", "proportional", "marginal")
_EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """A concave, non-decreasing piecewise-linear curve of tokens/s against a replica's power.

    Below the first breakpoint the curve holds its first value; above the last, its last. Build
    one with `envelope_from_model` or `Envelope.hull` (the upper concave hull of any points).

    Parameters
    ----------
    power_w : tuple of float
        Breakpoints: the replica's total power (all its GPUs), strictly increasing, W.
    throughput_tok_s : tuple of float
        Generated tokens per second at each breakpoint, tok/s.
    """

    power_w: tuple[float, ...]
    throughput_tok_s: tuple[float, ...]
    _p: np.ndarray = field(init=False, repr=False, compare=False)
    _x: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        p = np.asarray(self.power_w, dtype=float)
        x = np.asarray(self.throughput_tok_s, dtype=float)
        if p.ndim != 1 or p.size < 1 or p.shape != x.shape:
            raise ValueError("an envelope needs matching, non-empty power_w and throughput_tok_s")
        if not (np.isfinite(p).all() and np.isfinite(x).all()) or (p < 0).any() or (x < 0).any():
            raise ValueError("envelope points must be finite and non-negative")
        if (np.diff(p) <= 0).any():
            raise ValueError("envelope power_w must increase strictly")
        s = np.diff(x) / np.diff(p)
        tol = 1e-9 * max(1.0, float(np.abs(s).max(initial=0)))
        if (s < -1e-9).any() or (np.diff(s) > tol).any():
            raise ValueError("envelope must be non-decreasing and concave (use Envelope.hull)")
        object.__setattr__(self, "_p", p)
        object.__setattr__(self, "_x", x)

    @classmethod
    def hull(cls, power_w: Any, throughput_tok_s: Any) -> "Envelope":
        """The upper concave, non-decreasing envelope of points (any order): from the
        lowest-power point to the highest-throughput one."""
        p = np.asarray(power_w, dtype=float).ravel()
        x = np.asarray(throughput_tok_s, dtype=float).ravel()
        ok = np.isfinite(p) & np.isfinite(x) & (p >= 0) & (x >= 0)
        p, x = p[ok], x[ok]
        if p.size == 0:
            raise ValueError("no finite points to build an envelope from")
        order = np.lexsort((-x, p))
        p, x = p[order], x[order]
        # keep the best throughput at each power and stop at the highest throughput
        keep_p: list[float] = []
        keep_x: list[float] = []
        for pi, xi in zip(p.tolist(), x.tolist()):
            if keep_p and pi == keep_p[-1]:
                continue
            if keep_x and xi <= keep_x[-1]:
                continue   # dominated: more power for no more tokens
            keep_p.append(pi)
            keep_x.append(xi)
        # upper hull (monotone chain)
        hp: list[float] = []
        hx: list[float] = []
        for pi, xi in zip(keep_p, keep_x):
            while len(hp) >= 2 and ((hx[-1] - hx[-2]) * (pi - hp[-2])
                                    <= (xi - hx[-2]) * (hp[-1] - hp[-2])):
                hp.pop()
                hx.pop()
            hp.append(pi)
            hx.append(xi)
        return cls(power_w=tuple(hp), throughput_tok_s=tuple(hx))

    def _lists(self) -> tuple[list[float], list[float]]:
        cached = self.__dict__.get("_as_lists")
        if cached is None:
            cached = (self._p.tolist(), self._x.tolist())
            object.__setattr__(self, "_as_lists", cached)
        return cached

    def __call__(self, power_w: Any) -> Any:
        """Tokens/s at ``power_w`` (scalar or array)."""
        return np.interp(power_w, self._p, self._x)

    def power_for(self, throughput_tok_s: float) -> float:
        """The least power whose tokens/s reach ``throughput_tok_s`` (the last breakpoint's
        power when the curve never reaches it; the first's when it starts above it)."""
        p, x = self._p, self._x
        if throughput_tok_s <= x[0]:
            return float(p[0])
        if throughput_tok_s >= x[-1]:
            return float(p[-1])
        i = int(np.searchsorted(x, throughput_tok_s, side="left"))
        x0, x1, p0, p1 = x[i - 1], x[i], p[i - 1], p[i]
        return float(p0 + (p1 - p0) * (throughput_tok_s - x0) / (x1 - x0)) if x1 > x0 else float(p0)

    def slopes(self, power_w: float) -> tuple[float, float]:
        """(left, right) derivatives, tokens/s per watt, at ``power_w``."""
        p, x = self._p, self._x
        s = np.concatenate([[0.0], np.diff(x) / np.diff(p), [0.0]]) if p.size > 1 \
            else np.zeros(2)
        tol = 1e-6   # watts: shares are rounded to stay within the budget
        il = int(np.searchsorted(p, power_w - tol, side="left"))
        ir = int(np.searchsorted(p, power_w + tol, side="right"))
        left = math.inf if power_w < p[0] - tol else float(s[il])
        return left, float(s[ir])

    def scaled(self, throughput_factor: float = 1.0, power_factor: float = 1.0) -> "Envelope":
        """The same curve with tokens/s and watts multiplied by the factors (online
        corrections from what a replica measured)."""
        return Envelope(power_w=tuple((self._p * power_factor).tolist()),
                        throughput_tok_s=tuple((self._x * throughput_factor).tolist()))


@dataclass(frozen=True, kw_only=True)
class Replica:
    """What the allocator knows of one replica.

    Parameters
    ----------
    name : str
        The replica's name.
    min_w, max_w : float
        The lowest share it can hold (its GPUs at their minimum cap) and the most it can use (at
        their maximum cap), W over its GPUs.
    envelope : Envelope or None
        Its power-performance envelope (required by ``marginal``).
    demand_tok_s : float or None
        The generated tokens/s it is asked to serve, tok/s (None: unknown, as much as possible).
    """

    name: str
    min_w: float
    max_w: float
    envelope: Envelope | None = None
    demand_tok_s: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_w) and math.isfinite(self.max_w)
                and 0 <= self.min_w <= self.max_w):
            raise ValueError(f"replica {self.name!r}: need 0 <= min_w <= max_w, got "
                             f"{self.min_w}, {self.max_w}")
        if self.demand_tok_s is not None and not (self.demand_tok_s >= 0
                                                  and math.isfinite(self.demand_tok_s)):
            raise ValueError(f"replica {self.name!r}: demand_tok_s must be >= 0, got "
                             f"{self.demand_tok_s}")

    def need_w(self) -> float:
        """Power needed to serve the demand (``max_w`` when unknown, or when no envelope)."""
        if self.envelope is None or self.demand_tok_s is None:
            return self.max_w
        return min(max(self.envelope.power_for(self.demand_tok_s), self.min_w), self.max_w)


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """The result of `allocate`.

    Parameters
    ----------
    shares_w : tuple of float
        The replicas' shares in their order, W (all of a replica's GPUs).
    policy : str
        The policy that split the budget.
    budget_w, reserve_w : float
        The site budget and the part held back, W.
    needs_w : tuple of float
        Power each replica needs for its demand, W.
    marginal_tok_s_per_w : float or None
        The common marginal gain λ of ``marginal``, tok/s per W (None for the other policies).
    feasible : bool
        False when the replicas' floors alone exceed the budget.
    """

    shares_w: tuple[float, ...]
    policy: str
    budget_w: float
    reserve_w: float
    needs_w: tuple[float, ...]
    marginal_tok_s_per_w: float | None
    feasible: bool

    @property
    def total_w(self) -> float:
        """Sum of the shares, W."""
        return float(sum(self.shares_w))


def _interp(P: list[float], X: list[float], q: float) -> float:
    """``np.interp`` for one point on short lists."""
    if q <= P[0]:
        return X[0]
    if q >= P[-1]:
        return X[-1]
    j = bisect.bisect_right(P, q)
    p0, p1 = P[j - 1], P[j]
    return X[j - 1] + (X[j] - X[j - 1]) * (q - p0) / (p1 - p0)


def served_tok_s(replicas: Sequence[Replica], shares_w: Sequence[float]) -> float:
    """Model the tokens/s a split serves: ``Σ min(envelope_i(share_i), demand_i)``.

    Parameters
    ----------
    replicas : sequence of Replica
        The replicas (with envelopes).
    shares_w : sequence of float
        Their shares, W.

    Returns
    -------
    float
        Tokens per second served, tok/s.
    """
    total = 0.0
    for r, s in zip(replicas, shares_w):
        if r.envelope is None:
            continue
        x = float(r.envelope(s))
        total += x if r.demand_tok_s is None else min(x, r.demand_tok_s)
    return total


def _level_fill(lo: np.ndarray, hi: np.ndarray, weight: np.ndarray, avail: float) -> np.ndarray:
    """Σ clip(t·weight, lo, hi) = avail for the largest such t (bisection; the sum stays at or
    below avail). ``avail`` lies in [Σlo, Σhi]."""
    if avail >= hi.sum():
        return hi.copy()
    w = np.maximum(weight, 0.0)
    if not (w > 0).any():
        w = np.ones_like(w)
    t_lo, t_hi = 0.0, float(np.max(np.where(w > 0, hi / np.where(w > 0, w, 1.0), 0.0))) + 1.0
    for _ in range(100):
        mid = 0.5 * (t_lo + t_hi)
        if np.clip(mid * w, lo, hi).sum() <= avail:
            t_lo = mid
        else:
            t_hi = mid
        if t_hi - t_lo <= 1e-12 * max(t_hi, 1.0):
            break
    out = np.clip(t_lo * w, lo, hi)
    # hand out the bisection's last crumbs without crossing avail
    gap = avail - out.sum()
    room = hi - out
    if gap > 0 and room.sum() > 0:
        out = out + room * min(1.0, gap / room.sum()) * (1 - 1e-12)
    return out


def _marginal(reps: Sequence[Replica], lo: np.ndarray, hi: np.ndarray, needs: np.ndarray,
              avail: float) -> tuple[np.ndarray, float | None]:
    """Greedy fill of concave pieces (phase 0: up to the need; 1: envelope above the need;
    2: flat headroom up to max_w), best gain first within a phase."""
    # plain Python per replica (a dozen breakpoints each), numpy for the global order
    owner: list[int] = []
    length: list[float] = []
    slope: list[float] = []
    phase: list[int] = []
    for i, r in enumerate(reps):
        env = r.envelope
        if env is None:
            raise ValueError(f"policy 'marginal' needs an envelope for replica {r.name!r}")
        a, b, n = float(lo[i]), float(hi[i]), float(needs[i])
        P, X = env._lists()
        cuts = [a] + [q for q in P if a + _EPS < q < b - _EPS] + [b]
        if a + _EPS < n < b - _EPS and all(abs(n - q) > _EPS for q in cuts):
            bisect.insort(cuts, n)
        xs = [_interp(P, X, c) for c in cuts]
        for j in range(len(cuts) - 1):
            seg = cuts[j + 1] - cuts[j]
            if seg <= 0:
                continue
            gain = (xs[j + 1] - xs[j]) / seg
            owner.append(i)
            length.append(seg)
            slope.append(gain)
            phase.append(0 if cuts[j + 1] <= n + _EPS else (1 if gain > _EPS else 2))
    out = lo.copy()
    if not owner:
        return out, None
    own = np.array(owner)
    ln = np.array(length)
    sl = np.array(slope)
    ph = np.array(phase)
    order = np.lexsort((own, -sl, ph))   # phase, then best gain, then replica index
    own, ln, sl, ph = own[order], ln[order], sl[order], ph[order]
    cum = np.cumsum(ln)
    full = cum <= avail + 1e-9
    np.add.at(out, own[full], ln[full])
    lam = None
    k = int(full.sum())
    if k < ln.size:
        part = avail - (cum[k - 1] if k else 0.0)
        if part > 0:
            out[own[k]] += part
        lam = float(sl[k]) if ph[k] < 2 else 0.0
    elif k:
        lam = 0.0
    return np.minimum(out, hi), lam


def allocate(replicas: Sequence[Replica], budget_w: float, *, policy: str = "marginal",
             reserve_w: float = 0.0) -> Allocation:
    """Split a site's power budget among replicas (the policies: see the module doc).

    Parameters
    ----------
    replicas : sequence of Replica
        The replicas.
    budget_w : float
        The site budget, W.
    policy : {"marginal", "proportional", "equal"}
        How to split it.
    reserve_w : float, default 0.0
        Watts held back from the split, W.

    Returns
    -------
    Allocation
        The shares and how they were found.

    Raises
    ------
    ValueError
        For an unknown policy, a negative or non-finite budget or reserve, and for ``marginal``
        when a replica has no envelope.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown allocation policy {policy!r}; known: {', '.join(POLICIES)}")
    if not (math.isfinite(budget_w) and budget_w >= 0):
        raise ValueError(f"budget_w must be a finite number >= 0, got {budget_w!r}")
    if not (math.isfinite(reserve_w) and reserve_w >= 0):
        raise ValueError(f"reserve_w must be a finite number >= 0, got {reserve_w!r}")
    n = len(replicas)
    needs = np.array([r.need_w() for r in replicas], dtype=float)
    if n == 0:
        return Allocation(shares_w=(), policy=policy, budget_w=budget_w, reserve_w=reserve_w,
                          needs_w=(), marginal_tok_s_per_w=None, feasible=True)
    lo = np.array([r.min_w for r in replicas], dtype=float)
    hi = np.array([r.max_w for r in replicas], dtype=float)
    avail = max(0.0, budget_w - reserve_w)
    lam = None
    if lo.sum() > avail:
        scale = avail / lo.sum() if lo.sum() > 0 else 0.0
        shares = lo * scale
        feasible = False
    else:
        feasible = True
        if policy == "equal":
            shares = _level_fill(lo, hi, np.ones(n), avail)
        elif policy == "proportional":
            shares = _level_fill(lo, hi, needs, avail)
        else:
            shares, lam = _marginal(replicas, lo, hi, needs, avail - lo.sum())
    total = shares.sum()
    if total > avail and total > 0:   # rounding: never hand out more than the budget
        shares = shares * (avail / total) * (1 - 1e-12)
    return Allocation(shares_w=tuple(float(s) for s in shares), policy=policy,
                      budget_w=float(budget_w), reserve_w=float(reserve_w),
                      needs_w=tuple(float(x) for x in needs), marginal_tok_s_per_w=lam,
                      feasible=feasible)


def envelope_from_model(model: Any, *, num_gpus: int, power_cap_min_w: float,
                        power_cap_max_w: float, max_batch: int,
                        prompt_tokens: float | None = None, output_tokens: float | None = None,
                        tpot_slo_s: float | None = None, caps: int = 13) -> Envelope:
    """Build the concave envelope of a model's predicted tokens/s against its predicted power.

    The grid is per-GPU caps × batches (powers of two up to ``max_batch``); only configurations
    whose predicted p90 inter-token latency meets ``tpot_slo_s`` are kept (all of them when none
    does).

    Parameters
    ----------
    model : PowerPerfModel
        The replica's offline model.
    num_gpus : int
        GPUs of the replica.
    power_cap_min_w, power_cap_max_w : float
        Range of the per-GPU caps, W.
    max_batch : int
        Largest batch limit.
    prompt_tokens, output_tokens : float or None
        Workload lengths for the prediction, tokens (None: the model's reference).
    tpot_slo_s : float or None
        p90 time-per-output-token objective, s (None: none).
    caps : int, default 13
        Caps in the grid.

    Returns
    -------
    Envelope
        Tokens/s against the replica's total power.
    """
    import warnings

    cap_grid = np.linspace(power_cap_min_w, power_cap_max_w, max(2, int(caps)))
    b = [1]
    while b[-1] * 2 < max_batch:
        b.append(b[-1] * 2)
    if b[-1] != max_batch:
        b.append(int(max_batch))
    (lo, hi) = model.training_ranges.get("max_batch", (1.0, float(max_batch)))
    batches = np.array([x for x in b if lo <= x <= hi] or b, dtype=float)
    cap_m, b_m = np.meshgrid(cap_grid, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = model.predict(power_cap_w=cap_m.ravel(), max_batch=b_m.ravel(),
                             prompt_tokens=prompt_tokens, output_tokens=output_tokens)
    x = np.asarray(pred.throughput_tok_s, dtype=float)
    p = np.asarray(pred.power_w, dtype=float)
    # the firmware cannot draw more than the caps allow, whatever the model says
    p = np.minimum(p, cap_m.ravel() * num_gpus)
    ok = np.isfinite(x) & np.isfinite(p)
    if tpot_slo_s is not None:
        itl = np.asarray(pred.itl_p90_s, dtype=float)
        meets = ok & (~np.isfinite(itl) | (itl <= tpot_slo_s))
        if meets.any():
            ok = meets
    return Envelope.hull(p[ok], x[ok])
