"""Check an analysis against the simulated plant: run the `pi` controller's loop closed on a
`SimulatedPlant` through a setpoint step and measure what really happens.

Only the budget / power-target loop (cap → power) is isolated here: the run uses power-target
mode with a throughput target no configuration reaches (the regime of a tight budget: the
min-selector hands the cap to the budget loop, the margin loop only asks for more) and the
batch loop's gains at zero, so the batch stays at the operating point. The run goes through `palsctl.loop.run_loop` without
the safety guard (its rate limits are a further nonlinearity the linear analysis does not
model).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from palsctl.analysis.identify import backlog, backlog_size
from palsctl.analysis.stability import SETTLING_THRESHOLD, settling_time_of
from palsctl.interfaces import SimulatedPlant
from palsctl.types import Setpoint

__all__ = ["ClosedLoopRun", "run_power_step"]

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
