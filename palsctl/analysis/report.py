"""Stability analysis of an experiment's loops at several operating points.

Operating points (`palsctl.analysis.points`): the simulated plant of the experiment, saturated,
at low / medium / high load and a loose / tight budget.

For every loop of `pi` at every point: an `FOPDT` identified from a step test on the simulated
plant (noise off; the throughput loops' tests repeated and averaged), the same with the gain
taken from the offline model's gradients when a model is given (lag and dead time from the step
test: the model is static), and for each the analysis of the configured PI gains
(`analyze_loop`) and the gains recommended for that model.

Each loop gets one **verdict**, shown with the model's fit to its step test beside it:

* ``unverified`` — the model does not explain its step test (`identify.assess_fit`): its poles
  and margins describe a model, not the loop, so they are no verdict;
* ``UNSTABLE`` / ``under margins`` — the model fits and the loop is unstable, or stable under the
  required gain / phase margins;
* ``sluggish`` — stable with the margins, but settling takes longer than ``max_settling_s``;
* ``prediction off`` — with ``verify``: a closed-loop simulation of the loop disagrees with the
  predicted settling time or overshoot;
* ``stable`` — none of the above.

Controllers that are not the linear PI (``search``, ``mpc``, ...) are analysed empirically
(`empirical_steps`): closed-loop budget steps on the simulated plant, measured.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from palsctl.analysis.identify import (
    FitQuality,
    StepTest,
    assess_fit,
    fopdt_from_gradients,
    identify_from_step_test,
    step_test,
)
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

__all__ = ["OperatingPoint", "LoopReport", "EmpiricalReport", "AnalysisReport",
           "operating_points", "pi_gains", "analyze_points", "empirical_steps", "plot_maps",
           "plot_bode", "plot_steps", "map_grid", "fmt", "LOAD_BATCH_FRACTION",
           "BUDGET_DRAW_FRACTION", "VERDICTS", "MAX_SETTLING_S", "MAX_VERIFY_BAND"]

#: Every verdict a loop can get, best first.
VERDICTS = ("stable", "sluggish", "under margins", "prediction off", "UNSTABLE", "unverified")
#: A loop settling slower than this (seconds) is flagged sluggish.
MAX_SETTLING_S = 60.0
#: A verification whose settling band has to widen beyond this (the noise of the simulated
#: output) is inconclusive.
MAX_VERIFY_BAND = 0.10


@dataclass(frozen=True, kw_only=True)
class LoopReport:
    """One loop at one operating point, for one plant model (step test or model gradients),
    with the model's fit to the step test (``fit``), the closed-loop check (``verification``,
    with ``verify``) and the resulting `verdict`."""

    point: OperatingPoint
    loop: str
    model_source: str
    analysis: LoopAnalysis
    recommended_kp: float | None
    recommended_ki: float | None
    recommended_settling_s: float | None
    notes: tuple[str, ...] = ()
    fit: FitQuality | None = None
    max_settling_s: float = MAX_SETTLING_S
    verification: Any = None
    smap: StabilityMap | None = field(default=None, repr=False, compare=False)
    test: StepTest | None = field(default=None, repr=False, compare=False)

    @property
    def verification_conclusive(self) -> bool:
        """Whether a closed-loop verification ran with a tight enough band to conclude."""
        v = self.verification
        return v is not None and v.band <= MAX_VERIFY_BAND

    @property
    def verdict(self) -> str:
        """One of `VERDICTS` (see the module doc)."""
        a = self.analysis
        if self.fit is None or not self.fit.ok:
            return "unverified"
        if not a.stable:
            return "UNSTABLE"
        if not a.meets_margins:
            return "under margins"
        if self.verification_conclusive and not self.verification.agrees:
            return "prediction off"
        ts = a.step.settling_time_s
        if not (math.isfinite(ts) and ts <= self.max_settling_s):
            return "sluggish"
        return "stable"

    def reason(self) -> str:
        """Why the verdict, in words."""
        v, a = self.verdict, self.analysis
        if v == "unverified":
            if self.fit is None:
                why = "no step test to check the model against"
            elif self.fit.verdict == "step lost in noise":
                why = ("the step test's response is lost in the output's noise: the model "
                       "cannot be checked, so its margins are no verdict")
            else:
                why = ("the first-order model does not describe this loop here: its margins "
                       "are no verdict")
            would = self._model_verdict()
            return why if would == "stable" else f"{why} (the model itself is {would})"
        if v == "UNSTABLE":
            return f"closed-loop spectral radius {a.spectral_radius:.3f} >= 1"
        if v == "under margins":
            return "; ".join(a.warnings())
        if v == "prediction off":
            return self.verification.text()
        if v == "sluggish":
            ts = a.step.settling_time_s
            return (f"settles in {fmt(ts)} s, over {self.max_settling_s:g} s" if math.isfinite(ts)
                    else "does not settle")
        return (f"GM >= {a.min_gm_db:g} dB, PM >= {a.min_pm_deg:g} deg, settling <= "
                f"{self.max_settling_s:g} s")

    def _model_verdict(self) -> str:
        """What the model alone says (as if it fitted)."""
        a = self.analysis
        if not a.stable:
            return "UNSTABLE"
        if not a.meets_margins:
            return "under margins"
        ts = a.step.settling_time_s
        if not (math.isfinite(ts) and ts <= self.max_settling_s):
            return f"sluggish: settling {fmt(ts)} s"
        return "stable"

    def warnings(self) -> list[str]:
        """One line per reason the loop is not plainly stable (empty when it is)."""
        return [] if self.verdict == "stable" else [f"{self.verdict}: {self.reason()}"]

    def to_dict(self) -> dict[str, Any]:
        """The loop's analysis as a JSON-serialisable dict."""
        return {"point": self.point.name, "load": self.point.load, "budget": self.point.budget,
                "max_batch": self.point.max_batch, "power_cap_w": self.point.power_cap_w,
                "natural_draw_per_gpu_w": self.point.natural_draw_per_gpu_w,
                "power_floor_per_gpu_w": self.point.power_floor_per_gpu_w,
                "loop": self.loop, "model_source": self.model_source,
                "verdict": self.verdict, "reason": self.reason(),
                "fit": None if self.fit is None else self.fit.to_dict(),
                **self.analysis.to_dict(),
                "max_settling_time_s": self.max_settling_s,
                "recommended": {"kp": self.recommended_kp, "ki": self.recommended_ki,
                                "settling_time_s": self.recommended_settling_s},
                "verification": None if self.verification is None else {
                    **self.verification.to_dict(),
                    "conclusive": self.verification_conclusive},
                "notes": list(self.notes)}


@dataclass(frozen=True, kw_only=True)
class EmpiricalReport:
    """A controller's measured closed-loop budget step at one operating point, with its
    verdict: ``stable`` (settles within ``max_settling_s``), ``sluggish``, ``oscillates`` or
    ``does not settle``."""

    point: OperatingPoint
    step: Any           # palsctl.analysis.verify.ControllerStep
    max_settling_s: float = MAX_SETTLING_S

    @property
    def verdict(self) -> str:
        """What the closed-loop step test shows: settles, sluggish or oscillates."""
        s = self.step
        if s.limit_cycle:
            return "oscillates"
        if not s.decays or not math.isfinite(s.settling_time_s):
            return "does not settle"
        return "stable" if s.settling_time_s <= self.max_settling_s else "sluggish"

    def to_dict(self) -> dict[str, Any]:
        """The step test as a JSON-serialisable dict."""
        return {"point": self.point.name, "verdict": self.verdict,
                "max_settling_time_s": self.max_settling_s, **self.step.to_dict()}


@dataclass(kw_only=True)
class AnalysisReport:
    """Everything `analyze_points` (and `empirical_steps`) found."""

    experiment: str
    plant: dict[str, Any]
    dt_s: float
    gains: dict[str, tuple[float, float]]
    loops: list[LoopReport] = field(default_factory=list)
    empirical: list[EmpiricalReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def any_unstable(self) -> bool:
        """Whether any analysed loop is unstable or any step-tested controller oscillates."""
        return any(r.verdict == "UNSTABLE" for r in self.loops) or any(
            e.verdict == "oscillates" for e in self.empirical)

    @property
    def any_under_margins(self) -> bool:
        """Whether any analysed loop is stable but under the gain or phase margin."""
        return any(r.verdict == "under margins" for r in self.loops)

    @property
    def all_stable(self) -> bool:
        """True when every loop (and every empirical step) has the verdict ``stable``."""
        return all(r.verdict == "stable" for r in self.loops) and all(
            e.verdict == "stable" for e in self.empirical)

    def counts(self) -> dict[str, int]:
        """How many loops (and empirical steps) got each verdict."""
        out: dict[str, int] = {}
        for v in [r.verdict for r in self.loops] + [e.verdict for e in self.empirical]:
            out[v] = out.get(v, 0) + 1
        return out

    def summary(self, *, min_gm_db: float, min_pm_deg: float, max_settling_s: float) -> str:
        """One line: ``all N loops stable with ...`` only when that is true."""
        n = len(self.loops) + len(self.empirical)
        if n and self.all_stable:
            parts = []
            if self.loops:
                parts.append(f"all {len(self.loops)} loops stable with GM >= {min_gm_db:g} dB, "
                             f"PM >= {min_pm_deg:g} deg and settling <= {max_settling_s:g} s, "
                             f"each model fitting its step test")
            if self.empirical:
                parts.append(f"all {len(self.empirical)} closed-loop budget steps settle within "
                             f"{max_settling_s:g} s")
            return "; ".join(parts)
        c = self.counts()
        order = VERDICTS + ("oscillates", "does not settle")
        parts = [f"{c[v]} {v}" for v in order if c.get(v)]
        why = {"unverified": "the model does not fit its step test",
               "sluggish": f"settling over {max_settling_s:g} s"}
        parts = [p + (f" ({why[v]})" if v in why and c.get(v) else "")
                 for p, v in zip(parts, [v for v in order if c.get(v)], strict=True)]
        return f"{n} loops and closed-loop steps: " + ", ".join(parts) if self.empirical \
            else f"{n} loops: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers become None)."""
        return _clean({"experiment": self.experiment, "plant": self.plant, "dt_s": self.dt_s,
                "gains": {k: {"kp": v[0], "ki": v[1]} for k, v in self.gains.items()},
                "any_unstable": self.any_unstable, "any_under_margins": self.any_under_margins,
                "all_stable": self.all_stable, "verdicts": self.counts(),
                "loops": [r.to_dict() for r in self.loops],
                "empirical": [e.to_dict() for e in self.empirical],
                "notes": list(self.notes)})


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


def _sim_factory(model: str, gpu: str, num_gpus: int, max_batch_launch: int, dt_s: float,
                 seed: int):
    from palsctl.plants.sim import SimPlant

    return functools.partial(SimPlant, model, gpu, num_gpus, dt_s=dt_s, seed=seed, noise=False,
                             max_batch_launch=max_batch_launch)


def _points(make, *, model, gpu, num_gpus, max_batch_launch, prompt_tokens, output_tokens):
    probe = make()
    limits = probe.limits
    probe.close()
    return operating_points(model=model, gpu=gpu, num_gpus=num_gpus,
                            max_batch_launch=max_batch_launch,
                            cap_min_w=limits.power_cap_min_w, cap_max_w=limits.power_cap_max_w,
                            prompt_tokens=prompt_tokens, output_tokens=output_tokens)


def analyze_points(*, experiment: str, model: str, gpu: str, num_gpus: int,
                   max_batch_launch: int, dt_s: float, gains: dict[str, tuple[float, float]],
                   prompt_tokens: float = 200.0, output_tokens: float = 400.0,
                   power_model=None, points: list[OperatingPoint] | None = None,
                   min_gm_db: float = 6.0, min_pm_deg: float = 45.0, recommend: bool = True,
                   grid_points: int = 15, seed: int = 0, max_settling_s: float = MAX_SETTLING_S,
                   verify: bool = False, repeats: int | None = None) -> AnalysisReport:
    """Identify and analyse every loop at every operating point (see the module doc).

    ``gains``: (Kp, Ki) per loop name (`pi_gains`). ``power_model``: a `PowerPerfModel` whose
    gradients give a second estimate of each loop's gain (None: step tests only).
    ``max_settling_s``: settling time (s) above which a loop is sluggish. ``verify``: close each
    loop whose model fits on the simulated plant and compare (`verify.verify_loop`).
    ``repeats``: step-test repeats (default: 4 for throughput loops, 1 for power).
    """
    make = _sim_factory(model, gpu, num_gpus, max_batch_launch, dt_s, seed)
    if points is None:
        points = _points(make, model=model, gpu=gpu, num_gpus=num_gpus,
                         max_batch_launch=max_batch_launch, prompt_tokens=prompt_tokens,
                         output_tokens=output_tokens)
    report = AnalysisReport(experiment=experiment,
                            plant={"model": model, "gpu": gpu, "num_gpus": num_gpus,
                                   "max_batch_launch": max_batch_launch},
                            dt_s=dt_s, gains=dict(gains))
    for pt in points:
        for loop in LOOPS_BY_BUDGET[pt.budget]:
            kp, ki = gains[loop]
            step_u = step_size(loop, pt)
            test = step_test(make, loop=loop, power_cap_w=pt.power_cap_w, max_batch=pt.max_batch,
                             step=step_u, prompt_tokens=int(prompt_tokens),
                             output_tokens=int(output_tokens), seed=seed, repeats=repeats)
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
            for p in plants:
                fit = assess_fit(test, p)
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
                verification = None
                if verify and p.source == "step-test" and fit.ok and res.stable:
                    from palsctl.analysis.verify import verify_loop

                    verification = verify_loop(
                        make, p, loop=loop, kp=kp, ki=ki, power_cap_w=pt.power_cap_w,
                        max_batch=pt.max_batch, step=p.gain * step_u, repeats=test.repeats,
                        prompt_tokens=int(prompt_tokens), output_tokens=int(output_tokens),
                        seed=seed)
                    if verification.band > MAX_VERIFY_BAND:
                        pnotes.append(f"closed-loop check inconclusive: the simulated output's "
                                      f"noise needs a ±{100 * verification.band:.0f} % band")
                report.loops.append(LoopReport(
                    point=pt, loop=loop, model_source=p.source, analysis=res,
                    recommended_kp=rk, recommended_ki=rki, recommended_settling_s=rts,
                    notes=tuple(pnotes), fit=fit, max_settling_s=max_settling_s,
                    verification=verification, smap=smap, test=test))
    return report


def empirical_steps(report: AnalysisReport, controllers: dict[str, Any], *, model: str,
                    gpu: str, num_gpus: int, max_batch_launch: int, dt_s: float,
                    prompt_tokens: float = 200.0, output_tokens: float = 400.0,
                    points: list[OperatingPoint] | None = None, cut_fraction: float = 0.15,
                    max_settling_s: float = MAX_SETTLING_S, seed: int = 0) -> AnalysisReport:
    """Empirical closed-loop step tests of controllers that are not the linear PI, appended
    to ``report.empirical``: at each tight-budget operating point, the budget
    (``num_gpus × cap`` of the point) is cut by ``cut_fraction`` with a throughput target no
    configuration reaches (`verify.controller_budget_step`). ``controllers``: name → a factory
    returning a fresh controller."""
    from palsctl.analysis.verify import controller_budget_step
    from palsctl.plants.sim import steady_state

    make = _sim_factory(model, gpu, num_gpus, max_batch_launch, dt_s, seed)
    if points is None:
        points = _points(make, model=model, gpu=gpu, num_gpus=num_gpus,
                         max_batch_launch=max_batch_launch, prompt_tokens=prompt_tokens,
                         output_tokens=output_tokens)
    full = steady_state(model, gpu, num_gpus, max_batch=max_batch_launch,
                        prompt_tokens=int(prompt_tokens), output_tokens=int(output_tokens))
    target = 2.0 * full.throughput_tok_s       # above what any budget allows
    for name, factory in controllers.items():
        for pt in points:
            if pt.budget != "tight":
                continue
            b0 = num_gpus * pt.power_cap_w
            step = controller_budget_step(make, factory(), max_batch=max_batch_launch,
                                          record_s=min(300.0, max(60.0, 1.5 * max_settling_s)),
                                          budget_before_w=b0,
                                          budget_after_w=round(b0 * (1 - cut_fraction)),
                                          throughput_target_tok_s=target,
                                          prompt_tokens=int(prompt_tokens),
                                          output_tokens=int(output_tokens), seed=seed)
            step = _named(step, name)
            report.empirical.append(EmpiricalReport(point=pt, step=step,
                                                    max_settling_s=max_settling_s))
    return report


def _named(step: Any, name: str) -> Any:
    from dataclasses import replace

    return replace(step, controller=name)


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
        rec = (r.recommended_kp, r.recommended_ki) if r.recommended_kp is not None \
            and r.recommended_ki is not None else None
        path = out / f"map_{_slug(r.point.name)}_{r.loop}.png"
        plot_stability_map(r.smap, str(path), current=(r.analysis.kp, r.analysis.ki),
                           recommended=rec, min_gm_db=r.analysis.min_gm_db,
                           min_pm_deg=r.analysis.min_pm_deg,
                           title=f"{r.point.name}, {r.loop} loop: K={p.gain:.3g}, "
                                 f"tau={p.tau_s:.2f} s, theta={p.delay_s:.2f} s")
        paths.append(str(path))
    return paths


def _plot_dir(out_dir):
    """(pyplot on a headless backend, the output folder, created)."""
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return plt, out


def _step_test_loops(report: AnalysisReport):
    return (r for r in report.loops if r.model_source == "step-test")


def plot_bode(report: AnalysisReport, out_dir) -> list[str]:
    """One Bode plot PNG of the open loop ``L = C·G`` per loop and operating point (step-test
    model, configured gains), titled with the verdict, the fit and the exact margins; the gain
    crossover is marked. Returns the paths written."""
    import control as ct

    from palsctl.analysis.stability import loop_tf, pi_tf

    plt, out = _plot_dir(out_dir)
    paths = []
    for r in _step_test_loops(report):
        a, p = r.analysis, r.analysis.plant
        L = loop_tf(p, pi_tf(a.kp, a.ki, p.dt_s))
        nyq = math.pi / p.dt_s
        cp = ct.bode_plot(L, omega=_omega(nyq), dB=True, deg=True, display_margins=False,
                          title="")
        fig = cp.figure
        ax_mag, ax_ph = cp.axes[0, 0], cp.axes[1, 0]
        ax_mag.axhline(0.0, color="k", lw=0.6, ls=":")
        ax_ph.axhline(-180.0, color="k", lw=0.6, ls=":")
        wpm = 2 * math.pi * a.margins.pm_freq_hz
        if math.isfinite(wpm):
            for ax in (ax_mag, ax_ph):
                ax.axvline(wpm, color="tab:green", lw=0.8, ls="--")
        fit = "" if r.fit is None else f", {r.fit.text()}"
        fig.suptitle(f"{r.point.name}, {r.loop} loop: {r.verdict}{fit}\n"
                     f"GM {fmt(a.gain_margin_db, '.1f')} dB, PM {fmt(a.phase_margin_deg, '.0f')}"
                     f" deg (crossover dashed), Kp={a.kp:.3g}, Ki={a.ki:.3g}", fontsize=9)
        path = out / f"bode_{_slug(r.point.name)}_{r.loop}.png"
        fig.subplots_adjust(top=0.86)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths


def _omega(nyq: float):
    import numpy as np

    return np.geomspace(nyq * 1e-4, nyq, 400)


def plot_steps(report: AnalysisReport, out_dir) -> list[str]:
    """Step-response PNGs: per analysed loop (step-test model) the predicted closed-loop
    response to a unit setpoint step, with the simulated one when verified; per empirical test
    the measured power against the budget. Returns the paths written."""
    import numpy as np

    from palsctl.analysis.stability import predicted_response

    plt, out = _plot_dir(out_dir)
    paths = []
    for r in _step_test_loops(report):
        a, p = r.analysis, r.analysis.plant
        ts = a.step.settling_time_s
        horizon = min(300.0, max(20 * p.dt_s, 3 * ts if math.isfinite(ts) else 300.0))
        v = r.verification
        if v is not None:
            horizon = float(v.run.t_s[-1])
        n = int(horizon / p.dt_s) + 1
        t = np.arange(n) * p.dt_s
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ax.step(t, predicted_response(p, kp=a.kp, ki=a.ki, n=n), where="post",
                label="predicted (model)")
        if v is not None:
            ax.step(v.run.t_s, v.run.y_normalised, where="post", alpha=0.8,
                    label=f"simulated closed loop (mean of {v.repeats})")
        ax.axhline(1.0, color="k", lw=0.6, ls=":")
        for edge in (1 - 0.02, 1 + 0.02):
            ax.axhline(edge, color="0.6", lw=0.5)
        paths.append(_save(plt, fig, ax, out / f"step_{_slug(r.point.name)}_{r.loop}.png",
                           "time after the setpoint step (s)", "output / step",
                           f"{r.point.name}, {r.loop} loop: {r.verdict}; settling {fmt(ts)} s"))
    for e in report.empirical:
        s = e.step
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ax.step(s.t_s, s.power_w, where="post", label="measured power (W)")
        ax.axhline(s.budget_after_w, color="tab:red", ls="--", lw=0.8, label="new budget")
        ax.axhline(s.budget_before_w, color="0.6", ls=":", lw=0.8, label="old budget")
        paths.append(_save(plt, fig, ax,
                           out / f"step_{_slug(s.controller)}_{_slug(e.point.name)}_budget.png",
                           "time after the budget step (s)", "power, all GPUs (W)",
                           f"{s.controller}, {e.point.name}: {e.verdict}; settling "
                           f"{fmt(s.settling_time_s)} s"))
    return paths


def _save(plt, fig, ax, path, xlabel: str, ylabel: str, title: str) -> str:
    """Label one step-response figure, write it to ``path`` as PNG and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def fmt(x: float | None, spec: str = ".3g") -> str:
    """A number for a table: ``-`` for None/nan, ``inf`` for infinity."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)
