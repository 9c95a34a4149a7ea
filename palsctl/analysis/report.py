"""Stability analysis of an experiment's `pi` loops at several operating points.

Operating points: the simulated plant of the experiment, saturated (a backlog of requests with
the workload's mean lengths), at

* **load** low / medium / high: batch = 1/16, 1/4, 1/2 of the launch batch
  (``max_batch_launch``), at least 1;
* **budget** loose / tight: the per-GPU cap at 90 % / 65 % of the plant's natural draw per GPU
  at that batch (the saturated steady state at the default cap), kept above the power floor
  (the draw at the minimum cap) by 15 % of the range between them, within the cap limits.
  With a loose budget the cap binds a little: the PI's throughput loops (batch and margin) are
  the ones acting. With a tight budget the power target / budget governs: the budget loop.

For every loop at every point: an `FOPDT` identified from a step test on the simulated plant
(noise off), the same with the gain taken from the offline model's gradients when a model is
given (lag and dead time from the step test: the model is static), and for each the analysis
of the configured PI gains (`analyze_loop`) and the gains recommended for that model.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from palsctl.analysis.identify import fopdt_from_gradients, identify_from_step_test, step_test
from palsctl.analysis.points import (
    BUDGET_DRAW_FRACTION,
    LOAD_BATCH_FRACTION,
    LOOPS_BY_BUDGET,
    OperatingPoint,
    operating_points,
    step_size,
)
from palsctl.analysis.stability import (
    FOPDT,
    LoopAnalysis,
    StabilityMap,
    analyze_loop,
    recommend_gains,
    stability_map,
)
from palsctl.errors import ConfigError

__all__ = ["OperatingPoint", "LoopReport", "AnalysisReport", "operating_points", "pi_gains",
           "analyze_points", "plot_maps", "map_grid", "fmt", "LOAD_BATCH_FRACTION",
           "BUDGET_DRAW_FRACTION"]

@dataclass(frozen=True, kw_only=True)
class LoopReport:
    """One loop at one operating point, for one plant model (step test or model gradients)."""

    point: OperatingPoint
    loop: str
    model_source: str
    analysis: LoopAnalysis
    recommended_kp: float | None
    recommended_ki: float | None
    recommended_settling_s: float | None
    notes: tuple[str, ...] = ()
    smap: StabilityMap | None = field(default=None, repr=False, compare=False)

    def warnings(self) -> list[str]:
        return self.analysis.warnings()

    def to_dict(self) -> dict[str, Any]:
        return {"point": self.point.name, "load": self.point.load, "budget": self.point.budget,
                "max_batch": self.point.max_batch, "power_cap_w": self.point.power_cap_w,
                "natural_draw_per_gpu_w": self.point.natural_draw_per_gpu_w,
                "power_floor_per_gpu_w": self.point.power_floor_per_gpu_w,
                "loop": self.loop, "model_source": self.model_source,
                **self.analysis.to_dict(),
                "recommended": {"kp": self.recommended_kp, "ki": self.recommended_ki,
                                "settling_time_s": self.recommended_settling_s},
                "notes": list(self.notes)}


@dataclass(kw_only=True)
class AnalysisReport:
    """Everything `analyze_points` found."""

    experiment: str
    plant: dict[str, Any]
    dt_s: float
    gains: dict[str, tuple[float, float]]
    loops: list[LoopReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def any_unstable(self) -> bool:
        return any(not r.analysis.stable for r in self.loops)

    @property
    def any_under_margins(self) -> bool:
        return any(not r.analysis.meets_margins for r in self.loops)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers become None)."""
        return _clean({"experiment": self.experiment, "plant": self.plant, "dt_s": self.dt_s,
                "gains": {k: {"kp": v[0], "ki": v[1]} for k, v in self.gains.items()},
                "any_unstable": self.any_unstable, "any_under_margins": self.any_under_margins,
                "loops": [r.to_dict() for r in self.loops], "notes": list(self.notes)})


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):   # numpy scalars
        return _clean(x.item())
    return x


def pi_gains(gains) -> dict[str, tuple[float, float]]:
    """(Kp, Ki) of each loop, in the loop's units (see `identify.LOOPS`), from the gains a `pi`
    controller runs (a dict of `PIConfig` gain names, `palsctl.controllers.pi.resolve_gains`,
    or a `PIConfig` whose gains are all set)."""
    g = gains if isinstance(gains, dict) else {
        k: getattr(gains, k) for k in ("kp_batch_per_tok_s", "ki_batch_per_tok",
                                       "kp_cap_w_per_tok_s", "ki_cap_w_per_tok",
                                       "kp_cap_budget", "ki_cap_budget_per_s")}
    return {"batch": (float(g["kp_batch_per_tok_s"]), float(g["ki_batch_per_tok"])),
            "margin": (float(g["kp_cap_w_per_tok_s"]), float(g["ki_cap_w_per_tok"])),
            "budget": (float(g["kp_cap_budget"]), float(g["ki_cap_budget_per_s"]))}


def analyze_points(*, experiment: str, model: str, gpu: str, num_gpus: int,
                   max_batch_launch: int, dt_s: float, gains: dict[str, tuple[float, float]],
                   prompt_tokens: float = 200.0, output_tokens: float = 400.0,
                   power_model=None, points: list[OperatingPoint] | None = None,
                   min_gm_db: float = 6.0, min_pm_deg: float = 45.0, recommend: bool = True,
                   grid_points: int = 15, seed: int = 0) -> AnalysisReport:
    """Identify and analyse every loop at every operating point (see the module doc).

    ``gains``: (Kp, Ki) per loop name (`pi_gains`). ``power_model``: a `PowerPerfModel` whose
    gradients give a second estimate of each loop's gain (None: step tests only).
    """
    from palsctl.plants.sim import SimPlant

    make = functools.partial(SimPlant, model, gpu, num_gpus, dt_s=dt_s, seed=seed, noise=False,
                             max_batch_launch=max_batch_launch)
    probe = make()
    limits = probe.limits
    probe.close()
    if points is None:
        points = operating_points(model=model, gpu=gpu, num_gpus=num_gpus,
                                  max_batch_launch=max_batch_launch,
                                  cap_min_w=limits.power_cap_min_w,
                                  cap_max_w=limits.power_cap_max_w,
                                  prompt_tokens=prompt_tokens, output_tokens=output_tokens)
    report = AnalysisReport(experiment=experiment,
                            plant={"model": model, "gpu": gpu, "num_gpus": num_gpus,
                                   "max_batch_launch": max_batch_launch},
                            dt_s=dt_s, gains=dict(gains))
    for pt in points:
        for loop in LOOPS_BY_BUDGET[pt.budget]:
            kp, ki = gains[loop]
            test = step_test(make, loop=loop, power_cap_w=pt.power_cap_w, max_batch=pt.max_batch,
                             step=step_size(loop, pt), prompt_tokens=int(prompt_tokens),
                             output_tokens=int(output_tokens), seed=seed)
            fitted = identify_from_step_test(test)
            plants: list[FOPDT] = [fitted]
            notes: list[str] = []
            if power_model is not None:
                try:
                    g = power_model.gradients(pt.power_cap_w, pt.max_batch,
                                              prompt_tokens=prompt_tokens,
                                              output_tokens=output_tokens)
                    plants.append(fopdt_from_gradients(g, loop=loop, num_gpus=num_gpus,
                                                       dt_s=dt_s, window_s=fitted.window_s,
                                                       tau_s=fitted.tau_s,
                                                       delay_s=fitted.delay_s))
                except ConfigError as exc:
                    notes.append(f"model gradients unusable: {exc}")
            y_scale = float(abs(test.y[0])) or 1.0
            if fitted.fit_rms is not None and fitted.fit_rms > 0.05 * y_scale:
                notes.append(f"step-test fit RMS {fitted.fit_rms:.3g} is over 5 % of the "
                             f"output level: the output is not first order here")
            for p in plants:
                res = analyze_loop(p, kp=kp, ki=ki, min_gm_db=min_gm_db, min_pm_deg=min_pm_deg)
                rk = rki = rts = smap = None
                pnotes = list(notes) if p.source == "step-test" else []
                if abs(p.gain) < 1e-12:
                    pnotes.append("the knob has no effect on the output here (gain 0): the "
                                  "loop only integrates")
                elif recommend and p.source == "step-test":
                    smap = stability_map(p, *map_grid(p, kp, ki, grid_points))
                    rec = recommend_gains(p, smap=smap, min_gm_db=min_gm_db,
                                          min_pm_deg=min_pm_deg)
                    if rec.analysis is not None:
                        rk, rki = rec.kp, rec.ki
                        rts = rec.analysis.step.settling_time_s
                report.loops.append(LoopReport(point=pt, loop=loop, model_source=p.source,
                                               analysis=res, recommended_kp=rk,
                                               recommended_ki=rki, recommended_settling_s=rts,
                                               notes=tuple(pnotes), smap=smap))
    return report


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def map_grid(plant: FOPDT, kp: float, ki: float, n: int):
    """A (Kp, Ki) grid scaled to the plant (Kp to 1.5/|K|, Ki to 1.5/(|K|·dt): beyond the
    stability limit of a one-period-delay loop) and stretched to include the given gains."""
    import numpy as np

    g = abs(plant.gain)
    sign = 1.0 if plant.gain > 0 else -1.0
    kp_max = max(1.5 / g, 1.3 * abs(kp))
    ki_max = max(1.5 / (g * plant.dt_s), 1.3 * abs(ki))
    return (sign * np.linspace(0.0, kp_max, n), sign * np.linspace(ki_max / n, ki_max, n))


def plot_maps(report: AnalysisReport, out_dir) -> list[str]:
    """One stability-map PNG per loop and operating point (step-test model), marking the
    configured and the recommended gains. Returns the paths written."""
    from pathlib import Path

    from palsctl.analysis.stability import plot_stability_map

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in report.loops:
        if r.smap is None:
            continue
        p = r.analysis.plant
        rec = (r.recommended_kp, r.recommended_ki) if r.recommended_kp is not None else None
        path = out / f"{_slug(r.point.name)}_{r.loop}.png"
        plot_stability_map(r.smap, str(path), current=(r.analysis.kp, r.analysis.ki),
                           recommended=rec, min_gm_db=r.analysis.min_gm_db,
                           min_pm_deg=r.analysis.min_pm_deg,
                           title=f"{r.point.name}, {r.loop} loop: K={p.gain:.3g}, "
                                 f"tau={p.tau_s:.2f} s, theta={p.delay_s:.2f} s")
        paths.append(str(path))
    return paths


def fmt(x: float | None, spec: str = ".3g") -> str:
    """A number for a table: ``-`` for None/nan, ``inf`` for infinity."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)
