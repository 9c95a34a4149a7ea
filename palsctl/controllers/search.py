"""`search` — the PALS method, QoS first: model-guided search over (power cap, batch limit) with
online correction, spending only the slack the SLOs leave on saving energy.

Each control step (the shared half is `palsctl.controllers.model_based.ModelBasedController`):

1. **Corrections.** The offline model's prediction at the cap in force and the *effective*
   batch is compared with the measurement (EWMA residual per output); a measured p90 TPOT close
   to its SLO raises the model's ITL at once and a p90 TTFT close to its SLO raises the
   capacity asked for, both decaying over ``qos_memory_s`` (`palsctl.controllers.qos`).
2. **Demand.** max(operator target, measured arrival rate) plus the rate that drains the waiting
   queue within ``drain_s``; the capacity asked for is that × (1 + ``margin``).
3. **Ranking.** Every (cap, batch) candidate is ranked by corrected predicted *operating*
   tokens/J subject to capacity ≥ required, power and total cap within the budget (less
   ``budget_margin``), p90 ITL ≤ the TPOT objective (`palsctl.controllers.common.rank`);
   when nothing is feasible the budget is kept first, then throughput, then latency
   (`palsctl.controllers.common.rank_throughput_first`).
4. **Moves, QoS first and without thrashing.** The cap goes *up* at once whenever the ranking
   asks for more (a constraint would fail) and to the budget's ceiling when nothing within it is
   feasible. It goes *down* only when the lower cap saves at least ``min_benefit`` of the
   predicted operating power and ``cap_deadband_w``, no request is waiting, no latency came
   close to its SLO for ``dwell_s``, and the last move up is ``dwell_s`` old (or the operator
   just changed the target or an SLO; a moving budget does not count). A raise smaller than
   ``cap_min_raise_w`` is not made while no request waits and no latency came close to its SLO.
   The batch limit is lowered when it is too slow per token at the cap chosen — at once while
   sequences fill the lower limit, else only once the last raise is ``batch_dwell_s`` old — and
   raised only where it binds (`batch_move`): a safe limit that does not bind is left alone, and
   a burst's raise is not taken back the moment the burst drains.
5. **Cap trim.** An integral term on the relative throughput shortfall (averaged over
   ``trim_backlog_s``) while requests have waited for ``trim_backlog_s`` adds
   up to ``trim_max_w`` to the cap (leaks away at ``trim_leak_per_s``; anti-windup at the
   ceiling; reset when the target or an SLO changes).

Vectorised: the grid is predicted once at ``setup``; a step is a handful of numpy operations over
it (well under 1 ms for ~1,500 candidates).
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np
from typing_extensions import override

from palsctl.controllers import common
from palsctl.controllers.model_based import ModelBasedConfig, ModelBasedController, Situation
from palsctl.types import Action

__all__ = ["SearchConfig", "SearchController"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchConfig(ModelBasedConfig):
    """Tunables of `SearchController` (the shared ones are `ModelBasedConfig`'s).

    ``trim_gain_w_per_s``: cap trim integral gain, watts per second per unit relative shortfall;
    ``trim_max_w``: trim bound; ``trim_leak_per_s``: trim decay rate without shortfall;
    ``trim_backlog_s``: how long requests must have been waiting, and the time over which the
    throughput is averaged, before a shortfall counts.
    ``min_benefit``: a voluntary move must cut the predicted operating power by at
    least this fraction. ``cap_deadband_w``: smallest voluntary cap decrease, watts per GPU.
    ``batch_headroom``: the batch limit is the smallest meeting the requirement raised by this
    fraction (None: the largest batch of the chosen cap that meets the latency objective and the
    budget — free slots absorb bursts at no energy cost in steady state).
    """

    trim_gain_w_per_s: float = 60.0
    trim_max_w: float = 100.0
    trim_leak_per_s: float = 0.05
    trim_backlog_s: float = 5.0
    min_benefit: float = 0.02
    cap_deadband_w: float = 10.0
    batch_headroom: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("trim_gain_w_per_s", "trim_max_w", "trim_leak_per_s", "cap_deadband_w",
                     "trim_backlog_s"):
            common.check_number(getattr(self, name), name, lo=0)
        common.check_number(self.min_benefit, "min_benefit", lo=0, hi=1)
        common.check_number(self.batch_headroom, "batch_headroom", lo=0, allow_none=True)


def operating_power_w(s: Situation, row: int) -> float:
    """Predicted power at cap row ``row`` when the plant runs the operating throughput: at the
    smallest batch whose capacity reaches it (the largest batch's power when none does)."""
    nb = s.grid.shape[1]
    thr = s.throughput_tok_s[row * nb:(row + 1) * nb]
    pw = s.power_w[row * nb:(row + 1) * nb]
    op = s.operating_tok_s
    if op is None:
        return float(pw[-1])
    reach = np.nonzero(thr >= op)[0]
    return float(pw[reach[0]] if reach.size else pw[-1])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pick:
    """The ranking's outcome: grid ``index`` of the chosen (cap, batch limit), ``mode`` (``ok``:
    every constraint met; ``ceiling``: not every QoS constraint can be met within the budget, so
    the fastest clock the budget allows), ``feasible_rows`` (caps meeting everything) and the
    chosen row's ``operating_power_w``."""

    index: int
    mode: str
    feasible_rows: int
    operating_power_w: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class RowFeasibility:
    """Per cap row of the grid: ``feasible`` (every QoS constraint met by some batch limit and
    by the operating point), ``limit_ok`` (caps × batches: batch limits meeting capacity,
    steady-state latency and budget), ``op_index`` (batch index of the operating point) and
    ``op_power_w`` (predicted power there)."""

    feasible: np.ndarray
    limit_ok: np.ndarray
    op_index: np.ndarray
    op_power_w: np.ndarray


def row_feasibility(s: Situation, *, required_scale: float = 1.0) -> RowFeasibility:
    """Which caps meet every QoS constraint (see `rank_qos`); ``required_scale`` < 1 loosens the
    capacity requirement (the hysteresis that keeps a configuration in force)."""
    g = s.grid
    nc, nb = g.shape
    thr = s.throughput_tok_s.reshape(nc, nb)
    pw = s.power_w.reshape(nc, nb)
    itl = s.itl_p90_s.reshape(nc, nb)
    caps = g.cap_w[::nb]
    lat_ok = s.itl_ok.reshape(nc, nb)
    bud_ok = pw <= s.budget_w if s.budget_w is not None else np.ones((nc, nb), dtype=bool)
    row_ok = caps <= s.cap_ceiling_w + 1e-6
    req, op = s.required_tok_s, s.operating_tok_s
    cap_ok = thr >= req * required_scale if req is not None else np.ones((nc, nb), dtype=bool)
    limit_ok = lat_ok & bud_ok & cap_ok & row_ok[:, None]
    if op is not None:
        reach = thr >= op
        j_op = np.where(reach.any(axis=1), reach.argmax(axis=1), nb - 1)
    else:
        j_op = np.full(nc, nb - 1)
    rows = np.arange(nc)
    burst_ok = np.ones(nc, dtype=bool)
    if s.tpot_objective_s is not None:
        burst_ok = ~(itl[rows, j_op] * s.itl_factor > s.tpot_objective_s)
    return RowFeasibility(feasible=limit_ok.any(axis=1) & burst_ok, limit_ok=limit_ok,
                          op_index=j_op, op_power_w=pw[rows, j_op])


def rank_qos(s: Situation, *, batch_headroom: float = math.inf) -> Pick:
    """QoS first, then joules: the cap with the best predicted *operating* tokens/J among those
    where (a) some batch limit has capacity ≥ required, steady-state p90 ITL ≤ the objective and
    predicted power ≤ budget, (b) the operating point — the smallest batch reaching the demand —
    meets the objective even with the burst tightening (``itl_factor``), (c) the cap fits the
    budget's ceiling. Its batch limit is the largest meeting (a) (or the smallest raised by
    ``batch_headroom``). When no cap qualifies, the budget's ceiling is taken (the fastest clock
    allowed) with `best_batch`."""
    g = s.grid
    nc, nb = g.shape
    f = row_feasibility(s)
    if f.feasible.any():
        if s.operating_tok_s is None:   # no demand known: the fastest feasible configuration
            thr = s.throughput_tok_s.reshape(nc, nb)
            score = thr.max(axis=1, where=f.limit_ok, initial=0.0)
        else:
            score = s.operating_tok_s / np.maximum(f.op_power_w, 1e-9)
        r = int(np.argmax(np.where(f.feasible, score, -np.inf)))
        ok_j = np.nonzero(f.limit_ok[r])[0]
        j = int(ok_j.max())
        if math.isfinite(batch_headroom):
            want = g.batch[r * nb + int(ok_j.min())] * (1.0 + batch_headroom)
            j = int(ok_j[g.batch[r * nb + ok_j] <= want + 1e-9].max())
        return Pick(index=r * nb + j, mode="ok", feasible_rows=int(f.feasible.sum()),
                    operating_power_w=float(f.op_power_w[r]))
    # nothing meets every QoS constraint within the budget: the fastest clock it allows
    caps = g.cap_w[::nb]
    below = np.nonzero(caps <= s.cap_ceiling_w + 1e-6)[0]
    r = int(below.max()) if below.size else 0
    return Pick(index=r * nb + best_batch(s, r), mode="ceiling", feasible_rows=0,
                operating_power_w=float(f.op_power_w[r]))


def batch_move(s: Situation, b_prev: int, b_star: int, i_prev: int,
               hold: bool = False) -> int:
    """The batch limit to apply: lowered to ``b_star`` (the one wanted at the cap chosen) when
    ``b_prev`` is too slow per token at this cap (``i_prev``: its grid index here) — a burst
    would fill it before the next step —, unless ``hold`` (a recent raise) and fewer sequences
    run than ``b_star`` (the slots above it are unused); raised to ``b_star`` only where the
    limit binds (requests queue behind it, or sequences fill it); else ``b_prev``: unused slots
    cost nothing, so a limit that is safe and does not bind is left alone."""
    m = s.measurement
    binding = m.waiting > 0 or m.running >= 0.9 * b_prev
    if b_prev > b_star and not s.itl_ok[i_prev] and (not hold or m.running >= b_star):
        return b_star
    if b_prev < b_star and binding:
        return b_star
    return b_prev


def best_batch(s: Situation, row: int) -> int:
    """Batch index for cap row ``row`` once the cap is decided (so the budget is met): the
    largest meeting the latency objective whose capacity meets the requirement, else the
    smallest meeting the requirement, else the largest — throughput before latency."""
    nb = s.grid.shape[1]
    sl = slice(row * nb, (row + 1) * nb)
    cap_ok = s.throughput_tok_s[sl] >= (s.required_tok_s or 0.0)
    good = np.nonzero(s.itl_ok[sl] & cap_ok)[0]
    if good.size:
        return int(good.max())
    if cap_ok.any():
        return int(np.nonzero(cap_ok)[0].min())
    return nb - 1


class SearchController(ModelBasedController):
    """PALS model-guided search, QoS first (see the module docstring).

    Parameters
    ----------
    config : SearchConfig, optional
        The tunables (positional only).
    model : PowerPerfModel, optional
        The offline power-performance model (None: the Config's ``model_path``, or one
        profiled on the simulator's presets at setup).
    **params
        Or `SearchConfig`'s fields as keyword parameters (margins, trim, dwell, ...).

    Examples
    --------
    >>> SearchController(margin=0.1).config.margin
    0.1
    """

    Config = SearchConfig
    config: SearchConfig
    name = "search"
    #: the knob `palsctl compare --pareto` sweeps, conservative first
    aggressiveness: ClassVar[tuple[str, tuple[float, ...]] | None] = (
        "latency_margin", (0.4, 0.3, 0.2, 0.1, 0.0))

    @override
    def reset(self) -> None:
        super().reset()
        self._cap_w: float | None = None      # base cap commanded (before the trim)
        self._batch: int | None = None
        self._since_up_s = math.inf
        self._since_batch_up_s = math.inf
        self._trim_w = 0.0
        self._backlog_s = 0.0
        self._thr_avg: float | None = None

    def _index(self, row: int, batch: float) -> int:
        g = self.grid
        nb = g.shape[1]
        j = int(np.argmin(np.abs(np.log(g.batch[:nb]) - math.log(max(batch, 1.0)))))
        return row * nb + j

    @override
    def decide(self, s: Situation) -> Action:
        cfg, lim, g, m = self.config, self.bound_limits, s.grid, s.measurement
        dt = s.dt_s
        if s.setpoint_changed:
            self._trim_w = 0.0
        headroom = math.inf if cfg.batch_headroom is None else cfg.batch_headroom
        choice = rank_qos(s, batch_headroom=headroom)
        best = choice.index
        want_cap = float(g.cap_w[best])
        if choice.mode != "ok":
            want_cap = max(want_cap, s.cap_ceiling_w)   # the fastest clock the budget allows
        want_batch = int(round(g.batch[best]))
        ceiling = s.cap_ceiling_w

        # -- the cap: up at once when the one in force fails QoS; down only when it pays ------
        prev = self._cap_w if self._cap_w is not None else s.cap_now_w
        prev = min(prev, ceiling)                       # a budget cut is followed at once
        row_prev = self._row_of(prev)
        keep = row_feasibility(s, required_scale=1.0 - cfg.hysteresis)
        stressed = s.tightened or m.waiting > 0 or choice.mode != "ok"
        if s.tightened:
            self._since_up_s = 0.0
        if choice.mode != "ok" or not keep.feasible[row_prev]:
            cap = max(want_cap, prev) if choice.mode != "ok" else want_cap
        else:
            cap = prev
            if want_cap < prev - cfg.cap_deadband_w + 1e-9 and not stressed \
                    and (self._since_up_s >= cfg.dwell_s or s.setpoint_changed) \
                    and choice.operating_power_w <= keep.op_power_w[row_prev] * (
                        1.0 - cfg.min_benefit):
                cap = want_cap
        moved_up = cap > prev + 1e-9
        self._since_up_s = 0.0 if moved_up else self._since_up_s + dt
        self._cap_w = cap

        # -- the batch limit: changed only where it binds --------------------------------------
        b_prev = self._batch if self._batch is not None else int(round(s.batch_now))
        row = self._row_of(cap)
        nb = g.shape[1]
        b_star = int(round(g.batch[row * nb + (best_batch(s, row) if best // nb != row
                                                 else best % nb)]))
        hold = cfg.batch_dwell_s is not None and self._since_batch_up_s < cfg.batch_dwell_s
        batch = batch_move(s, b_prev, b_star, self._index(row, b_prev), hold=hold)
        batch = lim.clamp_batch(batch)
        self._since_batch_up_s = 0.0 if batch > b_prev else self._since_batch_up_s + dt
        self._batch = batch

        # -- trim on a throughput shortfall while requests wait --------------------------------
        # only a backlog that persists (``trim_backlog_s``) counts, against the throughput
        # averaged over that time: one window's dip during a prefill stall is no shortfall
        target = s.demand.demand_tok_s
        if not m.stale:
            self._backlog_s = self._backlog_s + dt if m.waiting > 0 else 0.0
            k = 1.0 - math.exp(-dt / max(cfg.trim_backlog_s, dt))
            self._thr_avg = m.throughput_tok_s if self._thr_avg is None else \
                self._thr_avg + k * (m.throughput_tok_s - self._thr_avg)
        shortfall = 0.0
        if target and self._backlog_s >= cfg.trim_backlog_s and not m.stale \
                and self._thr_avg is not None:
            shortfall = max(0.0, (target - self._thr_avg) / target)
        if shortfall > 0 and cap + self._trim_w < ceiling:
            self._trim_w += cfg.trim_gain_w_per_s * dt * shortfall
        elif shortfall == 0:
            self._trim_w *= max(0.0, 1.0 - cfg.trim_leak_per_s * dt)
        self._trim_w = min(max(self._trim_w, 0.0), cfg.trim_max_w, max(0.0, ceiling - cap))
        cap_out = lim.clamp_cap_w(min(cap + self._trim_w, ceiling))
        cap_out = self._hold_small_raise(s, s.cap_now_w, cap_out)

        i_out = self._index(self._row_of(cap), batch)
        self._diag = {
            "mode": choice.mode, "cap_base_w": cap, "batch": batch, "trim_w": self._trim_w,
            "want_cap_w": want_cap, "want_batch": want_batch, "stressed": bool(stressed),
            "pred_throughput_tok_s": float(s.throughput_tok_s[i_out]),
            "pred_power_w": float(s.power_w[i_out]),
            "pred_itl_p90_s": float(s.itl_p90_s[i_out]) if np.isfinite(s.itl_p90_s[i_out])
            else None,
            "feasible_caps": choice.feasible_rows,
            **self.base_diagnostics(s),
        }
        return Action(power_cap_w=cap_out, max_batch=int(batch))
