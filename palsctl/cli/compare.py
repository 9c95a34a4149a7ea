"""``palsctl compare CONFIG``: run several controllers on identical workloads and seeds, side by
side, and rank them.

The library half (running and scoring) is `palsctl.experiment.compare`; this module parses the
options and prints.
"""
from __future__ import annotations

import argparse
from typing import Any

from palsctl.experiment.compare import DEFAULT_SEEDS

__all__ = ["HELP", "add_arguments", "format_table", "main"]

HELP = "compare controllers on the same experiment, workload and seeds (table, JSON, plots)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``palsctl compare`` to its parser."""
    parser.add_argument("config", metavar="CONFIG", nargs="?",
                        help="experiment TOML file (default: the embedded default experiment)")
    parser.add_argument("--controllers", metavar="A,B,...",
                        help="controllers to compare, exactly these: no reference row is added "
                             "unless --references asks (default: every registered one but "
                             "`fixed`, with the reference rows)")
    parser.add_argument("--references", metavar="A,B,...", default=None,
                        help="reference rows, shown apart from the controllers: registered "
                             "controllers or `hindsight` (best fixed configuration per segment, "
                             "chosen in hindsight; simulated plants only); 'none' for none "
                             "(default: static,hindsight, but none when --controllers is given)")
    parser.add_argument("--pareto", action="store_true",
                        help="instead of the table: sweep each controller's aggressiveness knob "
                             "and static's (cap, batch) grid, plot tokens/J against QoS "
                             "violations (pareto.png in --out, JSON with --json) and name the "
                             "controllers on the frontier")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, metavar="N",
                        help=f"number of seeds, 0..N-1 offset by the config's seed "
                             f"(default {DEFAULT_SEEDS})")
    parser.add_argument("--duration-s", type=float, metavar="S",
                        help="override the experiment's duration (simulated seconds)")
    parser.add_argument("--json", metavar="PATH", help="write the comparison JSON ('-': stdout)")
    parser.add_argument("--out", metavar="DIR",
                        help="write overlaid timeline plots (first seed) to DIR")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress and no table")


COLUMNS = (  # (key, header, format, scale)
    ("tokens_per_joule", "tokens/J", "{:.3f}", 1.0),
    ("gain_vs_static", "gain vs static", "{:.3f}", 1.0),
    ("qos_violation_rate", "QoS viol %", "{:.1f}", 100.0),
    ("slo_attainment", "SLO attain %", "{:.1f}", 100.0),
    ("time_over_budget_s", "over budget s", "{:.0f}", 1.0),
    ("energy_over_budget_frac", "E over budget %", "{:.2f}", 100.0),
    ("qos_violation_rate_binding", "QoS binding %", "{:.1f}", 100.0),
    ("qos_violation_rate_loose", "QoS loose %", "{:.1f}", 100.0),
    ("throughput_violation_rate", "thr viol %", "{:.1f}", 100.0),
    ("settling_time_s", "settling s", "{:.0f}", 1.0),
    ("hindsight_fraction", "hindsight frac", "{:.3f}", 1.0),
    ("batch_changes_per_100s", "batch chg/100s", "{:.1f}", 1.0),
    ("cap_reversals_per_100s", "cap rev/100s", "{:.1f}", 1.0),
    ("step_latency_p50_s", "step p50 ms", "{:.3f}", 1e3),
    ("step_latency_p99_s", "step p99 ms", "{:.3f}", 1e3),
)


def format_table(result: dict[str, dict[str, Any]], *, title: str = "") -> Any:
    """A rich Table of the comparison: mean ± std over seeds."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("controller")
    for _, header, _, _ in COLUMNS:
        table.add_column(header, justify="right")
    for name, agg in result.items():
        row = [f"{name} (ref)" if agg.get("reference") else name]
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
    """Run ``palsctl compare`` with parsed options; return the exit status."""
    import json
    import sys
    from pathlib import Path

    from palsctl.cli.options import duration_override, not_the_input
    from palsctl.errors import ConfigError
    from palsctl.experiment import load_experiment
    from palsctl.experiment.compare import (
        add_derived,
        aggregate,
        resolve_names,
        resolve_references,
        run_all,
        summarize_all,
    )
    from palsctl.plotting import plot_overlay

    cfg = load_experiment(args.config)
    not_the_input("--json", args.json, args.config, "experiment file")
    if args.duration_s is not None:
        cfg = cfg.with_overrides(duration_s=duration_override(args.duration_s, cfg.dt_s))
    if args.seeds < 1:
        raise ConfigError("must be >= 1", key="--seeds", value=args.seeds)
    names = [n.strip() for n in args.controllers.split(",") if n.strip()] \
        if args.controllers is not None else None
    if names == []:  # "" is no list: it used to mean every controller, with the references
        raise ConfigError("give at least one controller (leave the option out for every "
                          "registered one)", key="--controllers", value=args.controllers)
    names = resolve_names(cfg, names)
    seeds = [cfg.seed + i for i in range(args.seeds)]

    def progress(name: str, seed: int) -> None:
        if not args.quiet:
            print(f"  running {name} (seed {seed})", file=sys.stderr, flush=True)

    if args.pareto:
        return _pareto(args, cfg, names, seeds)
    # reference rows: as asked; by default static and hindsight, but none beside a
    # --controllers list (nothing is added to a list the user gave)
    refs: list[str] | None
    if args.references is None and args.controllers:
        refs = []
    else:
        refs = [] if args.references in ("none", "") else (
            [r.strip() for r in args.references.split(",") if r.strip()]
            if args.references is not None else None)
    refs = [r for r in resolve_references(cfg, refs) if r not in names]

    def progress_hs(done: int, total: int) -> None:
        if not args.quiet and (done == total or done % 10 == 0):
            print(f"    hindsight: {done}/{total} candidate segments simulated",
                  file=sys.stderr, flush=True)

    recs = run_all(cfg, names + refs, seeds, progress=progress,
                   hindsight={"progress": progress_hs})
    summaries = summarize_all(recs)
    result = aggregate(summaries)
    add_derived(result, summaries)
    for n in result:
        result[n]["reference"] = n in refs
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
                       if n in ("static", "search", "hindsight", "pi", "mpc")}
        if model_based:
            plot_overlay(model_based, out / "timeline_main.png",
                         title=f"{cfg.name} (seed {seeds[0]})")
    if not args.quiet and args.json != "-":
        from rich.console import Console

        Console(width=None if sys.stdout.isatty() else 200).print(format_table(
            result, title=f"{cfg.name}: {len(seeds)} seed(s), {cfg.duration_s:g} s simulated"))
    return 0


def _pareto(args: argparse.Namespace, cfg: Any, names: list[str], seeds: list[int]) -> int:
    """``--pareto``: the energy-QoS frontier (JSON, PNG, one line per controller)."""
    import json
    import sys
    from pathlib import Path

    from palsctl.experiment.compare import pareto
    from palsctl.plotting import plot_pareto

    def progress(name: str, params: dict) -> None:
        if not args.quiet:
            print(f"  running {name} {params}", file=sys.stderr, flush=True)

    res = pareto(cfg, names, seeds=seeds, progress=progress)
    if args.json:
        text = json.dumps(res, indent=2, sort_keys=True)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text + "\n")
    if args.out:
        plot_pareto(res, Path(args.out) / "pareto.png",
                    title=f"{cfg.name}: tokens/J vs QoS violations ({len(seeds)} seed(s))")
    if not args.quiet and args.json != "-":
        for name in dict.fromkeys(p["controller"] for p in res["points"]):
            pts = [p for p in res["points"] if p["controller"] == name]
            on = sum(p["on_frontier"] for p in pts)
            best = max(pts, key=lambda p: p["tokens_per_joule"])
            print(f"{name:14s} {on}/{len(pts)} setting(s) on the frontier; best tokens/J "
                  f"{best['tokens_per_joule']:.3f} at {100 * best['qos_violation_rate']:.2f} % "
                  f"QoS violations")
        print("on the frontier: " + (", ".join(res["on_frontier"]) or "none"))
    return 0
