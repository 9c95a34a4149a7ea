"""``palsctl compare CONFIG``: run several controllers on identical workloads and seeds, side by
side, and rank them.

Library use (the same functions the command uses)::

    from palsctl.config import load_experiment
    from palsctl.cli.compare import compare, versus_static
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

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

HELP = "compare controllers on the same experiment, workload and seeds (table, JSON, plots)"

DEFAULT_SEEDS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", nargs="?",
                        help="experiment TOML file (default: the embedded default experiment)")
    parser.add_argument("--controllers", metavar="A,B,...",
                        help="controllers to compare (default: every registered one)")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, metavar="N",
                        help=f"number of seeds, 0..N-1 offset by the config's seed "
                             f"(default {DEFAULT_SEEDS})")
    parser.add_argument("--duration-s", type=float, metavar="S",
                        help="override the experiment's duration (simulated seconds)")
    parser.add_argument("--json", metavar="PATH", help="write the comparison JSON ('-': stdout)")
    parser.add_argument("--out", metavar="DIR",
                        help="write overlaid timeline plots (first seed) to DIR")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress and no table")


# ---- library --------------------------------------------------------------------------------
def _names(cfg: Any, names: Sequence[str] | None) -> list[str]:
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
        extra.append("oracle")
    for n in extra:
        if n not in chosen:
            chosen.append(n)
    return chosen


def run_all(cfg: Any, names: Sequence[str], seeds: Sequence[int], *,
            progress: Callable[[str, int], None] | None = None) -> dict[str, list[Any]]:
    """Run every controller for every seed; return ``{name: [RunRecord per seed]}``."""
    from palsctl.config import run_experiment

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

    names = _names(cfg, names)
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
    from palsctl.config import run_experiment
    from palsctl.metrics import summarize

    a = summarize(run_experiment(cfg, controller=controller, seed=seed))
    b = summarize(run_experiment(cfg, controller="static", seed=seed))
    return a, b


def plot_overlay(records: dict[str, Any], path: Any, *, title: str | None = None) -> Any:
    """One figure, four panels (power vs budget, throughput vs target, cap, batch), one line per
    controller: ``records`` maps a controller name to one `RunRecord`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    from palsctl.metrics import window_setpoints

    fig, ax = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    first = True
    for name, rec in records.items():
        t = [s.t_s for s in rec.steps]
        ax[0].plot(t, [s.measurement.power_w for s in rec.steps], lw=0.8, label=name)
        ax[1].plot(t, [s.measurement.throughput_tok_s for s in rec.steps], lw=0.8, label=name)
        ax[2].plot(t, [s.applied.power_cap_w for s in rec.steps], lw=0.8, label=name)
        ax[3].plot(t, [s.applied.max_batch for s in rec.steps], lw=0.8, label=name)
        if first:
            sps = window_setpoints(rec.steps)
            b = [sp.power_budget_w if sp.power_budget_w is not None else math.nan for sp in sps]
            x = [sp.throughput_tok_s if sp.throughput_tok_s is not None else math.nan
                 for sp in sps]
            ax[0].plot(t, b, "k--", lw=1.2, label="budget")
            ax[1].plot(t, x, "k--", lw=1.2, label="target")
            first = False
    for a, lab in zip(ax, ("power (W, total)", "throughput (tok/s)", "cap per GPU (W)",
                           "max batch")):
        a.set_ylabel(lab)
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=7, ncol=5, loc="upper right")
    ax[-1].set_xlabel("time (s)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


COLUMNS = (  # (key, header, format, scale)
    ("tokens_per_joule", "tokens/J", "{:.3f}", 1.0),
    ("gain_vs_static", "gain vs static", "{:.3f}", 1.0),
    ("qos_violation_rate", "QoS viol %", "{:.1f}", 100.0),
    ("slo_attainment", "SLO attain %", "{:.1f}", 100.0),
    ("time_over_budget_s", "over budget s", "{:.0f}", 1.0),
    ("energy_over_budget_frac", "E over budget %", "{:.2f}", 100.0),
    ("settling_time_s", "settling s", "{:.0f}", 1.0),
    ("oracle_fraction", "oracle frac", "{:.3f}", 1.0),
    ("step_latency_p50_s", "step p50 ms", "{:.3f}", 1e3),
    ("step_latency_p99_s", "step p99 ms", "{:.3f}", 1e3),
)


def _add_derived(result: dict[str, dict[str, Any]],
                 summaries: dict[str, list[dict[str, Any]]]) -> None:
    """``energy_over_budget_frac``: energy above the budget ÷ total energy (mean over seeds)."""
    import numpy as np

    for name, runs in summaries.items():
        fr = [s["energy_over_budget_j"] / s["energy_j"] for s in runs
              if _num(s.get("energy_over_budget_j")) is not None and _num(s.get("energy_j"))]
        result[name]["energy_over_budget_frac"] = float(np.mean(fr)) if fr else None
        result[name]["energy_over_budget_frac_std"] = float(np.std(fr)) if fr else None


def format_table(result: dict[str, dict[str, Any]], *, title: str = "") -> Any:
    """A rich Table of the comparison: mean ± std over seeds."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("controller")
    for _, header, _, _ in COLUMNS:
        table.add_column(header, justify="right")
    for name, agg in result.items():
        row = [name]
        for key, _, fmt, scale in COLUMNS:
            v, sd = agg.get(key), agg.get(f"{key}_std")
            if v is None:
                row.append("–")
            elif sd is not None and sd > 0 and key not in ("step_latency_p50_s",
                                                           "step_latency_p99_s"):
                row.append(f"{fmt.format(v * scale)} ± {fmt.format(sd * scale)}")
            else:
                row.append(fmt.format(v * scale))
        table.add_row(*row)
    return table


# ---- command --------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from palsctl.config import load_experiment
    from palsctl.errors import ConfigError
    from palsctl.metrics import summarize

    cfg = load_experiment(args.config)
    if args.duration_s is not None:
        if not (args.duration_s > 0 and math.isfinite(args.duration_s)):
            raise ConfigError("must be a positive number of seconds", key="--duration-s",
                              value=args.duration_s)
        cfg = cfg.with_overrides(duration_s=float(args.duration_s))
    if args.seeds < 1:
        raise ConfigError("must be >= 1", key="--seeds", value=args.seeds)
    names = [n.strip() for n in args.controllers.split(",") if n.strip()] \
        if args.controllers else None
    names = _names(cfg, names)
    seeds = [cfg.seed + i for i in range(args.seeds)]

    def progress(name: str, seed: int) -> None:
        if not args.quiet:
            print(f"  running {name} (seed {seed})", file=sys.stderr, flush=True)

    recs = run_all(cfg, names, seeds, progress=progress)
    summaries = {n: [summarize(r) for r in rs] for n, rs in recs.items()}
    result = aggregate(summaries)
    _add_derived(result, summaries)

    if args.json:
        text = json.dumps(result, indent=2, sort_keys=True)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text + "\n")
    if args.out:
        out = Path(args.out)
        plot_overlay({n: rs[0] for n, rs in recs.items()}, out / "timeline_all.png",
                     title=f"{cfg.name} (seed {seeds[0]})")
        model_based = {n: rs[0] for n, rs in recs.items()
                       if n in ("static", "search", "oracle", "pi", "mpc")}
        if model_based:
            plot_overlay(model_based, out / "timeline_main.png",
                         title=f"{cfg.name} (seed {seeds[0]})")
    if not args.quiet and args.json != "-":
        from rich.console import Console

        Console(width=None if sys.stdout.isatty() else 200).print(format_table(
            result, title=f"{cfg.name}: {len(seeds)} seed(s), {cfg.duration_s:g} s simulated"))
    return 0
