"""The operating points at which ``palsctl analyze`` identifies and analyses the loops.

Operating points: the simulated plant, saturated (a backlog of requests with the workload's mean
lengths), at

* **load** low / medium / high: batch = 1/16, 1/4, 1/2 of the launch batch
  (``max_batch_launch``), at least 1;
* **budget** loose / tight: the per-GPU cap at 90 % / 65 % of the plant's natural draw per GPU
  at that batch (the saturated steady state at the default cap), kept above the power floor
  (the draw at the minimum cap) by 15 % of the range between them, within the cap limits.
  With a loose budget the cap binds a little: the PI's throughput loops (batch and margin) are
  the ones acting. With a tight budget the power target / budget governs: the budget loop.

Light: imports only the simulator's closed-form steady state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["OperatingPoint", "operating_points", "step_size", "LOAD_BATCH_FRACTION",
           "BUDGET_DRAW_FRACTION", "LOOPS_BY_BUDGET"]

LOAD_BATCH_FRACTION = {"low": 1 / 16, "medium": 1 / 4, "high": 1 / 2}
BUDGET_DRAW_FRACTION = {"loose": 0.90, "tight": 0.65}
LOOPS_BY_BUDGET = {"loose": ("batch", "margin"), "tight": ("budget",)}


@dataclass(frozen=True, kw_only=True)
class OperatingPoint:
    """A saturated operating point: batch and per-GPU cap, with the natural draw at that batch
    (the draw at the default cap: a cap above it does not bind) and the power floor (the draw at
    the minimum cap: the lowest clock; a cap below it changes nothing)."""

    name: str
    load: str
    budget: str
    max_batch: int
    power_cap_w: float
    natural_draw_per_gpu_w: float
    power_floor_per_gpu_w: float


def operating_points(*, model: str, gpu: str, num_gpus: int, max_batch_launch: int,
                     cap_min_w: float, cap_max_w: float, prompt_tokens: float,
                     output_tokens: float) -> list[OperatingPoint]:
    """The six operating points (load × budget) described in the module doc."""
    from palsctl.plants.sim import steady_state

    out = []
    for load, frac in LOAD_BATCH_FRACTION.items():
        b = max(1, int(round(max_batch_launch * frac)))
        ss = steady_state(model, gpu, num_gpus, max_batch=b, prompt_tokens=int(prompt_tokens),
                          output_tokens=int(output_tokens))
        draw = ss.power_w / num_gpus
        floor = steady_state(model, gpu, num_gpus, max_batch=b, power_cap_w=cap_min_w,
                             prompt_tokens=int(prompt_tokens),
                             output_tokens=int(output_tokens)).power_w / num_gpus
        for budget, dfrac in BUDGET_DRAW_FRACTION.items():
            # inside the range where the cap binds, clear of the floor
            cap: float = max(round(draw * dfrac), math.ceil(floor + 0.15 * (draw - floor)))
            cap = min(max(cap, cap_min_w), cap_max_w)
            out.append(OperatingPoint(name=f"{load}-load/{budget}-budget", load=load,
                                      budget=budget, max_batch=b, power_cap_w=float(cap),
                                      natural_draw_per_gpu_w=float(draw),
                                      power_floor_per_gpu_w=float(floor)))
    return out


def step_size(loop: str, pt: OperatingPoint) -> float:
    """The knob step of a step test of ``loop`` at ``pt`` (sequences or W per GPU).

    Large enough to rise above the throughput's token quantisation, small enough to stay in
    the range where the cap binds: the batch loop steps up by a quarter of the batch; the
    margin loop steps the cap *down* (the loose point sits at 90 % of the natural draw: there
    is little room above) by 20 % of the draw, staying 10 % of the binding range above the
    floor; the budget loop steps the cap up by 7 % of the draw."""
    if loop == "batch":
        return float(max(1, round(pt.max_batch / 4)))
    draw, floor = pt.natural_draw_per_gpu_w, pt.power_floor_per_gpu_w
    if loop == "margin":
        room = pt.power_cap_w - (floor + 0.1 * (draw - floor))
        return -float(max(2.0, round(min(0.2 * draw, room))))
    return float(max(2.0, round(0.07 * draw)))
