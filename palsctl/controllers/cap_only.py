"""`cap-only` — the PALS paper's "Adaptive Cap" baseline: a model-selected power cap with a PID
trim on the throughput error, the batch limit fixed by the operator.

The fixed batch defaults to the largest whose predicted p90 ITL meets the TPOT SLO at full power
(per the model; the launch limit without an SLO). Each step the cap is the lowest whose
predicted throughput at that batch reaches the operator's target × (1 + ``margin``) within the
budget (the measured demand when no target is set), plus a PI trim on ``target − measured``
(velocity form, while requests wait; it leaks 5 %/s otherwise; bounded by ``trim_max_w``). It
follows the operator's target as given: no queue, no arrival rate, no latency feedback — the
behaviour the QoS-first controllers improve on.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from typing_extensions import override

from palsctl.controllers import common
from palsctl.controllers.model_based import ModelBasedConfig, ModelBasedController, Situation
from palsctl.types import Action

__all__ = ["CapOnlyConfig", "CapOnlyController"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CapOnlyConfig(ModelBasedConfig):
    """``fixed_batch``: the batch limit held (None: the largest meeting the TPOT SLO at full
    power per the model). ``ki_w_per_tok`` / ``kp_w_per_tok_s``: PI trim gains (W per token,
    W per tok/s of throughput error); ``trim_max_w``: trim bound (W per GPU)."""

    fixed_batch: int | None = None
    kp_w_per_tok_s: float = 0.02
    ki_w_per_tok: float = 0.02
    trim_max_w: float = 100.0

    def __post_init__(self) -> None:
        super().__post_init__()
        common.check_int(self.fixed_batch, "fixed_batch", allow_none=True)
        for name in ("kp_w_per_tok_s", "ki_w_per_tok", "trim_max_w"):
            common.check_number(getattr(self, name), name, lo=0)


class CapOnlyController(ModelBasedController):
    """Model-selected cap + PI trim, fixed batch (see the module docstring).

    Parameters
    ----------
    config : CapOnlyConfig, optional
        The tunables (positional only).
    model : PowerPerfModel, optional
        The offline power-performance model (None: the Config's ``model_path``, or one
        profiled on the simulator's presets at setup).
    **params
        Or `CapOnlyConfig`'s fields as keyword parameters (``fixed_batch``, trim gains, ...).
    """

    Config = CapOnlyConfig
    config: CapOnlyConfig
    name = "cap-only"
    aggressiveness = ("margin", (0.4, 0.2, 0.1, 0.05, 0.0))

    @override
    def reset(self) -> None:
        super().reset()
        self._batch_j: int | None = None
        self._trim_w = 0.0
        self._e_prev: float | None = None

    @override
    def decide(self, s: Situation) -> Action:
        g, cfg, m, nb = s.grid, self.config, s.measurement, s.grid.shape[1]
        if self._batch_j is None:
            top = np.arange((g.shape[0] - 1) * nb, g.shape[0] * nb)
            ok = top[s.itl_ok[top]] if cfg.fixed_batch is None else top[:0]
            self._batch_j = int(ok.max() - top[0]) if ok.size else nb - 1
            if cfg.fixed_batch is not None:
                self._batch_j = g.index_of(None, cfg.fixed_batch) % nb
        j = self._batch_j
        target = s.setpoint.throughput_tok_s or m.demand_tok_s
        col = np.arange(j, g.cap_w.size, nb)
        ok = col[(g.cap_w[col] <= s.cap_ceiling_w + 1e-6)
                 & (s.throughput_tok_s[col] >= (target or 0.0) * (1 + cfg.margin))]
        base = float(g.cap_w[ok.min()]) if ok.size and target else s.cap_ceiling_w
        if target and not m.stale and m.waiting > 0:   # PI trim while the demand exists
            e = target - m.throughput_tok_s
            de = e - (self._e_prev if self._e_prev is not None else e)
            self._trim_w += cfg.kp_w_per_tok_s * de + cfg.ki_w_per_tok * s.dt_s * e
            self._e_prev = e
        else:                                           # no backlog: the trim leaks away
            self._trim_w *= 0.95 ** s.dt_s
            self._e_prev = None
        self._trim_w = min(max(self._trim_w, 0.0), cfg.trim_max_w)
        cap = self.bound_limits.clamp_cap_w(min(base + self._trim_w, s.cap_ceiling_w))
        self._diag = {"cap_model_w": base, "trim_w": self._trim_w, **self.base_diagnostics(s)}
        return Action(power_cap_w=cap, max_batch=int(round(g.batch[j])))
