"""Run several controllers on identical workloads and seeds, side by side, and score them
(the library half of ``palsctl compare``).

Library use (the same functions the command uses)::

    from palsctl.experiment import compare, load_experiment, versus_static
    cfg = load_experiment("examples/moe_throughput_targets.toml")
    result = compare(cfg, ["static", "search"], seeds=[0, 1, 2])
    result["search"]["gain_vs_static"]
    ctl, static = versus_static(cfg, "search")     # two summary dicts, same workload and seed

Every controller runs with the experiment's plant, workload and setpoint schedule; the
configured controller keeps its parameters, the others run at their documented defaults.
``static`` (for ``gain_vs_static``) and, on the simulated plant, ``oracle`` (for
``oracle_fraction``) are always run.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_SEEDS = 3


# ---- library --------------------------------------------------------------------------------
def resolve_names(cfg: Any, names: Sequence[str] | None) -> list[str]:
    from palsctl.errors import ConfigError
    from palsctl.registry import available

    known = available("controller")
    chosen = list(known) if not names else list(dict.fromkeys(names))
    for n in chosen:
        if n not in known:
            raise ConfigError(f"unknown controller; known: {', '.join(known)}",
                              key="--controllers", value=n)
    extra = ["static"]
    if cfg.plant.get("kind", "sim") == "sim":
        pass
    for n in extra:
        if n not in chosen:
            chosen.append(n)
    return chosen


def run_all(cfg: Any, names: Sequence[str], seeds: Sequence[int], *,
            progress: Callable[[str, int], None] | None = None) -> dict[str, list[Any]]:
    """Run every controller for every seed; return ``{name: [RunRecord per seed]}``."""
    from palsctl.experiment.run import run_experiment

    out: dict[str, list[Any]] = {}
    for name in names:
        out[name] = []
        for seed in seeds:
            if progress is not None:
                progress(name, seed)
            out[name].append(run_experiment(cfg, controller=name, seed=seed))
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def aggregate(summaries: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Means over seeds of every numeric summary key, ``<key>_std`` (population std), plus
    ``gain_vs_static`` (mean over seeds of tokens/J ÷ static's on the same seed),
    ``oracle_fraction`` (the same against ``oracle``; None without it), ``seeds``."""
    import numpy as np

    out: dict[str, dict[str, Any]] = {}
    for name, runs in summaries.items():
        agg: dict[str, Any] = {"seeds": len(runs)}
        keys = list(dict.fromkeys(k for s in runs for k in s))
        for k in keys:
            vals = [_num(s.get(k)) for s in runs]
            vals = [v for v in vals if v is not None]
            if not vals:
                if all(not isinstance(s.get(k), (list, dict)) for s in runs):
                    agg[k] = None
                continue
            agg[k] = float(np.mean(vals))
            agg[f"{k}_std"] = float(np.std(vals))
        for ref, key in (("static", "gain_vs_static"), ("oracle", "oracle_fraction")):
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


def compare(cfg: Any, names: Sequence[str] | None = None, *, seeds: Sequence[int] | None = None,
            progress: Callable[[str, int], None] | None = None,
            records: dict[str, list[Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Run and score controllers on ``cfg``; return the comparison (see `aggregate`). Pass a
    dict as ``records`` to receive the run records too."""
    from palsctl.metrics import summarize

    names = resolve_names(cfg, names)
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(DEFAULT_SEEDS)]
    recs = run_all(cfg, names, seeds, progress=progress)
    if records is not None:
        records.update(recs)
    return aggregate({n: [summarize(r) for r in rs] for n, rs in recs.items()})


def versus_static(cfg: Any, controller: str | Any, *, seed: int | None = None
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``controller`` (a name or an instance) and ``static`` on the same experiment, workload
    and seed; return both summaries ``(controller_summary, static_summary)``. The gain is
    ``controller_summary["tokens_per_joule"] / static_summary["tokens_per_joule"]``."""
    from palsctl.experiment.run import run_experiment
    from palsctl.metrics import summarize

    a = summarize(run_experiment(cfg, controller=controller, seed=seed))
    b = summarize(run_experiment(cfg, controller="static", seed=seed))
    return a, b


def add_derived(result: dict[str, dict[str, Any]],
                 summaries: dict[str, list[dict[str, Any]]]) -> None:
    """``energy_over_budget_frac``: energy above the budget ÷ total energy (mean over seeds)."""
    import numpy as np

    for name, runs in summaries.items():
        fr = [s["energy_over_budget_j"] / s["energy_j"] for s in runs
              if _num(s.get("energy_over_budget_j")) is not None and _num(s.get("energy_j"))]
        result[name]["energy_over_budget_frac"] = float(np.mean(fr)) if fr else None
        result[name]["energy_over_budget_frac_std"] = float(np.std(fr)) if fr else None
