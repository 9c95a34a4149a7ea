"""`mpc` — model predictive control on a linearisation of the offline power-performance model.

Knobs are scaled to ``x = (cap / cap_max, batch / batch_max)``. Around an operating point u0
(re-linearised with ``model.gradients`` when the knobs move more than ``relinearize_tol`` in
scaled units; the cap coordinate is the *effective* cap — the drawn power per GPU when it is
below the cap, since a cap above the natural draw has zero sensitivity) the model gives, after
the online residual correction (`palsctl.controllers.common.Residuals`),

    throughput(x) ≈ c_t + g_t · x,      power(x) ≈ c_p + g_p · x     (c = y(u0) − g · u0)

Over a horizon of N steps the QP chooses x_1..x_N minimising

    Σ_k  w_energy · P_k / P_ref  +  w_short · s_k  +  w_short2 · s_k²  +  w_move · ‖x_k − x_{k−1}‖²

subject to P_k ≤ budget (hard), s_k ≥ required/r_ref − T_k/r_ref, s_k ≥ 0, knob bounds, rate
limits ``|x_k − x_{k−1}| ≤ rate · dt`` and a trust region around u0. QoS first: "required" is
the shared demand (`palsctl.controllers.qos`: max(target, arrivals) + backlog, × (1 + margin) ×
the TTFT capacity factor); the cap is bounded below by the lowest cap whose operating point
meets the TPOT objective with the learned burst tightening (`search`'s feasibility), above by
budget × (1 − budget_margin) / N_gpus; the batch by the largest batch whose steady-state p90 ITL
meets the TPOT objective. The first move is applied, unless it is smaller than
``cap_deadband_w`` and no bound forces it (with ``w_move`` this keeps the cap from chattering).
The cvxpy problem is built once with `Parameter`s (DPP: products of a parameter and a variable
only; every parameter-only expression is computed in numpy) and warm-started; OSQP by default,
CLARABEL as fallback; if both fail, the last action is held and the status is reported in
``diagnostics()``.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any

import numpy as np
from typing_extensions import override

from palsctl.controllers import common
from palsctl.controllers.model_based import ModelBasedConfig, ModelBasedController, Situation
from palsctl.controllers.search import batch_move, best_batch, row_feasibility
from palsctl.errors import ConfigError
from palsctl.types import Action, Limits, PlantInfo

__all__ = ["MPCConfig", "MPCController"]

_SOLVERS = ("OSQP", "CLARABEL", "SCS")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MPCConfig(ModelBasedConfig):
    """Tunables of `MPCController` (the shared ones — model, margin, budget and latency margins,
    residuals, demand and QoS tightening — are `ModelBasedConfig`'s).

    ``horizon``: steps N. ``w_energy``: weight of power normalised by the plant's maximum power;
    ``w_short`` / ``w_short2``: linear / quadratic weights of the capacity shortfall normalised
    by the requirement; ``w_move``: weight of squared scaled knob moves (what keeps the cap from
    chattering). ``max_cap_rate_w_per_s`` / ``max_batch_rate_per_s``: rate limits.
    ``trust_region``: largest scaled distance from the linearisation point;
    ``relinearize_tol``: scaled move that triggers re-linearisation. ``cap_deadband_w``: a new
    cap closer than this to the one in force is not applied (unless a bound moved past it).
    ``batch_deadband``: a new batch limit within this fraction of the one in force is not
    applied (unless the running sequences overfill the lower one by more than that).
    ``solver``: cvxpy solver name (OSQP, CLARABEL or SCS); ``fallback_solver``: tried when it
    fails.
    """

    horizon: int = 10
    w_energy: float = 1.0
    w_short: float = 50.0
    w_short2: float = 200.0
    w_move: float = 0.5
    max_cap_rate_w_per_s: float = 50.0
    max_batch_rate_per_s: float = 32.0
    trust_region: float = 0.3
    relinearize_tol: float = 0.02
    cap_deadband_w: float = 10.0
    batch_deadband: float = 0.1
    solver: str = "OSQP"
    fallback_solver: str | None = "CLARABEL"

    def __post_init__(self) -> None:
        super().__post_init__()
        common.check_int(self.horizon, "horizon")
        for name in ("w_energy", "w_short", "w_short2", "w_move", "cap_deadband_w"):
            common.check_number(getattr(self, name), name, lo=0)
        common.check_number(self.batch_deadband, "batch_deadband", lo=0, hi=1)
        common.check_number(self.max_cap_rate_w_per_s, "max_cap_rate_w_per_s", lo=0,
                            lo_open=True)
        common.check_number(self.max_batch_rate_per_s, "max_batch_rate_per_s", lo=0,
                            lo_open=True)
        common.check_number(self.trust_region, "trust_region", lo=0, lo_open=True)
        common.check_number(self.relinearize_tol, "relinearize_tol", lo=0)
        for key in ("solver", "fallback_solver"):
            v = getattr(self, key)
            if v is None and key == "fallback_solver":
                continue
            if not isinstance(v, str) or v.upper() not in _SOLVERS:
                raise ConfigError(f"must be one of {', '.join(_SOLVERS)}",
                                  key=f"controller.{key}", value=v)


_THETA = ("cap_prev", "batch_prev", "dthroughput_dcap", "dthroughput_dbatch", "dpower_dcap",
          "dpower_dbatch", "c_throughput", "c_power", "required", "power_max", "cap_lo", "cap_hi",
          "batch_lo", "batch_hi", "cap_rate", "batch_rate", "w_short")
_I = {name: i for i, name in enumerate(_THETA)}


class _QP:
    """The parametrised QP, built once per (horizon, weights). Knob trajectories ``xc`` (cap)
    and ``xb`` (batch), scaled; moves ``dc``/``db`` as helper variables. The per-step data are
    one parameter vector ``theta`` (names in ``_THETA``; a parameter's value is validated on
    every assignment, so one vector costs far less than seventeen scalars) and the nonnegative
    quadratic shortfall weight. Every parameter enters multiplied by a variable at most once, and
    every parameter-only expression is computed in numpy (DPP)."""

    def __init__(self, cfg: MPCConfig) -> None:
        import cvxpy as cp

        N = cfg.horizon
        self.xc = cp.Variable(N, name="cap")
        self.xb = cp.Variable(N, name="batch")
        self.dc = cp.Variable(N, name="cap_move")
        self.db = cp.Variable(N, name="batch_move")
        self.s = cp.Variable(N, nonneg=True, name="shortfall")
        self.theta = cp.Parameter(len(_THETA), name="theta")
        self.w_short2 = cp.Parameter(nonneg=True, name="w_short2")
        th = {name: self.theta[i] for name, i in _I.items()}
        shift = np.eye(N, k=-1)  # row k picks x_{k-1}
        e0 = np.zeros(N)
        e0[0] = 1.0
        thr = th["c_throughput"] + th["dthroughput_dcap"] * self.xc \
            + th["dthroughput_dbatch"] * self.xb
        pw = th["c_power"] + th["dpower_dcap"] * self.xc + th["dpower_dbatch"] * self.xb
        cons = [
            self.dc == self.xc - shift @ self.xc - e0 * th["cap_prev"],
            self.db == self.xb - shift @ self.xb - e0 * th["batch_prev"],
            pw <= th["power_max"],
            self.s >= th["required"] - thr,
            self.xc >= th["cap_lo"], self.xc <= th["cap_hi"],
            self.xb >= th["batch_lo"], self.xb <= th["batch_hi"],
            self.dc <= th["cap_rate"], -self.dc <= th["cap_rate"],
            self.db <= th["batch_rate"], -self.db <= th["batch_rate"],
        ]
        cost = (cfg.w_energy * cp.sum(pw) + th["w_short"] * cp.sum(self.s)
                + self.w_short2 * cp.sum_squares(self.s)
                + cfg.w_move * (cp.sum_squares(self.dc) + cp.sum_squares(self.db)))
        self.problem = cp.Problem(cp.Minimize(cost), cons)

    def set(self, values: dict[str, float], w_short2: float) -> None:
        self.theta.value = np.array([float(values[k]) for k in _THETA])
        self.w_short2.value = float(w_short2)


class MPCController(ModelBasedController):
    """Linear MPC over (cap, batch), QoS first; see the module docstring.

    Parameters
    ----------
    config : MPCConfig, optional
        The tunables (positional only).
    model : PowerPerfModel, optional
        The offline power-performance model (None: the Config's ``model_path``, or one
        profiled on the simulator's presets at setup).
    **params
        Or `MPCConfig`'s fields as keyword parameters (horizon, weights, rate limits, ...).
    """

    Config = MPCConfig
    config: MPCConfig
    name = "mpc"
    aggressiveness = ("w_energy", (0.25, 0.5, 1.0, 2.0, 4.0))

    def __init__(self, config: MPCConfig | None = None, /, *, model: Any = None,
                 **params: Any) -> None:
        self._qp: _QP | None = None
        super().__init__(config, model=model, **params)

    @property
    def problem(self) -> Any:
        """The cvxpy problem (None before setup)."""
        return None if self._qp is None else self._qp.problem

    @override
    def setup(self, *, limits: Limits, dt_s: float, plant_info: PlantInfo | None) -> None:
        if self._qp is None:
            self._qp = _QP(self.config)
        super().setup(limits=limits, dt_s=dt_s, plant_info=plant_info)

    @override
    def reset(self) -> None:
        super().reset()
        self._u0: np.ndarray | None = None
        self._lin: tuple[float, float, np.ndarray, np.ndarray] | None = None
        self._floor: float | None = None
        self._since_up_s = math.inf
        self._since_batch_up_s = math.inf

    def _scale(self) -> tuple[float, float]:
        lim = self.bound_limits
        return lim.power_cap_max_w, float(lim.max_batch_max)

    def _linearize(self, cap_w: float, batch: float) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = self.model.gradients(float(cap_w), float(batch))
        thr, pw, _ = self.grid.interp(cap_w, batch)
        cs, bs = self._scale()
        g_t = np.array([float(g.dthroughput_dcap) * cs, float(g.dthroughput_dbatch) * bs])
        g_p = np.array([float(g.dpower_dcap) * cs, float(g.dpower_dbatch) * bs])
        for arr in (g_t, g_p):
            arr[~np.isfinite(arr)] = 0.0
        self._lin = (thr, pw, g_t, g_p)
        self._u0 = np.array([cap_w / cs, batch / bs])

    @override
    def decide(self, s: Situation) -> Action:
        cfg, lim, m, qp, g = self.config, self.bound_limits, s.measurement, self._qp, s.grid
        if qp is None:
            raise RuntimeError("MPCController.step() called before setup()")
        dt, n = s.dt_s, lim.num_gpus
        cs, bs = self._scale()
        cap_now, b_now = s.cap_now_w, s.batch_now
        # a cap above what the GPUs draw does nothing: the *effective* cap is the drawn power
        # (per GPU) when it is below the cap. Linearising there (left derivative) keeps the
        # cap's sensitivities visible instead of a flat zero above the natural draw.
        cap_lin = cap_now
        if not m.stale and m.power_w > 0:
            cap_lin = max(lim.power_cap_min_w, min(cap_now, lim.per_gpu_w(1.02 * m.power_w)))
        x_now = np.array([cap_lin / cs, b_now / bs])
        if self._u0 is None or np.max(np.abs(x_now - self._u0)) > cfg.relinearize_tol:
            self._linearize(cap_lin, b_now)
        assert self._lin is not None and self._u0 is not None  # set by _linearize
        thr0, pw0, g_t, g_p = self._lin
        res = self._res
        thr0c, pw0c = thr0 * res.throughput, pw0 * res.power
        g_tc, g_pc = g_t * res.throughput, g_p * res.power

        required = s.required_tok_s
        p_ref = n * lim.power_cap_max_w
        r_ref = max(required or 0.0, 1.0) if required is not None else max(thr0c, 1.0)
        cap_hi = s.cap_ceiling_w
        # QoS first: the lowest cap whose operating point meets the TPOT objective with the
        # burst tightening bounds the cap from below (the ceiling when none does)
        caps = g.cap_w[::g.shape[1]]

        def floor(scale: float) -> float:
            rows = np.nonzero(row_feasibility(s, required_scale=scale).feasible)[0]
            return float(caps[rows.min()]) if rows.size else cap_hi

        # the floor rises at once; it falls (to the loose floor, with the hysteresis) only after
        # ``dwell_s`` without a rise or a latency tightening
        f_strict, f_loose = floor(1.0), floor(1.0 - cfg.hysteresis)
        prev_floor = self._floor if self._floor is not None else f_strict
        if s.tightened:
            self._since_up_s = 0.0
        if f_strict > prev_floor:
            self._floor, self._since_up_s = f_strict, 0.0
        else:
            self._since_up_s += dt
            if f_loose < prev_floor and self._since_up_s >= cfg.dwell_s:
                self._floor = f_loose
            else:
                self._floor = prev_floor
        prev_cap = self._last.power_cap_w if self._last is not None else cap_now
        if prev_cap is None:  # every action decide returns sets the cap
            prev_cap = cap_now
        cap_lo_qos = min(max(self._floor, lim.power_cap_min_w), cap_hi)
        b_hi = float(lim.max_batch_max)
        if s.tpot_objective_s is not None:
            ok = s.itl_ok & (g.cap_w <= cap_hi + 1e-9)
            if ok.any():
                b_hi = float(max(lim.max_batch_min, g.batch[ok].max()))
            # throughput before latency (`search`'s degradation order): where no batch within
            # the latency bound has the capacity asked for at the budget's ceiling, the bound
            # rises to the batch `best_batch` takes there — else a TPOT objective the plant
            # cannot meet would hold the batch small while the queue grows without end
            r_top = self._row_of(cap_hi)
            b_hi = max(b_hi, float(g.batch[r_top * g.shape[1] + best_batch(s, r_top)]))
        u0 = self._u0
        x_lo = np.array([cap_lo_qos / cs, lim.max_batch_min / bs])
        x_hi = np.array([cap_hi / cs, b_hi / bs])
        # moves are counted from the knobs in force brought inside the bounds: a budget step
        # down (or a QoS bound up) is met at once
        x_prev = np.clip(np.array([cap_now / cs, b_now / bs]), x_lo, x_hi)
        center = np.clip(u0, x_lo, x_hi)
        lo = np.maximum(x_lo, center - cfg.trust_region)
        hi = np.minimum(x_hi, center + cfg.trust_region)
        lo, hi = np.minimum(lo, x_prev), np.maximum(hi, x_prev)
        gt, gp = g_tc / r_ref, g_pc / p_ref
        p_max = math.inf if s.budget_w is None else s.budget_w
        qp.set({
            "cap_prev": x_prev[0], "batch_prev": x_prev[1],
            "dthroughput_dcap": gt[0], "dthroughput_dbatch": gt[1],
            "dpower_dcap": gp[0], "dpower_dbatch": gp[1],
            "c_throughput": (thr0c - g_tc @ u0) / r_ref, "c_power": (pw0c - g_pc @ u0) / p_ref,
            "required": (required or 0.0) / r_ref,
            "power_max": min(max(p_max, 0.0), 10 * p_ref) / p_ref,
            "cap_lo": lo[0], "cap_hi": hi[0], "batch_lo": lo[1], "batch_hi": hi[1],
            "cap_rate": cfg.max_cap_rate_w_per_s * dt / cs,
            "batch_rate": cfg.max_batch_rate_per_s * dt / bs,
            "w_short": cfg.w_short if required is not None else 0.0,
        }, cfg.w_short2 if required is not None else 0.0)

        status, solver, t0 = "not_solved", None, time.perf_counter()
        for name in (cfg.solver, cfg.fallback_solver):
            if name is None:
                continue
            try:
                with warnings.catch_warnings():  # reported as status optimal_inaccurate
                    warnings.filterwarnings("ignore", message="Solution may be inaccurate")
                    qp.problem.solve(solver=name.upper(), warm_start=True)
                status = qp.problem.status
            except Exception as exc:  # noqa: BLE001 - solver errors are reported, never raised
                status = f"error: {type(exc).__name__}"
            solver = name.upper()
            if status in ("optimal", "optimal_inaccurate") and qp.xc.value is not None:
                break
        solve_s = time.perf_counter() - t0

        xc, xb = qp.xc.value, qp.xb.value
        if status in ("optimal", "optimal_inaccurate") and xc is not None and xb is not None \
                and np.isfinite(xc[0]) and np.isfinite(xb[0]):
            cap = float(xc[0]) * cs
            batch = lim.clamp_batch(int(round(float(xb[0]) * bs)))
            held = False
        else:  # hold what is in force, within the bounds (never above the budget)
            cap, batch, held = cap_now, lim.clamp_batch(int(round(b_now))), True
        # no chatter: a small move is not worth making unless a bound forces it
        if abs(cap - prev_cap) < cfg.cap_deadband_w and cap_lo_qos <= prev_cap <= cap_hi:
            cap = prev_cap
        cap = lim.clamp_cap_w(min(max(cap, cap_lo_qos), cap_hi))
        cap = self._hold_small_raise(s, prev_cap, cap)
        # the batch limit moves only where it binds (`search.batch_move`), towards the QP's
        b_prev = int(self._last.max_batch) if self._last is not None and \
            self._last.max_batch is not None else int(round(b_now))
        row = self._row_of(cap)
        nb = g.shape[1]
        j_prev = int(np.argmin(np.abs(g.batch[:nb] - b_prev)))
        hold = cfg.batch_dwell_s is not None and self._since_batch_up_s < cfg.batch_dwell_s
        batch = lim.clamp_batch(batch_move(s, b_prev, int(min(batch, b_hi)), row * nb + j_prev,
                                           hold=hold))
        if batch != b_prev and abs(batch - b_prev) <= cfg.batch_deadband * b_prev \
                and not (batch < b_prev and m.running > batch * (1.0 + cfg.batch_deadband)):
            batch = b_prev      # a move within the deadband is not worth a change
        self._since_batch_up_s = 0.0 if batch > b_prev else self._since_batch_up_s + s.dt_s
        self._diag = {"status": status, "solver": solver, "solve_time_s": solve_s,
                      "held": held, "pred_throughput_tok_s": thr0c, "pred_power_w": pw0c,
                      "batch_bound": b_hi, "cap_bound_w": cap_hi, "cap_qos_floor_w": cap_lo_qos,
                      **self.base_diagnostics(s)}
        return Action(power_cap_w=cap, max_batch=batch)
