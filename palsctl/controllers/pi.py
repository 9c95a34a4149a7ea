"""`pi` — PI loops in velocity form on the batch limit and the power cap.

Velocity (incremental) form for every loop::

    Δu_k = Kp · (e_k − e_{k−1}) + Ki · dt · e_k,    u_k = u_applied_{k−1} + Δu_k

The increment is added to the value *in force* (read back from the measurement), so a loop
whose actuator saturated or was overridden by the safety guard does not wind up (anti-windup),
and taking over from any previous controller or manual setting is bumpless: the first step starts
from the knobs in force and initialises ``e_{k−1} = e_k`` (no proportional kick).

Loops and sign conventions (all errors positive when *more* of the actuator is needed):

* **batch loop** — throughput error → batch: ``e_b = max(r − y, 0)`` (tok/s) while the plant
  is saturated (else the loop is inactive: the throughput is then the offered load and a
  larger batch would not help), r the throughput target (the measured demand when the
  setpoint has none), y the measured generated throughput. Gains ``kp_batch_per_tok_s``
  (sequences per tok/s) and ``ki_batch_per_tok`` (sequences per token). A TPOT objective
  overrides: when the measured p90 TPOT exceeds it while saturated,
  ``e_b = −r · min((tpot − slo)/slo, 1)`` (shrink the batch) — throughput first, though: not
  while requests wait, since a smaller batch would only grow the queue for an objective the
  plant may reach at no batch (the margin loop below raises the clock for latency). A cut acts
  only as sequences finish, so the limit goes no further below the running count than one
  period's finishes (``y · dt /`` mean output tokens; anti-windup).
* **margin loop** — throughput margin → cap (tok/s): below saturation every request is served
  and the margin shows as speed. With a TPOT objective the loop holds the time per output
  token ``τ = max(running / y, p90 TPOT)`` (``running / y`` is the mean by Little's law: each
  running sequence yields one token per τ; a smooth signal, the running count integrates the
  arrivals; the measured p90, what the objective bounds, when it is slower) at
  ``τ_ref = tpot_ref_fraction · TPOT objective``: ``e_c = r · (τ − τ_ref) / τ_ref`` (tokens too
  slow: raise the cap; spare
  speed: lower it, toward the efficient low-clock operating point, at any load). Without a
  TPOT objective (or ``tpot_ref_fraction = None``) it tracks a utilisation
  ``u = running / batch`` of ``utilisation_ref`` instead: ``e_c = r · (u − u_ref) / u_ref``
  (at a fixed batch limit that reference means a per-token time that shrinks as the load
  grows, so it keeps the cap high at high load). With a backlog (requests
  waiting) ``e_c = max(e_c, r · (1 + margin) − y)``. A p90 TPOT over the objective adds
  ``r · min((tpot − slo)/slo, 1)`` (a faster clock is what shortens the time per token). Gains
  ``kp_cap_w_per_tok_s`` (W per tok/s) and ``ki_cap_w_per_tok`` (W per token), per GPU.
* **budget loop** — power over budget → cap: ``e_p = (P_ref − P)/N`` (W per GPU), P_ref the
  power target in power-target mode, else budget × (1 − budget_margin); P the measured total
  power over N GPUs. Dimensionless gains ``kp_cap_budget`` (W/W) and ``ki_cap_budget_per_s``
  (W/W per second). Only active in power-target mode or while power is above P_ref.

The cap command is the minimum of the loops' candidates (a min-selector; every loop integrates
from the one cap state, so the unselected loop does not wind up), then at most budget / N
(feed-forward: a budget step is met in the next period), then clamped to the limits. The cap
state is kept in float: the plant applies whole watts (rounded down), and integrating from the
applied value would drop every sub-watt increment (the loop would stall up to 1 W / (Ki·dt)
short of its target). The state is clamped to the actuator's range (anti-windup at
saturation) and follows the applied cap whenever the two differ by a cap step or more (the
guard, the budget or another controller moved it: anti-windup and bumpless transfer).

Default gains come from the stability analysis: a gain of the batch or budget loop left
``None`` in the Config is, at ``setup``, the one `palsctl.analysis.recommend_pi_gains`
recommends for the plant — the
simulator preset named by the plant's model and GPU, at its GPU count, launch batch, mean
request lengths and control period: the gains meeting a 6 dB gain margin and a 45° phase margin
at every load point ``palsctl analyze`` checks, with the fastest worst-case settling (memoised).
So the controller runs exactly what the analysis verified, and no loop takes minutes to settle.
On a plant that is not a preset the documented fallbacks ``FALLBACK_GAINS`` are used (the
Mixtral-8x7B / 4 × A100 recommendation); ``diagnostics()['gains_source']`` says which. The
margin loop keeps hand-tuned gains (see ``ANALYSED_GAINS``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from typing_extensions import override

from palsctl.controllers import common
from palsctl.controllers.qos import DemandEstimator
from palsctl.interfaces import Controller, ControllerConfig
from palsctl.types import Action, Limits, Measurement, PlantInfo, Setpoint

__all__ = ["ANALYSED_GAINS", "GAIN_NAMES", "PIConfig", "PIController", "recommended_gains",
           "resolve_gains"]

GAIN_NAMES = ("kp_batch_per_tok_s", "ki_batch_per_tok", "kp_cap_w_per_tok_s", "ki_cap_w_per_tok",
              "kp_cap_budget", "ki_cap_budget_per_s")
#: gains used where the plant is not a simulator preset: ``recommend_pi_gains`` for
#: Mixtral-8x7B on 4 × A100-SXM4-80GB, dt 1 s, launch batch 256, 1000 / 250 tokens
FALLBACK_GAINS = {"kp_batch_per_tok_s": 0.0031, "ki_batch_per_tok": 0.0117,
                  "kp_cap_w_per_tok_s": 0.002, "ki_cap_w_per_tok": 0.005,
                  "kp_cap_budget": 0.082, "ki_cap_budget_per_s": 0.71}
#: loops whose identified plant is the loop the controller closes: the analysis's
#: recommendation applies. The margin loop holds the time per output token (Little's law, see
#: the module doc) while the analysis identifies cap → throughput: its recommendation (e.g.
#: Ki = 0.38 W per token on Mixtral, 76× the hand-tuned 0.005) drove the cap through bursts
#: and raised QoS violations from 0.9 to 13 % on examples/moe_power_budget.toml, so its gains
#: stay the hand-tuned ``FALLBACK_GAINS`` until the analysis models that loop.
ANALYSED_GAINS = ("kp_batch_per_tok_s", "ki_batch_per_tok", "kp_cap_budget",
                  "ki_cap_budget_per_s")


@functools.lru_cache(maxsize=32)
def recommended_gains(model: str, gpu: str, num_gpus: int, max_batch_launch: int,
                      prompt_tokens: float, output_tokens: float, dt_s: float
                      ) -> dict[str, float] | None:
    """`palsctl.analysis.recommend_pi_gains` for a simulator preset (memoised); None when the
    model or GPU is not a preset."""
    from palsctl.analysis import recommend_pi_gains
    from palsctl.errors import PalsctlError

    try:
        return dict(recommend_pi_gains(dt_s=dt_s, model=model, gpu=gpu, num_gpus=num_gpus,
                                       max_batch_launch=max_batch_launch,
                                       prompt_tokens=prompt_tokens,
                                       output_tokens=output_tokens).params())
    except (PalsctlError, KeyError, ValueError):
        return None


def resolve_gains(config: "PIConfig", *, model: str | None, gpu: str | None, num_gpus: int,
                  max_batch_launch: int, prompt_tokens: float | None,
                  output_tokens: float | None, dt_s: float) -> tuple[dict[str, float], str]:
    """The gains a `PIController` with ``config`` runs on this plant, and where they come from
    (``"config"``: all given; ``"analysis"``: the None ones recommended for the preset;
    ``"fallback"``: not a preset, ``FALLBACK_GAINS``). `palsctl analyze` analyses these."""
    given = {n: getattr(config, n) for n in GAIN_NAMES}
    if all(v is not None for v in given.values()):
        return {n: float(v) for n, v in given.items()}, "config"
    rec = None
    if model and gpu:
        rec = recommended_gains(str(model), str(gpu), int(num_gpus), int(max_batch_launch),
                                float(round(prompt_tokens or 1000.0)),
                                float(round(output_tokens or 250.0)), float(dt_s))
    base = dict(FALLBACK_GAINS)
    if rec is not None:
        base.update({n: rec[n] for n in ANALYSED_GAINS})
    return ({n: float(v if v is not None else base[n]) for n, v in given.items()},
            "analysis" if rec is not None else "fallback")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PIConfig(ControllerConfig):
    """Gains (units in the names) and options of `PIController`; see the module docstring for the
    loops and their sign conventions. ``margin``: capacity headroom kept over the target
    under a backlog (fraction). ``utilisation_ref``: running sequences / batch limit the margin
    loop holds. ``budget_margin``: fraction of the budget kept free by the budget loop.
    ``latency_margin``: the TPOT terms act above TPOT objective × (1 − latency_margin).
    ``tpot_ref_fraction``: the margin loop holds the time per token (the slower of running /
    throughput and the p90 TPOT) at this fraction of the TPOT objective (None: the
    utilisation reference). ``demand_tau_s`` / ``burst_tau_s`` / ``demand_shift_s`` /
    ``demand_rise_ratio`` / ``demand_rise_s`` / ``drain_s``: the QoS-first demand the loops
    serve, the same as `search`'s (`palsctl.controllers.qos.DemandEstimator`: max(target,
    arrivals) + backlog; arrivals the larger of a slow and a fast average, the slow one reset by
    a lasting fall, the fast one by a lasting rise).
    ``cap_deadband_w`` / ``batch_deadband``: an output closer than this to the value in force is
    not applied — the loops keep integrating, so the knob moves once the change is worth it
    (no chatter). ``little_tau_s``: time constant over which running sequences and throughput
    are averaged for the time per token.
    ``dt_s``: control period the gains were tuned for (None: any)."""

    kp_batch_per_tok_s: float | None = None
    ki_batch_per_tok: float | None = None
    kp_cap_w_per_tok_s: float | None = None
    ki_cap_w_per_tok: float | None = None
    kp_cap_budget: float | None = None
    ki_cap_budget_per_s: float | None = None
    margin: float = 0.1
    utilisation_ref: float = 0.15
    budget_margin: float = 0.02
    latency_margin: float = 0.0
    # 0.5: over every example and the default (3 seeds), fewer QoS violations than 0.6 on
    # each (e.g. 0.42 vs 2.37 % on stale_target_overload) for 2-8 % fewer tokens/J
    tpot_ref_fraction: float | None = 0.5
    demand_tau_s: float = 60.0
    burst_tau_s: float | None = 10.0
    demand_shift_s: float | None = 15.0
    demand_rise_ratio: float | None = 2.5
    demand_rise_s: float = 2.0
    drain_s: float = 30.0
    cap_deadband_w: float = 5.0
    batch_deadband: int = 4
    little_tau_s: float = 0.0
    dt_s: float | None = None

    def __post_init__(self) -> None:
        for name in GAIN_NAMES:
            common.check_number(getattr(self, name), name, lo=0, allow_none=True)
        common.check_number(self.margin, "margin", lo=0, hi=2)
        common.check_number(self.utilisation_ref, "utilisation_ref", lo=0.01, hi=1.0)
        common.check_number(self.budget_margin, "budget_margin", lo=0, hi=0.5)
        common.check_number(self.latency_margin, "latency_margin", lo=0, hi=0.9)
        common.check_number(self.tpot_ref_fraction, "tpot_ref_fraction", lo=0.05, hi=1.0,
                            allow_none=True)
        common.check_number(self.demand_tau_s, "demand_tau_s", lo=0, lo_open=True)
        common.check_number(self.burst_tau_s, "burst_tau_s", lo=0, lo_open=True, allow_none=True)
        common.check_number(self.demand_shift_s, "demand_shift_s", lo=0, lo_open=True,
                            allow_none=True)
        common.check_number(self.demand_rise_ratio, "demand_rise_ratio", lo=1, lo_open=True,
                            allow_none=True)
        common.check_number(self.demand_rise_s, "demand_rise_s", lo=0, lo_open=True)
        common.check_number(self.drain_s, "drain_s", lo=0)
        common.check_number(self.cap_deadband_w, "cap_deadband_w", lo=0)
        common.check_int(self.batch_deadband, "batch_deadband", lo=0)
        common.check_number(self.little_tau_s, "little_tau_s", lo=0)
        common.check_number(self.dt_s, "dt_s", lo=0, lo_open=True, allow_none=True)


class PIController(Controller):
    """Velocity-form PI on batch (throughput error) and cap (throughput margin, budget).

    Parameters
    ----------
    config : PIConfig, optional
        The tunables (positional only).
    **params
        Or `PIConfig`'s fields as keyword parameters (gains, margins, time constants).

    Examples
    --------
    >>> PIController(kp_batch_per_tok_s=0.01).config.kp_batch_per_tok_s
    0.01
    """

    Config = PIConfig
    config: PIConfig
    name = "pi"
    aggressiveness = ("tpot_ref_fraction", (0.4, 0.5, 0.6, 0.7, 0.8))

    def __init__(self, config: PIConfig | None = None, /, **params: Any) -> None:
        super().__init__(config, **params)
        cfg = self.config
        self._demand = DemandEstimator(tau_s=cfg.demand_tau_s, drain_s=cfg.drain_s,
                                       burst_tau_s=cfg.burst_tau_s, shift_s=cfg.demand_shift_s,
                                       rise_ratio=cfg.demand_rise_ratio, rise_s=cfg.demand_rise_s)
        self.reset()

    @override
    def setup(self, *, limits: Limits, dt_s: float, plant_info: PlantInfo | None) -> None:
        """Bind to the plant; gains left None become the analysis's recommendation for it."""
        info = plant_info
        self.gains, self.gains_source = resolve_gains(
            self.config, model=getattr(info, "model", None), gpu=getattr(info, "gpu", None),
            num_gpus=int(getattr(info, "num_gpus", limits.num_gpus)),
            max_batch_launch=int(limits.max_batch_max),
            prompt_tokens=getattr(info, "prompt_tokens_mean", None),
            output_tokens=getattr(info, "output_tokens_mean", None), dt_s=float(dt_s))
        super().setup(limits=limits, dt_s=dt_s, plant_info=plant_info)

    @override
    def reset(self) -> None:
        self._e_prev: dict[str, float | None] = {"batch": None, "cap": None, "budget": None}
        self._batch: float | None = None  # continuous batch state (rounded on output)
        self._cap_w: float | None = None
        self._out: tuple[float, int] | None = None   # (cap, batch) last applied
        self._run_avg: float | None = None
        self._thr_avg: float | None = None
        self._diag: dict[str, Any] = {}
        if hasattr(self, "_demand"):
            self._demand.reset()

    def _increment(self, loop: str, e: float | None, kp: float, ki: float, dt: float) -> float:
        """Velocity-form increment; a loop that is inactive (e None) forgets its last error so
        that it re-enters without a kick (bumpless)."""
        if e is None or not math.isfinite(e):
            self._e_prev[loop] = None
            return 0.0
        prev = self._e_prev[loop]
        if prev is None:
            prev = e
        self._e_prev[loop] = e
        return kp * (e - prev) + ki * dt * e

    @override
    def step(self, measurement: Measurement, setpoint: Setpoint) -> Action:
        lim = self.limits
        if lim is None:
            raise RuntimeError("PIController.step() called before setup()")
        cfg, m = self.config, measurement
        dt = float(self.dt_s or m.window_s or 1.0)

        # the knobs in force (bumpless start; anti-windup through the applied values)
        cap_now = m.power_cap_w if m.power_cap_w is not None else (
            self._cap_w if self._cap_w is not None else lim.power_cap_default_w)
        b_now = float(m.max_batch) if m.max_batch is not None else (
            self._batch if self._batch is not None else float(lim.max_batch_max))
        out = self._out
        if self._batch is None or (abs(round(self._batch) - b_now) >= 1 and (
                out is None or b_now != out[1])):
            self._batch = b_now  # overridden from outside: continue from what is in force
        # the cap integrates in float: the plant applies whole watts (rounded down), so
        # integrating from the applied value would drop every sub-watt increment. The state
        # follows the applied cap only when that differs by a watt or more (clamped by the
        # guard, the limits or a previous controller: anti-windup and bumpless transfer).
        if self._cap_w is None or (abs(self._cap_w - cap_now) >= max(1.0, lim.power_cap_step_w)
                                   and (out is None or abs(cap_now - out[0]) >= 1.0)):
            self._cap_w = float(cap_now)
        cap_state = self._cap_w

        budget = setpoint.power_budget_w
        ceiling = lim.power_cap_max_w if budget is None else max(
            lim.power_cap_min_w,
            min(lim.power_cap_max_w, lim.per_gpu_w(budget * (1.0 - cfg.budget_margin))))

        if m.stale:  # hold; the guard reacts to stale data
            cap = lim.clamp_cap_w(min(cap_state, ceiling))
            self._cap_w = cap
            self._diag = {"held": True}
            b = lim.clamp_batch(round(self._batch))
            self._out = (cap, b)
            return Action(power_cap_w=cap, max_batch=b)

        out_mean = self.plant_info.output_tokens_mean if self.plant_info is not None else None
        r = self._demand.update(m, setpoint, dt_s=dt, output_tokens_mean=out_mean).demand_tok_s
        y = m.throughput_tok_s
        saturated = common.is_saturated(m, b_now)

        # batch loop: throughput error -> batch (only informative while saturated); a TPOT
        # objective overrides and shrinks the batch
        slo, tpot = setpoint.tpot_slo_s, m.tpot_p90_s
        if slo:  # the loops aim below the objective by the latency margin
            slo = slo * (1.0 - cfg.latency_margin)
        over_slo = bool(slo) and slo is not None and tpot is not None and tpot > slo
        # relative excess over the objective, at most 1: a window at 8× the objective (a long
        # prefill stalls every decode in it) asks no harder than one at twice it, else one such
        # window throws the batch from hundreds to 1 and the throughput loop has to climb back
        excess = 0.0
        if over_slo:
            assert tpot is not None and slo is not None
            excess = min((tpot - slo) / slo, 1.0)
        e_b = None
        if r is not None:
            # below saturation the loop is inactive, not at zero error: leaving saturation
            # must not take the last raise back through the proportional term
            e_b = max(r - y, 0.0) if saturated else None
            # throughput before latency: the batch shrinks for the TPOT objective only while no
            # request waits (with a queue a smaller batch only grows it, for an objective the
            # plant may reach at no batch; the cap loop still raises the clock for latency)
            if over_slo and saturated and m.waiting <= 0:
                e_b = -r * excess
        gn = self.gains
        db = self._increment("batch", e_b, gn["kp_batch_per_tok_s"], gn["ki_batch_per_tok"], dt)
        if db < 0 and out_mean and out_mean > 0:
            # anti-windup: a cut acts only as sequences finish (about y / out_mean per second),
            # so the limit goes no further below the running count than one period's finishes;
            # else one window far over the objective throws it from hundreds to 1
            floor = m.running - max(1.0, y * dt / out_mean)
            db = max(db, min(0.0, floor - self._batch))
        self._batch = min(max(self._batch + db, lim.max_batch_min), lim.max_batch_max)

        # margin loop: estimated capacity vs target -> cap
        cand_margin = ceiling
        e_c = None
        if r is not None:
            # below saturation spare capacity shows as speed (or as free batch slots)
            tref = (setpoint.tpot_slo_s * cfg.tpot_ref_fraction
                    if setpoint.tpot_slo_s and cfg.tpot_ref_fraction else None)
            # Little's law over a few seconds (a one-second window of a prefill stall has almost
            # no output and would read as an absurd time per token)
            k = 1.0 - math.exp(-dt / cfg.little_tau_s) if cfg.little_tau_s > 0 else 1.0
            self._run_avg = m.running if self._run_avg is None else \
                self._run_avg + k * (m.running - self._run_avg)
            self._thr_avg = y if self._thr_avg is None else self._thr_avg + k * (y - self._thr_avg)
            if tref is not None and self._thr_avg > 0:
                # Little's law: running / throughput is the mean time per output token; the
                # measured p90 TPOT (what the objective bounds) when that is slower
                little = self._run_avg / self._thr_avg
                tau = little if tpot is None else max(little, tpot)
                e_c = r * (tau - tref) / tref
            else:
                u = m.running / max(b_now, 1.0)
                e_c = r * (u - cfg.utilisation_ref) / cfg.utilisation_ref
            if m.waiting > 0:  # backlog: the capacity itself is measured
                e_c = max(e_c, r * (1 + cfg.margin) - y)
            if over_slo:  # too slow per token: a faster clock is what helps
                e_c = max(e_c, 0.0) + r * excess
            cand_margin = cap_state + self._increment("cap", e_c, gn["kp_cap_w_per_tok_s"],
                                                    gn["ki_cap_w_per_tok"], dt)
        else:
            self._increment("cap", None, 0, 0, dt)
        # budget / power-target loop -> cap
        cand_budget = math.inf
        e_p = None
        if setpoint.power_target_w is not None:
            p_ref = setpoint.power_target_w
        elif budget is not None and m.power_w > budget * (1 - cfg.budget_margin):
            p_ref = budget * (1 - cfg.budget_margin)
        else:
            p_ref = None
        if p_ref is not None:
            e_p = lim.per_gpu_w(p_ref - m.power_w)
            cand_budget = cap_state + self._increment("budget", e_p, gn["kp_cap_budget"],
                                                    gn["ki_cap_budget_per_s"], dt)
        else:
            self._increment("budget", None, 0, 0, dt)

        cap_cmd = min(cand_margin, cand_budget, ceiling)
        cap = lim.clamp_cap_w(cap_cmd)
        # float state, clamped to the actuator's range only (anti-windup at saturation)
        self._cap_w = min(max(cap_cmd, lim.power_cap_min_w), lim.power_cap_max_w)
        batch = lim.clamp_batch(round(self._batch))
        # deadbands: a small change is not applied (the state keeps integrating); a cut to fit
        # the budget is always applied
        if out is not None:
            if abs(cap - out[0]) < cfg.cap_deadband_w and out[0] <= ceiling:
                cap = lim.clamp_cap_w(out[0])
            if abs(batch - out[1]) < cfg.batch_deadband and m.waiting <= 0:
                batch = out[1]
        self._out = (cap, batch)
        self._diag = {"e_batch_tok_s": e_b, "e_cap_tok_s": e_c, "e_budget_w": e_p,
                      "batch_continuous": self._batch, "cap_margin_w": _finite(cand_margin),
                      "cap_budget_w": _finite(cand_budget), "saturated": saturated,
                      "selected": "budget" if cand_budget < cand_margin else "margin",
                      "gains_source": self.gains_source}
        return Action(power_cap_w=cap, max_batch=batch)

    @override
    def diagnostics(self) -> dict[str, Any]:
        return dict(self._diag)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
