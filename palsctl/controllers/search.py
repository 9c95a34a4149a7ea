"""`search` — the PALS method: model-guided search over (power cap, batch) with online correction.

Each control step:

1. **Residual correction.** The offline model's prediction at the cap in force and the
   *effective* batch (the running count, or the batch limit when saturated — the model's
   saturated steady state for that batch is the plant's operating point) is compared with the
   measurement; an EWMA of measured/predicted per output (throughput, power, p90 ITL) rescales
   every candidate's prediction.
2. **Ranking.** Every (cap, batch) candidate of the grid (caps every ``cap_step_w`` between the
   plant's limits × batch limits 1..16 then coarser up to the launch limit) is ranked by
   corrected predicted *operating* tokens/J (the power at the batch where the cap just delivers
   the target; see `palsctl.controllers.common.rank`) subject to

   * predicted throughput ≥ required = target × (1 + ``margin``) (+ the rate that drains the
     waiting queue within ``drain_s``); without a target the measured demand is used;
   * predicted power ≤ budget × (1 − ``budget_margin``) and cap × GPUs ≤ budget;
   * predicted p90 ITL ≤ the TPOT objective.

   **Degradation order** when nothing is feasible (see
   `palsctl.controllers.common.rank_throughput_first`): the budget is kept first, then
   throughput, then latency — i.e. the latency objective is dropped first (the candidate meeting
   the requirement with the lowest predicted p90 ITL is taken); if still infeasible the fastest
   candidate within the budget is taken whatever its latency (a smaller batch would let the
   queue and the time to first token grow), at the largest cap the budget allows; only when not
   even the lowest cap fits the budget is the lowest-power candidate taken (the safety guard
   then clamps it).
3. **Hysteresis and dwell.** The configuration in use is kept while it stays within the budget
   and the latency objective, its predicted throughput is within ``hysteresis`` (relative) of
   the requirement and its score within ``hysteresis`` of the best — and for at least
   ``dwell_s`` after a switch — unless the setpoint changes.
4. **Cap trim.** An integral term on the relative throughput shortfall (measured below the
   target while the demand exists: requests waiting for admission) adds up to
   ``trim_max_w`` to the cap — a faster clock also shortens the prefill stalls that make
   windows fall short under bursty arrivals. It leaks away at ``trim_leak_per_s`` when there is
   no shortfall, stops integrating when the cap is at its upper bound (anti-windup) and resets
   to 0 on a setpoint change.

Vectorised: the grid is predicted once at ``setup``; a step is a handful of numpy operations over
it (well under 1 ms for ~1,500 candidates).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from palsctl.controllers import common
from palsctl.controllers.model_source import ensure_model
from palsctl.errors import ConfigError
from palsctl.interfaces import Controller, ControllerConfig
from palsctl.types import Action, Limits, Measurement, PlantInfo, Setpoint


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchConfig(ControllerConfig):
    """Tunables of `SearchController` (units in the names; fractions are dimensionless).

    ``model_path``: model file from ``palsctl fit`` (None: the model given at construction, or one
    profiled on the simulator's presets for the plant). ``margin``: throughput headroom over the
    target (0.3: on the bursty Azure-conversation workloads a saturated steady state 15 % above
    the mean demand let queues and prefill stalls push the windowed p90 TTFT/TPOT over the SLOs
    in 2–16 % of windows; 30 % roughly halves that for ~5–10 % of the tokens/J — measured in
    bench/RESULTS.md, "Controllers"). ``budget_margin``: predicted power is kept below budget × (1 − budget_margin).
    ``latency_margin``: the predicted p90 ITL must stay below the TPOT SLO × (1 − latency_margin)
    (the steady-state p90 ITL misses the prefill stalls of bursty arrivals, which the windowed
    p90 TPOT that QoS scores includes).
    ``cap_step_w``: grid spacing of per-GPU caps. ``max_batch``: largest batch limit considered
    (None: the plant's launch limit). ``residual_alpha``: EWMA weight of a new residual (0..1);
    ``residual_bound``: residual ratios clipped to [1/bound, bound]. ``trim_gain_w_per_s``: cap
    trim integral gain, watts per second per unit relative shortfall; ``trim_max_w``: trim bound;
    ``trim_leak_per_s``: trim decay rate without shortfall. ``hysteresis``: relative score gain
    needed to leave the configuration in use; ``dwell_s``: minimum time between voluntary
    switches. ``drain_s``: time to drain the waiting queue. ``batch_headroom``: the batch limit
    is the smallest meeting the requirement raised by this fraction (None: the largest batch of
    the chosen cap that meets the latency objective and the budget — free burst headroom).
    ``dt_s``: control period it is tuned for (None: any).
    """

    model_path: str | None = None
    margin: float = 0.3
    budget_margin: float = 0.02
    latency_margin: float = 0.0
    cap_step_w: float = 10.0
    max_batch: int | None = None
    residual_alpha: float = 0.1
    residual_bound: float = 2.0
    trim_gain_w_per_s: float = 60.0
    trim_max_w: float = 100.0
    trim_leak_per_s: float = 0.05
    hysteresis: float = 0.03
    dwell_s: float = 30.0
    drain_s: float = 30.0
    batch_headroom: float | None = None
    dt_s: float | None = None

    def __post_init__(self) -> None:
        if self.model_path is not None and not isinstance(self.model_path, str):
            raise ConfigError("must be a path string", key="controller.model_path",
                                     value=self.model_path)
        common.check_number(self.margin, "margin", lo=0, hi=2)
        common.check_number(self.budget_margin, "budget_margin", lo=0, hi=0.5)
        common.check_number(self.latency_margin, "latency_margin", lo=0, hi=0.9)
        common.check_number(self.cap_step_w, "cap_step_w", lo=0, lo_open=True)
        common.check_int(self.max_batch, "max_batch", allow_none=True)
        common.check_number(self.residual_alpha, "residual_alpha", lo=0, hi=1)
        common.check_number(self.residual_bound, "residual_bound", lo=1)
        common.check_number(self.trim_gain_w_per_s, "trim_gain_w_per_s", lo=0)
        common.check_number(self.trim_max_w, "trim_max_w", lo=0)
        common.check_number(self.trim_leak_per_s, "trim_leak_per_s", lo=0)
        common.check_number(self.hysteresis, "hysteresis", lo=0, hi=1)
        common.check_number(self.dwell_s, "dwell_s", lo=0)
        common.check_number(self.drain_s, "drain_s", lo=0)
        common.check_number(self.batch_headroom, "batch_headroom", lo=0, allow_none=True)
        common.check_number(self.dt_s, "dt_s", lo=0, lo_open=True, allow_none=True)


class SearchController(Controller):
    """PALS model-guided search (see the module docstring).

    >>> SearchController(margin=0.1).config.margin
    0.1
    """

    Config = SearchConfig
    name = "search"
    needs_model = True

    def __init__(self, config: SearchConfig | None = None, /, *, model: Any = None,
                 **params: Any) -> None:
        super().__init__(config, **params)
        self.model = model
        self._grid: common.Grid | None = None
        self._res = common.Residuals(self.config.residual_alpha, self.config.residual_bound)
        self.reset()

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self, *, limits: Limits, dt_s: float, plant_info: PlantInfo) -> None:
        ensure_model(self, plant_info)
        self._grid = common.model_grid(self.model, limits, cap_step_w=self.config.cap_step_w,
                                       max_batch=self.config.max_batch)
        super().setup(limits=limits, dt_s=dt_s, plant_info=plant_info)

    def reset(self) -> None:
        self._res.reset()
        self._idx: int | None = None
        self._since_switch_s = math.inf
        self._trim_w = 0.0
        self._sp: Setpoint | None = None
        self._diag: dict[str, Any] = {}

    # -- control -----------------------------------------------------------------------------
    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action:
        if self._grid is None or self.limits is None:
            raise RuntimeError("SearchController.step() called before setup()")
        cfg, lim, g, m = self.config, self.limits, self._grid, measurement
        dt = float(self.dt_s or m.window_s or 1.0)
        n = lim.num_gpus
        cap_now = m.power_cap_w if m.power_cap_w is not None else (
            g.cap_w[self._idx] if self._idx is not None else lim.power_cap_default_w)
        b_now = m.max_batch if m.max_batch is not None else (
            g.batch[self._idx] if self._idx is not None else lim.max_batch_max)
        if not m.stale:
            b_eff = common.effective_batch(m, b_now)
            self._res.update(m, self._grid.interp(cap_now, b_eff))

        changed = common.setpoint_changed(self._sp, setpoint)
        if changed:
            self._trim_w = 0.0
        self._sp = setpoint

        out_mean = self.plant_info.output_tokens_mean if self.plant_info is not None else None
        required = common.required_throughput(m, setpoint, margin=cfg.margin,
                                              drain_s=cfg.drain_s, output_tokens_mean=out_mean)
        operating = common.required_throughput(m, setpoint, margin=0.0, drain_s=cfg.drain_s,
                                               output_tokens_mean=out_mean)
        budget = setpoint.power_budget_w
        if budget is None and setpoint.power_target_w is not None:
            budget = setpoint.power_target_w  # power-target mode: treat the target as a ceiling
        budget_pred = None if budget is None else budget * (1.0 - cfg.budget_margin)
        tpot_obj = None if setpoint.tpot_slo_s is None else \
            setpoint.tpot_slo_s * (1.0 - cfg.latency_margin)

        thr = g.throughput_tok_s * self._res.throughput
        pw = g.power_w * self._res.power
        itl = g.itl_p90_s * self._res.itl
        headroom = math.inf if cfg.batch_headroom is None else cfg.batch_headroom
        choice = common.rank_throughput_first(
            g.cap_w, thr, pw, itl, shape=g.shape, num_gpus=n, required_tok_s=required,
            budget_w=budget_pred, tpot_slo_s=tpot_obj, operating_tok_s=operating,
            batch_headroom=headroom, batch_values=g.batch)
        best = choice.index
        idx = best
        cur = self._idx
        if cur is not None and not changed and choice.mode == "ok":
            # the configuration in use stays while it is still (nearly: within the hysteresis)
            # feasible and (nearly) as good as the best, or while the dwell time runs
            fits_budget = budget_pred is None or (
                pw[cur] <= budget_pred and g.cap_w[cur] * n <= budget_pred + 1e-6)
            fits_lat = tpot_obj is None or not itl[cur] > tpot_obj
            fits_thr = required is None or thr[cur] >= required * (1.0 - cfg.hysteresis)
            if fits_budget and fits_lat and fits_thr:
                s_best = choice.score[best]
                s_cur = s_best if not np.isfinite(choice.score[cur]) else choice.score[cur]
                if not choice.feasible[cur]:  # nearly feasible: score its operating point
                    s_cur = s_best * (1.0 - cfg.hysteresis) if required is not None else s_cur
                within = s_cur >= s_best - cfg.hysteresis * abs(s_best)
                if within or self._since_switch_s < cfg.dwell_s:
                    idx = cur
        switched = idx != cur
        self._since_switch_s = 0.0 if switched else self._since_switch_s + dt
        self._idx = idx

        # cap trim on the throughput shortfall (integral with leak and anti-windup)
        cap_ceiling = lim.power_cap_max_w
        if budget is not None:  # the trim stays under the budget with the same margin
            cap_ceiling = max(lim.power_cap_min_w,
                              min(cap_ceiling, budget * (1.0 - cfg.budget_margin) / n))
        target = setpoint.throughput_tok_s
        base_cap = float(g.cap_w[idx])
        if choice.mode == "relaxed_throughput" and budget is not None:
            # the budget binds the throughput: run at the largest cap it allows, not at the
            # grid point below it (up to ``cap_step_w`` of capacity left unused)
            base_cap = max(base_cap, cap_ceiling)
        shortfall = 0.0
        # the demand exists when requests wait for admission (the plant is saturated): the
        # same rule `palsctl.metrics` scores (an unsaturated plant serves all it is offered)
        demand_exists = m.waiting > 0
        if target is not None and target > 0 and demand_exists and not m.stale:
            shortfall = max(0.0, (target - m.throughput_tok_s) / target)
        if shortfall > 0 and base_cap + self._trim_w < cap_ceiling:
            self._trim_w += cfg.trim_gain_w_per_s * dt * shortfall
        elif shortfall == 0:
            self._trim_w *= max(0.0, 1.0 - cfg.trim_leak_per_s * dt)
        self._trim_w = min(max(self._trim_w, 0.0), cfg.trim_max_w,
                           max(0.0, cap_ceiling - base_cap))
        cap = lim.clamp_cap_w(min(base_cap + self._trim_w, cap_ceiling))
        batch = lim.clamp_batch(int(round(g.batch[idx])))

        op = choice.operating_index if choice.operating_index is not None else idx
        if idx != best and required is not None and np.isfinite(choice.score[idx]):
            # kept configuration: its operating point is the first feasible batch of its cap
            row = idx // g.shape[1]
            feas_row = np.nonzero(choice.feasible[row * g.shape[1]:(row + 1) * g.shape[1]])[0]
            op = row * g.shape[1] + int(feas_row.min()) if feas_row.size else idx
        self._diag = {
            "mode": choice.mode, "cap_base_w": base_cap, "batch": batch,
            "trim_w": self._trim_w, "required_tok_s": required,
            "pred_operating_batch": float(g.batch[op]),
            "pred_throughput_tok_s": float(thr[idx]), "pred_power_w": float(pw[op]),
            "pred_tokens_per_joule": (float(operating / pw[op]) if operating is not None
                                      else float(thr[idx] / pw[idx])) if pw[op] > 0 else None,
            "feasible_candidates": int(np.count_nonzero(choice.feasible)),
            "switched": bool(switched), **self._res.as_dict(),
        }
        return Action(power_cap_w=cap, max_batch=batch)

    def diagnostics(self) -> dict[str, Any]:
        return dict(self._diag)
