"""The shared setup of the controllers that use an offline power-performance model (`search`,
`mpc`, `cap-only`, `search-truth`).

`ModelBasedController` gets a model (``model=``, the Config's ``model_path``, or one profiled on
the simulator's presets before the run — `palsctl.controllers.model_source`), predicts the
whole (cap, batch) candidate grid once at setup, and turns every measurement into a `Situation`:
the knobs in force, the residual-corrected predictions, the QoS-first demand
(`palsctl.controllers.qos.DemandEstimator`) and the latency tightening
(`palsctl.controllers.qos.QosTightening`). A subclass only decides::

    class Greedy(ModelBasedController):
        Config = ModelBasedConfig
        name = "greedy"

        def decide(self, s: Situation) -> Action:
            ok = (s.throughput_tok_s >= (s.required_tok_s or 0)) & (s.itl_ok) & s.budget_ok
            i = int(np.argmax(np.where(ok, -s.power_w, -np.inf)))
            return Action(power_cap_w=float(s.grid.cap_w[i]), max_batch=int(s.grid.batch[i]))
"""
from __future__ import annotations

import dataclasses
import math
from abc import abstractmethod
from typing import Any

import numpy as np
from typing_extensions import override

from palsctl.controllers import common
from palsctl.controllers.model_source import ensure_model
from palsctl.controllers.qos import Demand, DemandEstimator, QosTightening
from palsctl.errors import ConfigError
from palsctl.interfaces import Controller, ControllerConfig
from palsctl.types import Action, Limits, Measurement, PlantInfo, Setpoint

__all__ = ["ModelBasedConfig", "ModelBasedController", "Situation"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelBasedConfig(ControllerConfig):
    """Tunables every model-based controller shares (units in the names).

    Parameters
    ----------
    model_path : str or None
        Model file from ``palsctl fit`` (None: the model given at construction, or one profiled
        on the simulator's presets for the plant).
    margin : float, default 0.05
        Capacity kept over the demand (fraction).
    budget_margin : float, default 0.015
        Predicted power and the total cap are kept below budget × (1 − it): the sensor's noise
        then stays inside the budget.
    latency_margin : float, default 0.0
        The predicted p90 ITL must stay below TPOT SLO × (1 − it).
    cap_step_w : float, default 10.0
        Grid spacing of the per-GPU caps, W.
    max_batch : int or None
        Largest batch limit considered (None: the plant's launch limit).
    residual_alpha, residual_bound : float, default 0.1 and 2.0
        EWMA weight and clip of the measured/predicted correction.
    demand_tau_s : float, default 60.0
        Time constant of the slow average of the measured arrival rate, s.
    burst_tau_s : float or None, default 10.0
        Time constant of the fast average, s (the larger average counts; None: no fast one).
    demand_shift_s, demand_shift_drop : float or None, default 15.0 and 0.1
        A fall of the arrival rate that keeps the fast average more than ``demand_shift_drop``
        below the slow one for ``demand_shift_s`` seconds resets the slow one to the new level
        (None: the slow average decays on its own time constant, 60 s by default, and the
        capacity asked for lags a falling load by minutes).
    demand_rise_ratio, demand_rise_s : float or None, default 2.5 and 2.0
        Arrivals above ``demand_rise_ratio`` × the estimate in every window of
        ``demand_rise_s`` seconds in a row restart the fast average at their level: a step up of
        the load is served within seconds (None: the fast average follows it on its own time
        constant, and the first seconds of a new regime run on the old capacity).
    drain_s : float, default 30.0
        The waiting queue is served within this horizon, s.
    qos_guard, ttft_guard : float, default 0.85 and 0.6
        Fractions of the TPOT / TTFT SLO at which the feasible set tightens.
    qos_memory_s : float, default 180.0
        How long the tightening takes to decay, s (the aggressiveness knob: shorter saves more
        energy and risks more SLO misses).
    hysteresis : float, default 0.05
        Relative capacity shortfall tolerated before the configuration in force counts as
        infeasible (keeps the knobs still under a noisy demand).
    dwell_s : float, default 30.0
        Time since the last cap increase or latency tightening before the cap may come down, s.
    batch_dwell_s : float or None, default 30.0
        Time since the last batch-limit raise before the limit may come down while fewer
        sequences run than the lower limit, s: a burst's raise is not taken back the moment it
        drains (None: at once; a limit the running sequences fill comes down at once anyway).
    cap_min_raise_w : float, default 3.0
        Smallest raise of the cap in force, W per GPU: a smaller one is not made (a cut always
        is) unless requests wait or a latency came close to its SLO in the window. Following a
        budget that wiggles by a watt a second up as well as down would reverse the cap every
        few seconds for a fraction of a percent of throughput.
    dt_s : float or None
        Control period the controller is tuned for, s (None: any).
    """

    model_path: str | None = None
    margin: float = 0.05
    budget_margin: float = 0.015
    latency_margin: float = 0.0
    cap_step_w: float = 10.0
    max_batch: int | None = None
    residual_alpha: float = 0.1
    residual_bound: float = 2.0
    demand_tau_s: float = 60.0
    burst_tau_s: float | None = 10.0
    demand_shift_s: float | None = 15.0
    demand_shift_drop: float = 0.1
    demand_rise_ratio: float | None = 2.5
    demand_rise_s: float = 2.0
    drain_s: float = 30.0
    qos_guard: float = 0.85
    ttft_guard: float = 0.6
    qos_memory_s: float = 180.0
    hysteresis: float = 0.05
    dwell_s: float = 30.0
    batch_dwell_s: float | None = 30.0
    cap_min_raise_w: float = 3.0
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
        common.check_number(self.demand_tau_s, "demand_tau_s", lo=0, lo_open=True)
        common.check_number(self.burst_tau_s, "burst_tau_s", lo=0, lo_open=True, allow_none=True)
        common.check_number(self.demand_shift_s, "demand_shift_s", lo=0, lo_open=True,
                            allow_none=True)
        common.check_number(self.demand_shift_drop, "demand_shift_drop", lo=0, hi=1)
        common.check_number(self.demand_rise_ratio, "demand_rise_ratio", lo=1, lo_open=True,
                            allow_none=True)
        common.check_number(self.demand_rise_s, "demand_rise_s", lo=0, lo_open=True)
        common.check_number(self.drain_s, "drain_s", lo=0)
        common.check_number(self.qos_guard, "qos_guard", lo=0, lo_open=True, hi=1)
        common.check_number(self.ttft_guard, "ttft_guard", lo=0, lo_open=True, hi=1)
        common.check_number(self.qos_memory_s, "qos_memory_s", lo=0)
        common.check_number(self.hysteresis, "hysteresis", lo=0, hi=1)
        common.check_number(self.dwell_s, "dwell_s", lo=0)
        common.check_number(self.batch_dwell_s, "batch_dwell_s", lo=0, allow_none=True)
        common.check_number(self.cap_min_raise_w, "cap_min_raise_w", lo=0)
        common.check_number(self.dt_s, "dt_s", lo=0, lo_open=True, allow_none=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Situation:
    """One step's view of the plant through the model (totals over the plant's GPUs).

    Attributes
    ----------
    measurement, setpoint : Measurement, Setpoint
        What was measured and what is asked now.
    dt_s : float
        Control period, seconds.
    cap_now_w : float
        Per-GPU cap in force. ``batch_now`` : the batch limit in force.
    demand : Demand
        What the plant must serve (`palsctl.controllers.qos.Demand`).
    required_tok_s : float or None
        Capacity asked of a configuration: demand × (1 + margin) × the TTFT capacity factor.
    operating_tok_s : float or None
        The rate the plant is expected to run at: the demand (for operating tokens/J).
    budget_w : float or None
        Power ceiling for predictions: budget (or power target) × (1 − budget_margin).
    cap_ceiling_w : float
        Largest per-GPU cap the budget allows (the maximum limit without a budget).
    tpot_objective_s : float or None
        TPOT SLO × (1 − latency_margin).
    grid : common.Grid
        The candidates and their uncorrected predictions.
    throughput_tok_s, power_w, itl_p90_s : numpy.ndarray
        Residual-corrected predictions per candidate (the steady state a batch limit gives).
    itl_factor : float
        The QoS tightening of the p90 ITL (≥ 1): what bursts add to the steady state at the
        operating point, learned from measured p90 TPOTs near the SLO. It bears on the clock
        (a faster one shortens prefill stalls), not on the batch limit.
    setpoint_changed : bool
        The throughput target, the power target or an SLO moved by more than 1 % since the
        previous step (the power budget does not count: the ceiling follows it).
    tightened : bool
        A latency came close to its SLO in this window.
    """

    measurement: Measurement
    setpoint: Setpoint
    dt_s: float
    cap_now_w: float
    batch_now: float
    demand: Demand
    required_tok_s: float | None
    operating_tok_s: float | None
    budget_w: float | None
    cap_ceiling_w: float
    tpot_objective_s: float | None
    grid: common.Grid
    throughput_tok_s: np.ndarray
    power_w: np.ndarray
    itl_p90_s: np.ndarray
    itl_factor: float
    setpoint_changed: bool
    tightened: bool

    @property
    def budget_ok(self) -> np.ndarray:
        """Candidates whose predicted power and total cap fit ``budget_w``."""
        if self.budget_w is None:
            return np.ones(self.power_w.shape, dtype=bool)
        return (self.power_w <= self.budget_w) & (self.grid.cap_w <= self.cap_ceiling_w + 1e-6)

    @property
    def itl_ok(self) -> np.ndarray:
        """Candidates whose steady-state p90 ITL meets the TPOT objective (batch limits that
        are fast enough at their cap, bursts aside)."""
        if self.tpot_objective_s is None:
            return np.ones(self.itl_p90_s.shape, dtype=bool)
        return ~(self.itl_p90_s > self.tpot_objective_s)


class ModelBasedController(Controller):
    """Base of the model-using controllers: model, grid, residuals, demand, QoS tightening.

    Subclasses set ``Config`` (a `ModelBasedConfig` subclass) and ``name`` and implement
    `decide`; they may override `build_grid` (``search-truth`` reads the simulator's ground
    truth instead of a model) and `reset` (calling ``super().reset()``).

    Parameters
    ----------
    config : ModelBasedConfig, optional
        The tunables (positional only).
    model : PowerPerfModel, optional
        The offline power-performance model (None: the Config's ``model_path``, or one
        profiled on the simulator's presets at setup).
    **params
        Or the Config's fields as keyword parameters.
    """

    Config = ModelBasedConfig
    config: ModelBasedConfig
    needs_model = True

    def __init__(self, config: ModelBasedConfig | None = None, /, *, model: Any = None,
                 **params: Any) -> None:
        super().__init__(config, **params)
        cfg = self.config
        self.model = model
        self._grid: common.Grid | None = None
        self._res = common.Residuals(cfg.residual_alpha, cfg.residual_bound)
        self._demand = DemandEstimator(tau_s=cfg.demand_tau_s, drain_s=cfg.drain_s,
                                       burst_tau_s=cfg.burst_tau_s, shift_s=cfg.demand_shift_s,
                                       shift_drop=cfg.demand_shift_drop,
                                       rise_ratio=cfg.demand_rise_ratio, rise_s=cfg.demand_rise_s)
        self._qos = QosTightening(guard=cfg.qos_guard, ttft_guard=cfg.ttft_guard,
                                  memory_s=cfg.qos_memory_s)
        self.reset()

    # -- lifecycle ---------------------------------------------------------------------------
    def build_grid(self, limits: Limits, plant_info: PlantInfo | None) -> common.Grid:
        """Build the candidate grid with its predictions (the offline model's by default).

        Parameters
        ----------
        limits : Limits
            The plant's bounds (caps per GPU, W; batch limits).
        plant_info : PlantInfo or None
            The plant's description (for a model profiled on the simulator's presets).

        Returns
        -------
        common.Grid
            Every (cap, batch) candidate and its predicted throughput, power and p90 ITL.
        """
        ensure_model(self, plant_info)
        return common.model_grid(self.model, limits, cap_step_w=self.config.cap_step_w,
                                 max_batch=self.config.max_batch)

    @property
    def grid(self) -> common.Grid:
        """The candidate grid built at setup (`RuntimeError` before it)."""
        if self._grid is None:
            raise RuntimeError(f"{type(self).__name__}.step() called before setup()")
        return self._grid

    @override
    def setup(self, *, limits: Limits, dt_s: float, plant_info: PlantInfo | None) -> None:
        self._grid = self.build_grid(limits, plant_info)
        super().setup(limits=limits, dt_s=dt_s, plant_info=plant_info)

    @override
    def reset(self) -> None:
        self._res.reset()
        self._demand.reset()
        self._qos.reset()
        self._sp: Setpoint | None = None
        self._last: Action | None = None
        self._diag: dict[str, Any] = {}

    @override
    def diagnostics(self) -> dict[str, Any]:
        return dict(self._diag)

    # -- the shared half of a step -----------------------------------------------------------
    def observe(self, m: Measurement, sp: Setpoint) -> Situation:
        """Fold the measurement into the corrections and describe the step.

        Parameters
        ----------
        m : Measurement
            What the plant measured over the last window.
        sp : Setpoint
            What the operator asks for now.

        Returns
        -------
        Situation
            The step seen through the model.
        """
        if self._grid is None or self.limits is None:
            raise RuntimeError(f"{type(self).__name__}.step() called before setup()")
        cfg, lim, g = self.config, self.limits, self._grid
        dt = float(self.dt_s or m.window_s or 1.0)
        last = self._last
        cap_now = m.power_cap_w if m.power_cap_w is not None else (
            last.power_cap_w if last is not None and last.power_cap_w is not None
            else lim.power_cap_default_w)
        b_now = float(m.max_batch if m.max_batch is not None else (
            last.max_batch if last is not None and last.max_batch is not None
            else lim.max_batch_max))
        pred_now = None
        if not m.stale:
            pred = g.interp(cap_now, common.effective_batch(m, b_now))
            self._res.update(m, pred)
            pred_now = pred[2] * self._res.itl
        prev_sp = self._sp
        # a budget that moves is followed through the ceiling (a cut at once); it is no new
        # operating regime, so it neither releases the dwell nor resets the trim: a grid signal
        # that moves by 1 % a second would otherwise make every voluntary cap cut immediate
        changed = common.setpoint_changed(prev_sp, sp, ignore=("power_budget_w",))
        self._sp = sp
        # the window was measured under the previous setpoint's SLOs
        tightened = self._qos.update(m, prev_sp or sp, dt_s=dt, predicted_itl_s=pred_now)
        out_mean = self.plant_info.output_tokens_mean if self.plant_info is not None else None
        demand = self._demand.update(m, sp, dt_s=dt, output_tokens_mean=out_mean)
        required = operating = None
        if demand.demand_tok_s is not None:
            operating = demand.demand_tok_s
            required = demand.demand_tok_s * (1.0 + cfg.margin) * self._qos.capacity_factor
        budget = sp.power_budget_w if sp.power_budget_w is not None else sp.power_target_w
        budget_w = None if budget is None else budget * (1.0 - cfg.budget_margin)
        ceiling = lim.power_cap_max_w if budget_w is None else max(
            lim.power_cap_min_w, min(lim.power_cap_max_w, lim.per_gpu_w(budget_w)))
        tpot_obj = None if sp.tpot_slo_s is None else sp.tpot_slo_s * (1.0 - cfg.latency_margin)
        return Situation(
            measurement=m, setpoint=sp, dt_s=dt, cap_now_w=float(cap_now), batch_now=b_now,
            demand=demand, required_tok_s=required, operating_tok_s=operating, budget_w=budget_w,
            cap_ceiling_w=float(ceiling), tpot_objective_s=tpot_obj, grid=g,
            throughput_tok_s=g.throughput_tok_s * self._res.throughput,
            power_w=g.power_w * self._res.power, itl_p90_s=g.itl_p90_s * self._res.itl,
            itl_factor=self._qos.itl_factor, setpoint_changed=changed,
            tightened=tightened)

    def _row_of(self, cap_w: float) -> int:
        """The grid row of the largest grid cap at or below ``cap_w`` (the lowest row when
        ``cap_w`` is below the grid)."""
        g = self.grid
        caps = g.cap_w[::g.shape[1]]
        return max(int(np.searchsorted(caps, cap_w + 1e-6, side="right")) - 1, 0)

    def _hold_small_raise(self, s: Situation, in_force_w: float, cap_w: float) -> float:
        """``cap_w``, or the cap in force when ``cap_w`` raises it by less than
        ``cap_min_raise_w`` while no request waits and no latency came close to its SLO (then a
        watt does not serve QoS and the move would only make the cap reverse with the budget)."""
        if in_force_w < cap_w < in_force_w + self.config.cap_min_raise_w \
                and not (s.tightened or s.measurement.waiting > 0):
            return self.bound_limits.clamp_cap_w(in_force_w)
        return cap_w

    def base_diagnostics(self, s: Situation) -> dict[str, Any]:
        """Collect the diagnostics every model-based controller reports.

        Parameters
        ----------
        s : Situation
            This step's situation.

        Returns
        -------
        dict
            Demand, its source, backlog, required capacity, tightening and corrections.
        """
        d = s.demand
        return {"demand_tok_s": d.demand_tok_s, "demand_source": d.source,
                "backlog_tok_s": d.backlog_tok_s, "required_tok_s": s.required_tok_s,
                "tightened": s.tightened, **self._res.as_dict(), **self._qos.as_dict()}

    @override
    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action:
        s = self.observe(measurement, setpoint)
        action = self.decide(s)
        self._last = action
        return action

    @abstractmethod
    def decide(self, s: Situation) -> Action:
        """Decide this step's action (and set ``self._diag`` for `diagnostics`).

        Parameters
        ----------
        s : Situation
            The step seen through the model.

        Returns
        -------
        Action
            Per-GPU power cap (W) and batch limit.
        """


def finite_or_none(x: float | None) -> float | None:
    """Return ``x`` when it is a finite number, else None (for JSON diagnostics).

    Parameters
    ----------
    x : float or None
        A number.

    Returns
    -------
    float or None
        ``x`` as a float, or None.
    """
    return float(x) if x is not None and math.isfinite(x) else None
