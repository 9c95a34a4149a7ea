"""Run several controllers on identical workloads and seeds, side by side, and score them
(the library half of ``palsctl compare``).

Library use (the same functions the command uses)::

    from palsctl.experiment import compare, load_experiment, versus_static
    cfg = load_experiment("examples/moe_throughput_targets.toml")
    result = compare(cfg, ["search", "cap-to-budget"], seeds=[0, 1, 2])
    result["search"]["gain_vs_static"], result["hindsight"]["qos_violation_rate"]
    ctl, static = versus_static(cfg, "search")     # two summary dicts, same workload and seed

Every controller runs with the experiment's plant, workload and setpoint schedule; the
configured controller keeps its parameters, the others run at their documented defaults. The
controllers compared are exactly those asked for; *reference rows* are separate and named by
``references`` (default: ``static`` — what users run today, for ``gain_vs_static`` and to tell
binding from loose budget stretches — and, on the simulated plant, ``hindsight``, the best fixed
configuration per segment chosen in hindsight, for ``hindsight_fraction``).

`pareto` sweeps each controller's aggressiveness knob (its ``aggressiveness`` class attribute:
a Config key and its values, conservative first) and static's (cap, batch) grid, and returns the
energy–QoS points and which of them lie on the frontier.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["DEFAULT_REFERENCES", "DEFAULT_SEEDS", "add_derived", "aggregate", "compare",
           "frontier", "pareto", "resolve_names", "resolve_references", "run_all",
           "summarize_all", "versus_static"]

DEFAULT_SEEDS = 3
DEFAULT_REFERENCES = ("static", "hindsight")
# controllers left out of "every registered one": `fixed` is static's configuration by default
_NOT_BY_DEFAULT = ("fixed",)


def resolve_names(cfg: Any, names: Sequence[str] | None) -> list[str]:
    """The controllers to compare: exactly ``names`` (validated), or every registered one but
    ``fixed`` when None. Nothing is added."""
    from palsctl.errors import ConfigError
    from palsctl.registry import available

    known = available("controller")
    if not names:
        return [n for n in known if n not in _NOT_BY_DEFAULT]
    chosen = list(dict.fromkeys(names))
    for n in chosen:
        if n not in known:
            raise ConfigError(f"unknown controller; known: {', '.join(known)}",
                              key="--controllers", value=n)
    return chosen


def resolve_references(cfg: Any, references: Sequence[str] | None) -> list[str]:
    """Reference rows: registered controllers or ``hindsight`` (simulated plants only; skipped
    on others)."""
    from palsctl.errors import ConfigError
    from palsctl.registry import available

    refs = list(DEFAULT_REFERENCES if references is None else dict.fromkeys(references))
    known = available("controller")
    out = []
    for r in refs:
        if r == "hindsight":
            if cfg.plant.get("kind", "sim") == "sim":
                out.append(r)
            continue
        if r not in known:
            raise ConfigError(f"unknown reference; known: hindsight, {', '.join(known)}",
                              key="--references", value=r)
        out.append(r)
    return out


def run_all(cfg: Any, names: Sequence[str], seeds: Sequence[int], *,
            progress: Callable[[str, int], None] | None = None,
            hindsight: dict[str, Any] | None = None) -> dict[str, list[Any]]:
    """Run every controller (or ``hindsight``) for every seed; ``{name: [RunRecord per seed]}``.
    ``hindsight``: keyword arguments of `palsctl.experiment.hindsight.hindsight_run`."""
    from palsctl.experiment.run import run_experiment

    out: dict[str, list[Any]] = {}
    for name in names:
        out[name] = []
        for seed in seeds:
            if progress is not None:
                progress(name, seed)
            if name == "hindsight":
                from palsctl.experiment.hindsight import hindsight_run

                out[name].append(hindsight_run(cfg, seed=seed, **(hindsight or {}))[0])
            else:
                out[name].append(run_experiment(cfg, controller=name, seed=seed))
    return out


def summarize_all(records: dict[str, list[Any]]) -> dict[str, list[dict[str, Any]]]:
    """`palsctl.metrics.summarize` every record, with the same seed's `static` run as the
    reference for binding/loose stretches when there is one."""
    from palsctl.metrics import summarize

    ref = records.get("static")
    return {name: [summarize(r, reference=ref[i] if ref and i < len(ref) else None)
                   for i, r in enumerate(rs)] for name, rs in records.items()}


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def aggregate(summaries: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Means over seeds of every numeric summary key, ``<key>_std`` (population std), plus
    ``gain_vs_static`` (mean over seeds of tokens/J ÷ static's on the same seed),
    ``hindsight_fraction`` (the same against ``hindsight``; None without it), ``seeds``."""
    import numpy as np

    out: dict[str, dict[str, Any]] = {}
    for name, runs in summaries.items():
        agg: dict[str, Any] = {"seeds": len(runs)}
        keys = list(dict.fromkeys(k for s in runs for k in s))
        for k in keys:
            vals = [v for v in (_num(s.get(k)) for s in runs) if v is not None]
            if not vals:
                if all(not isinstance(s.get(k), (list, dict)) for s in runs):
                    agg[k] = None
                continue
            agg[k] = float(np.mean(vals))
            agg[f"{k}_std"] = float(np.std(vals))
        for ref, key in (("static", "gain_vs_static"), ("hindsight", "hindsight_fraction")):
            if ref not in summaries:
                agg[key] = None
                agg[f"{key}_std"] = None
                continue
            ratios = []
            for s, r in zip(runs, summaries[ref]):
                a, b = _num(s.get("tokens_per_joule")), _num(r.get("tokens_per_joule"))
                if a is not None and b:
                    ratios.append(a / b)
            agg[key] = float(np.mean(ratios)) if ratios else None
            agg[f"{key}_std"] = float(np.std(ratios)) if ratios else None
        out[name] = agg
    return out


def add_derived(result: dict[str, dict[str, Any]],
                summaries: dict[str, list[dict[str, Any]]]) -> None:
    """``energy_over_budget_frac``: energy above the budget ÷ total energy (mean over seeds)."""
    import numpy as np

    for name, runs in summaries.items():
        fr = [s["energy_over_budget_j"] / s["energy_j"] for s in runs
              if _num(s.get("energy_over_budget_j")) is not None and _num(s.get("energy_j"))]
        result[name]["energy_over_budget_frac"] = float(np.mean(fr)) if fr else None
        result[name]["energy_over_budget_frac_std"] = float(np.std(fr)) if fr else None


def compare(cfg: Any, names: Sequence[str] | None = None, *, seeds: Sequence[int] | None = None,
            references: Sequence[str] | None = None,
            progress: Callable[[str, int], None] | None = None,
            records: dict[str, list[Any]] | None = None,
            hindsight: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Run and score controllers and reference rows on one experiment, over several seeds.

    Each row aggregates the seeds' summaries (mean and ``_std``) and has ``reference``
    True/False; see `aggregate`.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    names : sequence of str, optional
        The controllers, exactly (default: every registered one but ``fixed``).
    seeds : sequence of int, optional
        The seeds (default: the experiment's and the next ones).
    references : sequence of str, optional
        Reference rows: registered controllers or ``hindsight`` (default: ``static`` and
        ``hindsight``; hindsight only on the simulated plant).
    progress : callable, optional
        ``progress(name, seed)`` before each run.
    records : dict, optional
        Filled with ``{name: [RunRecord per seed]}``.
    hindsight : dict, optional
        Keyword arguments of `palsctl.experiment.hindsight.hindsight_run`.

    Returns
    -------
    dict
        ``{name: aggregated metrics}``, one row per controller and reference.
    """
    names = resolve_names(cfg, names)
    refs = [r for r in resolve_references(cfg, references) if r not in names]
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(DEFAULT_SEEDS)]
    recs = run_all(cfg, names + refs, seeds, progress=progress, hindsight=hindsight)
    if records is not None:
        records.update(recs)
    summaries = summarize_all(recs)
    result = aggregate(summaries)
    add_derived(result, summaries)
    for n in result:
        result[n]["reference"] = n in refs
    return result


def versus_static(cfg: Any, controller: str | Any, *, seed: int | None = None
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a controller and ``static`` on the same experiment, workload and seed.

    The gain is ``controller_summary["tokens_per_joule"] /
    static_summary["tokens_per_joule"]``.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    controller : str or Controller
        A registered name or an instance.
    seed : int, optional
        The seed (default: the experiment's).

    Returns
    -------
    controller_summary : dict
        The controller's metrics (binding and loose stretches against static).
    static_summary : dict
        Static's metrics.
    """
    from palsctl.experiment.run import run_experiment
    from palsctl.metrics import summarize

    ref = run_experiment(cfg, controller="static", seed=seed)
    a = summarize(run_experiment(cfg, controller=controller, seed=seed), reference=ref)
    return a, summarize(ref, reference=ref)


# ---- the energy-QoS frontier -------------------------------------------------------------------
def _factory(cls: Any, params: dict[str, Any]) -> Callable[[], Any]:
    """A maker of fresh ``cls(**params)`` (one per run)."""
    return lambda: cls(**params)


def frontier(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For points ``(qos_violation_rate, tokens_per_joule)``: True for those no other point
    dominates (lower or equal violations and more or equal tokens/J, one of them strictly)."""
    out = []
    for i, (q, t) in enumerate(points):
        dominated = any((q2 <= q and t2 >= t) and (q2 < q or t2 > t)
                        for j, (q2, t2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def _static_grid(cfg: Any, caps: int, batches: Sequence[int]) -> list[dict[str, Any]]:
    """Fixed (cap, batch) settings spanning the plant's limits."""
    from palsctl.experiment.build import build_plant

    plant = build_plant(cfg)
    lim = plant.limits
    plant.close()
    step = (lim.power_cap_max_w - lim.power_cap_min_w) / max(caps - 1, 1)
    cs = sorted({lim.clamp_cap_w(lim.power_cap_min_w + i * step) for i in range(caps)}
                | {lim.power_cap_max_w})
    return [{"power_cap_w": c, "max_batch": lim.clamp_batch(b)} for c in cs for b in batches]


def pareto(cfg: Any, names: Sequence[str] | None = None, *, seeds: Sequence[int] | None = None,
           static_caps: int = 5, static_batches: Sequence[int] = (64, 128, 256),
           progress: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Sweep each controller's aggressiveness knob and static's (cap, batch) grid.

    Returns
    -------
    dict
        ``points``: one entry per (controller, setting) with ``controller``, ``params``,
        ``tokens_per_joule`` and ``qos_violation_rate`` (means over seeds) and ``on_frontier``;
        ``on_frontier``: the controllers with at least one point on the frontier.
    """
    import numpy as np

    from palsctl.controllers.baselines import FixedController
    from palsctl.experiment.run import run_experiment
    from palsctl.metrics import summarize
    from palsctl.registry import resolve

    names = [n for n in resolve_names(cfg, names) if n not in ("static", "fixed")]
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(DEFAULT_SEEDS)]
    settings: list[tuple[str, dict[str, Any], Callable[[], Any]]] = []
    for params in _static_grid(cfg, static_caps, static_batches):
        settings.append(("static", params, _factory(FixedController, params)))
    shown: list[dict[str, Any]] = [dict(p) for _, p, _ in settings]
    for name in names:
        cls = resolve(name)
        knob: tuple[str, tuple[float, ...]] | None = getattr(cls, "aggressiveness", None)
        base = cfg.controller_params if name == cfg.controller_name else {}
        if knob is None:
            settings.append((name, dict(base), _factory(cls, dict(base))))
            shown.append({})
            continue
        field, knob_values = knob
        for v in knob_values:
            params = {**base, field: v}
            settings.append((name, params, _factory(cls, params)))
            shown.append({field: v})
    points: list[dict[str, Any]] = []
    for (name, params, make), knob_value in zip(settings, shown):
        if progress is not None:
            progress(name, knob_value)
        tpj, qos = [], []
        for seed in seeds:
            s = summarize(run_experiment(cfg, controller=make(), seed=seed))
            tpj.append(s["tokens_per_joule"] or 0.0)
            qos.append(s["qos_violation_rate"] or 0.0)
        points.append({"controller": name, "params": params, "setting": knob_value,
                       "tokens_per_joule": float(np.mean(tpj)),
                       "qos_violation_rate": float(np.mean(qos))})
    flags = frontier([(p["qos_violation_rate"], p["tokens_per_joule"]) for p in points])
    for p, f in zip(points, flags):
        p["on_frontier"] = bool(f)
    return {"experiment": cfg.name, "seeds": seeds, "points": points,
            "on_frontier": sorted({p["controller"] for p in points if p["on_frontier"]})}
