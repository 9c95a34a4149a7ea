"""Check an analysis against the simulated plant, and step-test any controller's closed loop.

* `verify_loop` closes one loop of the analysis — the PI in velocity form on one knob (cap or
  batch limit) against the measured output the analysis modelled (power per GPU or throughput)
  — on a saturated `SimulatedPlant` through a setpoint step, and compares the measured settling
  time and overshoot with the ones the analysis predicts. It runs the loop exactly as analysed
  (one loop, the other knob held at the operating point), not the whole `pi` controller, whose
  other loops, min-selector and guard are nonlinearities the linear analysis does not model.
* `run_power_step` runs the real `PIController`'s budget / power-target loop (cap → power):
  power-target mode with a throughput target no configuration reaches (the min-selector hands
  the cap to the budget loop) and the batch loop's gains at zero, through `palsctl.loop.run_loop`
  without the safety guard (its rate limits are a further nonlinearity).
* `controller_budget_step` is an empirical closed-loop step test of any registered controller
  (``search``, ``mpc``, ...): a saturated plant, a throughput target above what the budget
  allows (so the budget binds), and a budget step; it measures how the power follows.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from palsctl.analysis.identify import LOOPS, backlog, backlog_size
from palsctl.analysis.stability import (
    FOPDT,
    SETTLING_THRESHOLD,
    predicted_response,
    settling_time_of,
)
from palsctl.interfaces import SimulatedPlant
from palsctl.types import Action, Request, Setpoint

__all__ = ["ClosedLoopRun", "run_power_step", "Verification", "verify_loop", "run_pi_step",
           "BacklogWorkload", "ControllerStep", "controller_budget_step", "measured_step_metrics"]

_UNREACHABLE_TOK_S = 1e9


@dataclass(frozen=True, kw_only=True)
class ClosedLoopRun:
    """The measured response to a setpoint step at ``t = 0``.

    ``t_s[n] = n·dt`` counts from the first control step that saw the new setpoint;
    ``y[n]`` is the reading taken then (``y[0]`` covers the period before the step, so it is
    the pre-step level); ``y_normalised = (y − y[0]) / (r1 − y[0])``. ``u`` the applied cap.
    """

    t_s: np.ndarray
    y: np.ndarray
    u: np.ndarray
    r0: float
    r1: float
    y_normalised: np.ndarray

    def settling_time_s(self, *, final: str = "target") -> float:
        """±2 % settling time of the normalised response (``ct.step_info``'s definition) about
        the target (``final="target"``) or about the mean of the last quarter of the record
        (``final="measured"``: excludes a steady offset such as the cap's rounding deadband)."""
        yn = self.y_normalised
        if final == "measured":
            tail = yn[-max(4, len(yn) // 4):]
            yf = float(np.mean(tail))
            if not math.isfinite(yf) or abs(yf) < 1e-9:
                return math.nan
            yn = yn / yf
        return settling_time_of(self.t_s, yn)

    def decays(self, *, tail_fraction: float = 0.25) -> bool:
        """True when the oscillation dies out: the peak-to-peak swing of the normalised output
        over the last ``tail_fraction`` of the record is within the ±2 % band (0.04 of the
        step) and smaller than over the first ``tail_fraction``."""
        yn = self.y_normalised[1:]
        n = max(4, int(len(yn) * tail_fraction))
        head, tail = yn[:n], yn[-n:]
        swing_tail = float(np.ptp(tail))
        return swing_tail <= 2 * SETTLING_THRESHOLD and swing_tail < float(np.ptp(head))


def run_power_step(make_plant: Callable[..., SimulatedPlant], *, kp: float, ki_per_s: float,
                   power_cap_w: float, max_batch: int, step_w: float, warmup_s: float = 10.0,
                   record_s: float = 20.0, prompt_tokens: int = 200, output_tokens: int = 400,
                   seed: int = 0) -> ClosedLoopRun:
    """Closed-loop step of the power target with the `pi` controller's budget loop.

    The plant starts at ``power_cap_w`` (per GPU) and ``max_batch`` with a backlog; the power
    target is the plant's total power at that cap (``num_gpus × power_cap_w``), then steps by
    ``step_w`` (total W) at ``t = warmup_s``. The cap must bind (be below the plant's natural
    draw) for the loop to be the one analysed."""
    from palsctl.controllers.pi import PIConfig, PIController
    from palsctl.loop import run_loop

    plant = make_plant(power_cap_w=power_cap_w, max_batch=max_batch)
    try:
        dt = float(plant.dt_s)
        n = plant.limits.num_gpus
        total_s = warmup_s + record_s
        n_req = backlog_size(max_batch, total_s, output_tokens)
        plant.submit(backlog(n_req, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                             seed=seed))
        r0 = n * float(power_cap_w)
        r1 = r0 + float(step_w)

        def schedule(t_s: float) -> Setpoint:
            return Setpoint(throughput_tok_s=_UNREACHABLE_TOK_S,
                            power_target_w=r0 if t_s < warmup_s - 1e-9 else r1)

        # the linear loop that the analysis models: no output deadbands
        ctl = PIController(PIConfig(kp_batch_per_tok_s=0.0, ki_batch_per_tok=0.0,
                                    kp_cap_budget=float(kp), ki_cap_budget_per_s=float(ki_per_s),
                                    cap_deadband_w=0.0, batch_deadband=0, dt_s=dt))
        rec = run_loop(plant, ctl, duration_s=total_s, schedule=schedule, guard=False)
    finally:
        plant.close()
    t = np.array([s.t_s for s in rec.steps])
    y = np.array([s.measurement.power_w for s in rec.steps])
    u = np.array([s.applied.power_cap_w for s in rec.steps], dtype=float)
    j0 = int(np.flatnonzero(t >= warmup_s - 1e-9)[0])
    ys = y[j0:]
    yn = (ys - ys[0]) / (r1 - ys[0])
    return ClosedLoopRun(t_s=(t[j0:] - t[j0]), y=ys, u=u[j0:], r0=r0, r1=r1, y_normalised=yn)


# --------------------------------------------------------------------------------------------
# One analysed loop, closed on the simulated plant
# --------------------------------------------------------------------------------------------
def run_pi_step(make_plant: Callable[..., SimulatedPlant], *, loop: str, kp: float, ki: float,
                power_cap_w: float, max_batch: int, step: float, warmup_s: float = 10.0,
                pre_s: float = 3.0, record_s: float = 30.0, prompt_tokens: int = 200,
                output_tokens: int = 400, seed: int = 0, repeats: int = 1
                ) -> tuple[ClosedLoopRun, float | None]:
    """Close the PI ``(kp, ki)`` of ``loop`` (see `palsctl.analysis.identify.LOOPS`) on a
    saturated plant and step its setpoint by ``step`` (output units) at ``t = 0``.

    The velocity form of `palsctl.analysis.stability.pi_tf` with zero initial conditions (the
    setpoint step reaches the proportional term), a float knob state clamped to the actuator's
    range (the plant applies whole watts / whole sequences), the other knob held. ``repeats``
    runs with other request lengths are averaged. Returns the mean response and the standard
    error of its tail (None for one run), in units of the step."""
    spec = LOOPS[loop]
    runs, tails = [], []
    for r in range(repeats):
        plant = make_plant(power_cap_w=power_cap_w, max_batch=max_batch)
        try:
            dt = float(plant.dt_s)
            lim = plant.limits
            n = lim.num_gpus
            n_warm, n_pre = int(round(warmup_s / dt)), max(1, int(round(pre_s / dt)))
            n_rec = max(3, int(round(record_s / dt)))
            plant.submit(backlog(backlog_size(max_batch, warmup_s + pre_s + record_s,
                                              output_tokens), prompt_tokens=prompt_tokens,
                                 output_tokens=output_tokens, seed=seed + r))

            def read(plant=plant, dt=dt, n=n) -> float:
                plant.advance(dt)
                m = plant.read()
                return m.power_w / n if spec.output == "power_per_gpu" else m.throughput_tok_s

            for _ in range(n_warm):
                read()
            y0 = float(np.mean([read() for _ in range(n_pre)]))
            r1 = y0 + float(step)
            u = float(power_cap_w if spec.knob == "cap" else max_batch)
            lo, hi = ((lim.power_cap_min_w, lim.power_cap_max_w) if spec.knob == "cap"
                      else (lim.max_batch_min, lim.max_batch_max))
            e_prev = 0.0
            ys, us = [], []
            for k in range(n_rec):
                y = read() if k else y0     # y[0]: the level the step starts from
                e = r1 - y
                u = min(max(u + kp * (e - e_prev) + ki * dt * e, lo), hi)
                e_prev = e
                if spec.knob == "cap":
                    plant.apply(Action(power_cap_w=u))
                else:
                    plant.apply(Action(max_batch=int(round(u))))
                ys.append(y)
                us.append(u)
        finally:
            plant.close()
        runs.append(np.asarray(ys))
        tails.append(np.asarray(us))
    Y = np.asarray(runs)
    y = Y.mean(axis=0)
    t = np.arange(len(y)) * dt
    yn = (y - y[0]) / float(step)
    se = None
    if repeats > 1:
        tail = Y[:, -max(4, Y.shape[1] // 4):]
        se = float(np.sqrt(np.mean(tail.var(axis=0, ddof=1)) / repeats)) / abs(float(step))
    run = ClosedLoopRun(t_s=t, y=y, u=np.asarray(tails).mean(axis=0), r0=float(y[0]),
                        r1=float(y[0] + step), y_normalised=yn)
    return run, se


def measured_step_metrics(t_s: np.ndarray, y_normalised: np.ndarray, *, band: float
                          ) -> tuple[float, float, float]:
    """(settling time within ±``band`` of the response's own final value — the mean of its last
    quarter —, overshoot in per cent of that final value, the final value) of a measured
    response normalised to the step."""
    yn = np.asarray(y_normalised, dtype=float)
    tail = yn[-max(4, len(yn) // 4):]
    yf = float(np.mean(tail))
    if not math.isfinite(yf) or abs(yf) < 1e-9:
        return math.nan, math.nan, yf
    ts = settling_time_of(t_s, yn / yf, threshold=band)
    overshoot = max(0.0, (float(np.max(yn / yf)) - 1.0) * 100.0)
    return ts, overshoot, yf


@dataclass(frozen=True, kw_only=True)
class Verification:
    """Predicted vs measured response of one analysed loop to a setpoint step.

    ``band``: the settling band used for both (±2 %, widened to twice the noise left in the
    averaged measured response, or to twice the knob's resolution in output units, when that is
    larger); settling times in seconds, overshoots in
    per cent. ``agrees``: settling within 30 % (at least two control periods) and overshoot
    within 10 points plus the band, and the measured response settles."""

    predicted_settling_s: float
    measured_settling_s: float
    predicted_overshoot_pct: float
    measured_overshoot_pct: float
    band: float
    step: float
    repeats: int
    run: ClosedLoopRun

    @property
    def agrees(self) -> bool:
        """Whether the measured settling time agrees with the prediction."""
        p, m = self.predicted_settling_s, self.measured_settling_s
        if not (math.isfinite(p) and math.isfinite(m)):
            return False
        dt = float(self.run.t_s[1] - self.run.t_s[0]) if len(self.run.t_s) > 1 else 1.0
        return abs(m - p) <= max(0.3 * p, 2 * dt) and abs(
            self.measured_overshoot_pct - self.predicted_overshoot_pct) <= 10 + 100 * self.band

    def text(self) -> str:
        """One line comparing predicted and measured settling."""
        def s(x: float) -> str:
            return f"{x:.3g} s" if math.isfinite(x) else "not settled"
        verdict = "agrees" if self.agrees else "DISAGREES"
        return (f"simulated closed loop {verdict}: settling {s(self.measured_settling_s)} vs "
                f"{s(self.predicted_settling_s)} predicted (±{100 * self.band:.0f} % band), "
                f"overshoot {self.measured_overshoot_pct:.0f} % vs "
                f"{self.predicted_overshoot_pct:.0f} %")

    def to_dict(self) -> dict[str, Any]:
        """The comparison as a JSON-serialisable dict (non-finite numbers as None)."""
        def f(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None
        return {"predicted_settling_time_s": f(self.predicted_settling_s),
                "measured_settling_time_s": f(self.measured_settling_s),
                "predicted_overshoot_pct": f(self.predicted_overshoot_pct),
                "measured_overshoot_pct": f(self.measured_overshoot_pct),
                "band": self.band, "step": self.step, "repeats": self.repeats,
                "agrees": self.agrees}


def verify_loop(make_plant: Callable[..., SimulatedPlant], plant: FOPDT, *, loop: str,
                kp: float, ki: float, power_cap_w: float, max_batch: int, step: float,
                repeats: int = 1, max_record_s: float = 300.0, prompt_tokens: int = 200,
                output_tokens: int = 400, seed: int = 0) -> Verification:
    """Run `run_pi_step` with a setpoint step of ``step`` (output units) and compare with the
    response `predicted_response` gives for the identified ``plant``. The record lasts three
    predicted settling times (at least 20 periods, at most ``max_record_s``)."""
    dt = plant.dt_s
    n_max = int(max_record_s / dt)
    y_pred = predicted_response(plant, kp=kp, ki=ki, n=n_max)
    t_pred = np.arange(n_max) * dt
    ts2 = settling_time_of(t_pred, y_pred)
    record_s = min(max_record_s, max(20 * dt, 3 * ts2 if math.isfinite(ts2) else max_record_s))
    run, se = run_pi_step(make_plant, loop=loop, kp=kp, ki=ki, power_cap_w=power_cap_w,
                          max_batch=max_batch, step=step, record_s=record_s,
                          prompt_tokens=prompt_tokens, output_tokens=output_tokens, seed=seed,
                          repeats=repeats)
    # the band: ±2 %, or wider when the noise left in the averaged response or the knob's
    # resolution (whole watts / whole sequences, seen through the gain) would not let a
    # settled loop stay inside it
    probe = make_plant(power_cap_w=power_cap_w, max_batch=max_batch)
    resolution = probe.limits.power_cap_step_w if LOOPS[loop].knob == "cap" else 1.0
    probe.close()
    band = max(SETTLING_THRESHOLD, 2 * (se or 0.0),
               2 * abs(plant.gain) * resolution / abs(float(step)))
    n = len(run.t_s)
    ts_pred = settling_time_of(t_pred[:n], y_pred[:n], threshold=band)
    os_pred = max(0.0, (float(np.max(y_pred[:n])) - 1.0) * 100.0)
    ts_meas, os_meas, _ = measured_step_metrics(run.t_s, run.y_normalised, band=band)
    return Verification(predicted_settling_s=ts_pred, measured_settling_s=ts_meas,
                        predicted_overshoot_pct=os_pred, measured_overshoot_pct=os_meas,
                        band=band, step=float(step), repeats=repeats, run=run)


# --------------------------------------------------------------------------------------------
# Empirical closed-loop step test of any controller
# --------------------------------------------------------------------------------------------
class BacklogWorkload:
    """A workload whose requests all arrive at ``t = 0`` (for `palsctl.loop.run_loop`): a
    backlog that keeps the plant saturated. ``mean_prompt_tokens``/``mean_output_tokens`` tell
    the controllers' models the lengths."""

    def __init__(self, requests: list[Request], *, prompt_tokens: float,
                 output_tokens: float) -> None:
        self._requests = list(requests)
        self.mean_prompt_tokens = float(prompt_tokens)
        self.mean_output_tokens = float(output_tokens)

    def requests_between(self, t0_s: float, t1_s: float) -> list[Request]:
        """List the requests arriving in [t0_s, t1_s) (seconds since the start)."""
        return [r for r in self._requests if t0_s <= r.arrival_s < t1_s]


@dataclass(frozen=True, kw_only=True)
class ControllerStep:
    """A controller's measured response to a budget step (total W) at ``t = 0``.

    ``settling_time_s``: into ±``band`` of the power's own final value (nan: not within the
    record); ``overshoot_pct`` beyond that final value, in per cent of the step;
    ``time_over_budget_s``: time the power spent over the new budget (by more than 1 %);
    ``final_power_w``; ``decays``: the record ends inside the band (the last quarter's swing
    within ±``band``); ``limit_cycle``: it does not, and that swing is at least half the first
    quarter's (a sustained oscillation, not a slow decay); ``tail_swing_pct``: that swing
    (peak to peak, per cent of the step). ``t_s``, ``power_w``, ``cap_w``,
    ``batch``: the record from the step on (``t_s[0]`` the last reading before it)."""

    controller: str
    budget_before_w: float
    budget_after_w: float
    settling_time_s: float
    overshoot_pct: float
    time_over_budget_s: float
    final_power_w: float
    band: float
    decays: bool
    limit_cycle: bool
    tail_swing_pct: float
    t_s: np.ndarray
    power_w: np.ndarray
    cap_w: np.ndarray
    batch: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """The step test as a JSON-serialisable dict (non-finite numbers as None)."""
        def f(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None
        return {"controller": self.controller, "budget_before_w": self.budget_before_w,
                "budget_after_w": self.budget_after_w,
                "settling_time_s": f(self.settling_time_s),
                "overshoot_pct": f(self.overshoot_pct),
                "time_over_budget_s": self.time_over_budget_s,
                "final_power_w": self.final_power_w, "band": self.band, "decays": self.decays,
                "limit_cycle": self.limit_cycle, "tail_swing_pct": self.tail_swing_pct}


def controller_budget_step(make_plant: Callable[..., SimulatedPlant], controller: Any, *,
                           max_batch: int, budget_before_w: float, budget_after_w: float,
                           throughput_target_tok_s: float, warmup_s: float = 30.0,
                           record_s: float = 60.0, prompt_tokens: int = 200,
                           output_tokens: int = 400, seed: int = 0) -> ControllerStep:
    """Empirical closed-loop step test of ``controller`` (any `Controller`): a plant from
    ``make_plant()`` saturated by a backlog, a throughput target above what either budget
    allows (so the budget binds), the budget ``budget_before_w`` for ``warmup_s`` then
    ``budget_after_w`` (total W). Runs through `palsctl.loop.run_loop` without the safety guard
    (the controller's own loop, not the guard's clamp)."""
    from palsctl.loop import run_loop

    plant = make_plant()
    try:
        dt = float(plant.dt_s)
        total_s = warmup_s + record_s
        reqs = backlog(backlog_size(max_batch, total_s, output_tokens),
                       prompt_tokens=prompt_tokens, output_tokens=output_tokens, seed=seed)
        wl = BacklogWorkload(reqs, prompt_tokens=prompt_tokens, output_tokens=output_tokens)

        def schedule(t_s: float) -> Setpoint:
            b = budget_before_w if t_s < warmup_s - 1e-9 else budget_after_w
            return Setpoint(throughput_tok_s=throughput_target_tok_s, power_budget_w=b)

        rec = run_loop(plant, controller, duration_s=total_s, schedule=schedule, workload=wl,
                       guard=False)
    finally:
        plant.close()
    t = np.array([s.t_s for s in rec.steps])
    p = np.array([s.measurement.power_w for s in rec.steps])
    j0 = int(np.flatnonzero(t >= warmup_s - 1e-9)[0])
    ts, ps = t[j0:] - t[j0], p[j0:]
    step = budget_after_w - float(ps[0])
    band = SETTLING_THRESHOLD
    if abs(step) < 1e-9:
        settle, overshoot, final = 0.0, 0.0, float(ps[-1])
        decays, limit_cycle, swing_tail = True, False, 0.0
    else:
        yn = (ps - ps[0]) / step
        settle, overshoot, yf = measured_step_metrics(ts, yn, band=band)
        final = float(ps[0] + yf * step)
        n = max(4, len(yn) // 4)
        swing_tail = float(np.ptp(yn[-n:]))
        decays = swing_tail <= 2 * band            # the record ends inside the band
        limit_cycle = not decays and swing_tail >= 0.5 * float(np.ptp(yn[1:n + 1]))
    over = float(np.sum((ps[1:] > budget_after_w * 1.01)) * dt)
    cap = np.array([s.applied.power_cap_w if s.applied.power_cap_w is not None else np.nan
                    for s in rec.steps[j0:]], dtype=float)
    batch = np.array([s.applied.max_batch if s.applied.max_batch is not None else np.nan
                      for s in rec.steps[j0:]], dtype=float)
    return ControllerStep(controller=rec.controller, budget_before_w=float(budget_before_w),
                          budget_after_w=float(budget_after_w), settling_time_s=settle,
                          overshoot_pct=overshoot, time_over_budget_s=over, final_power_w=final,
                          band=band, decays=decays, limit_cycle=limit_cycle,
                          tail_swing_pct=100.0 * swing_tail, t_s=ts, power_w=ps,
                          cap_w=cap, batch=batch)
