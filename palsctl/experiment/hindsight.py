"""`hindsight` — the best *fixed* configuration per segment of constant budget and target,
chosen in hindsight by simulating the candidates on the same trace, seed and plant.

A run is cut into segments wherever the power budget, the power target or the throughput
target changes by more than 1 % (the events `palsctl.metrics` scores settling on). For each
segment in turn, every candidate (cap, batch limit) of a grid is simulated over the segment from
the state the previous segments left (the plant is copied, queue and all), and scored on that
segment alone by `palsctl.metrics.summarize`. Candidate caps stay below the segment's budget ×
(1 − ``budget_margin``) ÷ GPUs — the budget discipline of the model-based controllers, which
keeps the measured power inside the budget despite the sensor's noise — and that ceiling is a
candidate itself. The choice is QoS first: among candidates within ``qos_slack`` (absolute) of
the lowest QoS violation rate any candidate reaches, the highest tokens/J. The run continues
from the chosen candidate's state. So for every segment no fixed
configuration of the grid has a lower violation rate by more than ``qos_slack``, or more tokens/J
at a violation rate within it: a true reference for fixed configurations — not for adaptive
control, which may beat it inside a segment.

Simulated plants only. Cost: candidates × the run's simulated time (a 900-s scenario with the
default grid of ~60 candidates takes about a minute).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

from palsctl.controllers.baselines import FixedConfig, FixedController
from palsctl.errors import ConfigError
from palsctl.experiment.build import build_plant, build_schedule, build_workload
from palsctl.experiment.schema import ExperimentConfig
from palsctl.loop import ClosedLoop, RunRecord
from palsctl.metrics import summarize

__all__ = ["DEFAULT_BATCHES", "HindsightChoice", "hindsight_run", "segments"]

DEFAULT_BATCHES = (16, 32, 64, 128, 192, 256)
DEFAULT_CAP_STEP_W = 25.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class HindsightChoice:
    """The configuration chosen for one segment ``[t0_s, t1_s)`` and its scores there."""

    t0_s: float
    t1_s: float
    power_cap_w: float
    max_batch: int
    qos_violation_rate: float | None
    tokens_per_joule: float | None
    candidates: int


class _Switchable(FixedController):
    """A fixed controller whose configuration the search replaces between segments."""

    name = "hindsight"

    def use(self, power_cap_w: float, max_batch: int) -> None:
        self.config = FixedConfig(power_cap_w=power_cap_w, max_batch=max_batch)


def _changed(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return (a is None) != (b is None)
    return abs(a - b) > 0.01 * max(abs(a), abs(b), 1e-12)


def segments(schedule: Callable[[float], Any], n_steps: int, dt_s: float, *,
             min_segment_s: float = 0.0) -> list[tuple[int, int]]:
    """Step ranges ``[k0, k1)`` of constant budget, power target and throughput target (each
    step ``k`` decides under ``schedule((k + 1)·dt_s)``). A change starts a new segment only
    once the current one lasted ``min_segment_s`` (a budget that follows a grid signal changes
    every step: its segments are then about that long)."""
    out, k0 = [], 0
    prev = schedule(dt_s)
    for k in range(1, n_steps):
        sp = schedule((k + 1) * dt_s)
        if any(_changed(getattr(sp, f), getattr(prev, f))
               for f in ("power_budget_w", "power_target_w", "throughput_tok_s")) \
                and (k - k0) * dt_s >= min_segment_s - 1e-9:
            out.append((k0, k))
            k0 = k
        prev = sp
    out.append((k0, n_steps))
    return out


def _score(summary: dict[str, Any]) -> tuple[float, float]:
    """(QoS violation rate, tokens/J) of a segment."""
    q = summary.get("qos_violation_rate")
    t = summary.get("tokens_per_joule")
    return (0.0 if q is None else float(q)), (0.0 if t is None else float(t))


def hindsight_run(cfg: ExperimentConfig, *, seed: int | None = None,
                  caps_w: Sequence[float] | None = None,
                  batches: Sequence[int] = DEFAULT_BATCHES, qos_slack: float = 0.0,
                  budget_margin: float = 0.015, min_segment_s: float = 60.0,
                  progress: Callable[[int, int], None] | None = None
                  ) -> tuple[RunRecord, list[HindsightChoice]]:
    """Simulate the hindsight reference of ``cfg`` (see the module doc).

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (simulated plant).
    seed : int, optional
        Overrides the experiment's seed.
    caps_w : sequence of float, optional
        Per-GPU caps to try (default: every 25 W from the minimum to the maximum limit); caps
        above a segment's budget × (1 − ``budget_margin``) ÷ GPUs are not tried there, that
        ceiling is.
    batches : sequence of int
        Batch limits to try.
    qos_slack : float
        Absolute QoS violation rate tolerated above the segment's best for more tokens/J.
    budget_margin : float
        Fraction of the budget kept free (as the model-based controllers' default).
    min_segment_s : float
        Shortest segment, seconds: a setpoint that changes more often (a grid signal) is cut
        into segments of about this length; within one, the candidates' caps stay below the
        segment's lowest budget (the fixed controller also lowers its cap to the budget in
        force).
    progress : callable, optional
        ``progress(done, total)`` after each simulated candidate.

    Returns
    -------
    (RunRecord, list of HindsightChoice)
        The stitched run (controller ``"hindsight"``) and the choice per segment.
    """
    seed = cfg.seed if seed is None else seed
    if cfg.duration_s is None:
        raise ConfigError("hindsight needs a finite duration_s", file=cfg.source,
                          key="duration_s")
    plant = build_plant(cfg, seed=seed)
    if not plant.info.simulated:
        raise ConfigError("hindsight needs the simulated plant", file=cfg.source, key="plant.kind")
    workload = build_workload(cfg, seed=seed)
    schedule = build_schedule(cfg, workload)
    lim = plant.limits
    if caps_w is None:
        n = int(math.floor((lim.power_cap_max_w - lim.power_cap_min_w) / DEFAULT_CAP_STEP_W))
        caps_w = [lim.power_cap_min_w + i * DEFAULT_CAP_STEP_W for i in range(n + 1)]
        caps_w.append(lim.power_cap_max_w)
    caps = sorted({lim.clamp_cap_w(c) for c in caps_w})
    bs = sorted({lim.clamp_batch(b) for b in batches})
    ctl = _Switchable(max_batch=bs[-1])
    guard = cfg.guard if cfg.guard_enabled else False
    loop = ClosedLoop(plant, ctl, schedule=schedule, workload=workload, guard=guard)
    n_steps = max(1, round(cfg.duration_s / loop.dt_s))
    segs = segments(schedule, n_steps, loop.dt_s, min_segment_s=min_segment_s)
    shared = {id(workload): workload, id(schedule): schedule}
    plans = []
    for k0, k1 in segs:
        budgets = [b for b in (schedule((k + 1) * loop.dt_s).power_budget_w
                               for k in range(k0, k1)) if b is not None]
        budget = min(budgets) if budgets else None
        top = lim.power_cap_max_w if budget is None else \
            lim.per_gpu_w(budget * (1.0 - budget_margin))
        cs = [c for c in caps if c <= top + 1e-9] or [caps[0]]
        if budget is not None and lim.clamp_cap_w(top) not in cs and top >= caps[0]:
            cs.append(lim.clamp_cap_w(top))
        plans.append([(c, b) for c in cs for b in bs])
    total, done = sum(len(p) for p in plans), 0
    choices: list[HindsightChoice] = []
    for (k0, k1), plan in zip(segs, plans):
        results = []
        for cap, batch in plan:
            branch = copy.deepcopy(loop, dict(shared))
            cast(_Switchable, branch.ctl.controller).use(cap, batch)
            for _ in range(k1 - k0):
                branch.step()
            part = dataclasses.replace(branch.record, steps=branch.record.steps[k0:k1],
                                       requests=[])
            results.append((_score(summarize(part)), cap, batch, branch))
            done += 1
            if progress is not None:
                progress(done, total)
        q_min = min(r[0][0] for r in results)
        ok = [r for r in results if r[0][0] <= q_min + qos_slack + 1e-12]
        (q, t), cap, batch, loop = max(ok, key=lambda r: (r[0][1], -r[0][0]))
        choices.append(HindsightChoice(t0_s=k0 * loop.dt_s, t1_s=k1 * loop.dt_s,
                                       power_cap_w=cap, max_batch=batch,
                                       qos_violation_rate=q, tokens_per_joule=t,
                                       candidates=len(plan)))
    plant_final = loop.plant
    plant_final.close()
    record = loop.record
    record.controller = "hindsight"
    record.meta.update({"experiment": cfg.name, "seed": seed, "hindsight": [
        dataclasses.asdict(c) for c in choices]})
    return record, choices
