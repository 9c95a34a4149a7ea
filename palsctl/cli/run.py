"""``palsctl run [CONFIG]``: run one experiment in closed loop and write its report."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from palsctl.loop import RunRecord

HELP = ("run an experiment (TOML; none: the embedded default) and write steps.csv, "
        "summary.json, timeline.png, config.toml and provenance.json")

# the baselines the default experiment is compared with: what users run today, and what a
# facility's power capping does (it respects the budget)
DEFAULT_BASELINES = ("static", "cap-to-budget")
BASELINE_WORDS = {
    "static": "default power limit and batch, no power management: ignores the budget",
    "cap-to-budget": "facility power capping: cap = budget / GPUs, default batch",
}
# summary keys of each baseline's run reported beside the controller's
STATIC_KEYS = ("tokens_per_joule", "qos_violation_rate", "slo_attainment", "time_over_budget_s",
               "energy_over_budget_j", "energy_j", "generated_tokens", "mean_power_w",
               "mean_throughput_tok_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``palsctl run`` to its parser."""
    parser.add_argument("config", nargs="?", metavar="CONFIG",
                        help="experiment TOML file (default: the embedded default experiment)")
    parser.add_argument("--from", dest="from_", metavar="PATH",
                        help="rerun a recorded run: its results folder or the config.toml in it "
                             "(same controller, baselines and seed; default --out: "
                             "<that folder>-rerun)")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default: results/<name>)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the summary JSON to PATH ('-' for stdout)")
    parser.add_argument("--controller", metavar="NAME",
                        help="override the configured controller (defaults for its parameters)")
    parser.add_argument("--seed", type=int, metavar="N", help="override the experiment's seed")
    parser.add_argument("--duration-s", type=float, metavar="S",
                        help="override the experiment's duration (simulated seconds)")
    parser.add_argument("--lenient", action="store_true",
                        help="trace workloads: drop invalid trace rows instead of failing (the "
                             "dropped rows are counted, logged and written to the summary)")
    parser.add_argument("--no-plot", action="store_true", help="skip timeline.png")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar and no table")
    parser.add_argument("--show-default", action="store_true",
                        help="print the default experiment's TOML and exit")
    parser.add_argument("--versus", metavar="A,B,...",
                        help="comma-separated baselines to run on the same workload and seed and "
                             "compare with (default: static,cap-to-budget for the default "
                             "experiment, none for a CONFIG)")
    parser.add_argument("--no-versus", dest="versus", action="store_const", const="",
                        help="run no baseline")
    # earlier spellings
    parser.add_argument("--versus-static", dest="versus", action="store_const", const="static",
                        help="deprecated spelling of --versus static")
    parser.add_argument("--no-versus-static", dest="versus", action="store_const", const="",
                        help="deprecated spelling of --no-versus")


def _from_paths(value: str):
    """(config.toml, provenance.json or None) of a recorded run."""
    from pathlib import Path

    from palsctl.errors import ConfigError
    from palsctl.experiment.provenance import CONFIG_FILE, PROVENANCE_FILE

    p = Path(value)
    cfg = p / CONFIG_FILE if p.is_dir() else p
    if not cfg.is_file():
        raise ConfigError("no recorded config here (expected a results folder or its "
                          f"{CONFIG_FILE})", key="--from", value=value)
    prov = cfg.parent / PROVENANCE_FILE
    return cfg, prov if prov.is_file() else None


def _recorded(prov_path) -> dict:
    import json

    from palsctl.errors import ConfigError

    if prov_path is None:
        return {}
    try:
        data = json.loads(prov_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=str(prov_path)) from None
    return data if isinstance(data, dict) else {}


def main(args: argparse.Namespace) -> int:
    """Run ``palsctl run`` with parsed options; return the exit status."""
    import json
    import sys
    from pathlib import Path

    from palsctl.cli.options import duration_override
    from palsctl.errors import ConfigError
    from palsctl.experiment import DEFAULT_EXPERIMENT_TOML, load_experiment, run_experiment
    from palsctl.metrics import summarize

    if args.show_default:
        sys.stdout.write(DEFAULT_EXPERIMENT_TOML)
        return 0
    recorded: dict = {}
    if args.from_:
        if args.config:
            raise ConfigError("give CONFIG or --from, not both", key="--from", value=args.from_)
        config_path, prov_path = _from_paths(args.from_)
        recorded = _recorded(prov_path)
        cfg = load_experiment(config_path)
    else:
        cfg = load_experiment(args.config)
    if args.duration_s is not None:
        cfg = cfg.with_overrides(duration_s=duration_override(args.duration_s, cfg.dt_s))
    if args.seed is not None:
        if args.seed < 0:
            raise ConfigError("must be >= 0", key="--seed", value=args.seed)
        cfg = cfg.with_overrides(seed=args.seed)
    if args.lenient:
        cfg = cfg.with_overrides(workload={**cfg.workload, "lenient": True})
    if args.out:
        out = Path(args.out)
    elif args.from_:
        out = config_path.parent.with_name(config_path.parent.name + "-rerun")
    else:
        out = Path("results") / cfg.name
    if args.from_ and out.resolve() == config_path.parent.resolve():
        raise ConfigError("would overwrite the run it reproduces; choose another folder",
                          key="--out", value=str(out))

    controller = args.controller or cfg.controller_name
    baselines = _baselines(args, recorded, controller)
    source = config_path if args.from_ else (Path(args.config) if args.config else None)
    if source is not None and source.is_file():
        _refuse_overwriting(source, out, args.json, baselines)
    if recorded:
        _note_differences(recorded)

    records: dict[str, RunRecord] = {}
    if args.quiet:
        record = run_experiment(cfg, controller=args.controller)
        for name in baselines:
            records[name] = run_experiment(cfg, controller=name)
    else:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      TextColumn("{task.completed:>6.0f}/{task.total:.0f} s simulated"),
                      TimeElapsedColumn(), transient=True) as bar:
            def run_with_bar(name: str | None, label: str):
                task = bar.add_task(f"{cfg.name}: {label}", total=cfg.duration_s)

                def progress(done: int, total: int) -> None:
                    if done % 20 == 0 or done == total:
                        bar.update(task, completed=done * cfg.dt_s)

                return run_experiment(cfg, controller=name, progress=progress)

            record = run_with_bar(args.controller, controller)
            for name in baselines:
                records[name] = run_with_bar(name, f"{name} (same workload and seed)")

    summary = summarize(record)
    summary["experiment"] = cfg.name
    summary["workload"] = record.meta.get("workload")
    for name, rec in records.items():
        add_gain_vs(summary, summarize(rec), name)
    if records:
        summary["headline"] = headline(summary)
    written = _write_results(out, cfg, args, record, records, summary, baselines)
    if args.json:
        text = json.dumps(summary, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            try:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                from palsctl.adapters.state import atomic_write_text
                atomic_write_text(Path(args.json), text)
            except OSError as exc:
                raise ConfigError(f"cannot write: {exc}", key="--json", value=args.json) from None
            written.append(Path(args.json))
    if not args.quiet:
        _print_report(cfg, summary, written)
    return 0


def _baselines(args: argparse.Namespace, recorded: dict, controller: str) -> tuple[str, ...]:
    from palsctl.errors import ConfigError, UnknownNameError
    from palsctl.registry import resolve

    if args.versus is not None:
        names = [n.strip() for n in args.versus.split(",") if n.strip()]
    elif recorded:
        names = [b.get("name") for b in recorded.get("baselines", []) if isinstance(b, dict)]
    elif args.config is None and not args.from_:
        names = list(DEFAULT_BASELINES)
    else:
        names = []
    for n in names:
        try:
            resolve(n, "controller")
        except UnknownNameError as exc:
            raise ConfigError(str(exc), key="--versus", value=n) from None
    return tuple(dict.fromkeys(n for n in names if n != controller))


def _note_differences(recorded: dict) -> None:
    """Say when the recorded run was made by another palsctl or source revision."""
    import sys

    from palsctl import __version__
    from palsctl.experiment.provenance import git_revision

    was, now = recorded.get("palsctl_version"), __version__
    if was and was != now:
        print(f"palsctl run: note: the run was recorded with palsctl {was}, this is {now}",
              file=sys.stderr)
    g_was, g_now = recorded.get("git") or {}, git_revision() or {}
    if g_was.get("commit") and g_now.get("commit") and g_was["commit"] != g_now["commit"]:
        print(f"palsctl run: note: the run was recorded at revision {g_was['commit'][:12]}, "
              f"this is {g_now['commit'][:12]}", file=sys.stderr)


def _refuse_overwriting(source, out, json_path, baselines) -> None:
    """Raise `ConfigError` when a file the run writes is the experiment file it reads."""
    from palsctl.cli.options import not_the_input
    from palsctl.errors import ConfigError
    from palsctl.experiment.provenance import CONFIG_FILE, PROVENANCE_FILE

    not_the_input("--json", json_path, str(source), "experiment file")
    src = source.resolve()
    names = ["steps.csv", "summary.json", "timeline.png", CONFIG_FILE, PROVENANCE_FILE] \
        + [f"steps-{b}.csv" for b in baselines]
    hit = next((n for n in names if (out / n).resolve() == src), None)
    if hit is not None:
        raise ConfigError(f"would overwrite the experiment file it runs (the results' {hit}); "
                          f"choose another folder or move the file", key="--out", value=str(out))


def _write_results(out, cfg, args, record, records, summary, baselines) -> list:
    import json

    from palsctl.errors import ConfigError
    from palsctl.experiment.provenance import (
        CONFIG_FILE,
        PROVENANCE_FILE,
        config_to_toml,
        provenance,
    )

    header = (f"# The resolved experiment of this run: every default filled in; rerun with\n"
              f"#   palsctl run --from {out / CONFIG_FILE}\n")
    from palsctl.experiment.results import ResultsDir, steps_file_entry

    try:   # into a temporary folder, moved into place when whole (never torn)
        with ResultsDir(out) as rd:
            record.write_csv(rd.file("steps.csv"))
            for name, rec in records.items():
                rec.write_csv(rd.file(f"steps-{name}.csv"))
            summary["steps_file"] = steps_file_entry(rd.file("steps.csv"))
            rd.file("summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            rd.file(CONFIG_FILE).write_text(config_to_toml(cfg, controller=args.controller,
                                                           header=header))
            prov = provenance(cfg, controller=args.controller, baselines=baselines)
            rd.file(PROVENANCE_FILE).write_text(json.dumps(prov, indent=2, default=str) + "\n")
            if not args.no_plot:
                from palsctl.plotting import plot_timeline

                plot_timeline(record, rd.file("timeline.png"), baselines=records)
            written = rd.commit()
    except OSError as exc:
        raise ConfigError(f"cannot write the results: {exc}", key="--out", value=str(out)) from None
    return written


def _slug(name: str) -> str:
    return name.replace("-", "_")


def add_gain_vs(summary: dict, base: dict, name: str = "static") -> dict:
    """Add the comparison with baseline ``name`` (run on the same workload and seed) to
    ``summary``: ``gain_vs_<name>`` (tokens/J ratio), ``qos_violation_rate_vs_<name>``
    (difference, in rate units; ``-`` in names becomes ``_``), and the baseline's main figures
    (`STATIC_KEYS`) under ``baselines[name]`` (and under ``static`` for static)."""
    a, b = summary.get("tokens_per_joule"), base.get("tokens_per_joule")
    summary[f"gain_vs_{_slug(name)}"] = a / b if a is not None and b else None
    qa, qb = summary.get("qos_violation_rate"), base.get("qos_violation_rate")
    summary[f"qos_violation_rate_vs_{_slug(name)}"] = qa - qb \
        if qa is not None and qb is not None else None
    figures = {k: base.get(k) for k in STATIC_KEYS}
    summary.setdefault("baselines", {})[name] = figures
    if name == "static":
        summary["static"] = figures
    return summary


def _judge(a: float | None, b: float | None, higher_is_better: bool, same_within: float) -> str:
    if a is None or b is None:
        return ""
    if abs(a - b) <= same_within:
        return "same"
    return "better" if (a > b) == higher_is_better else "worse"


def headline(summary: dict) -> dict[str, list[str]]:
    """The comparison with each baseline in ``summary["baselines"]``, in words: baseline name ->
    ``["tokens per joule 1.252 vs 1.088 (+15.0 %, better)", "QoS violations 8.5 % vs 4.0 %
    (worse)", ...]``. Figures equal at the precision shown are "same"."""
    s = summary
    out: dict[str, list[str]] = {}
    for name, b in (s.get("baselines") or {}).items():
        parts = []
        a_tpj, b_tpj = s.get("tokens_per_joule"), b.get("tokens_per_joule")
        if a_tpj is not None and b_tpj:
            rel = a_tpj / b_tpj - 1
            verdict = _judge(round(rel * 100, 1), 0.0, True, 0.0)
            parts.append(f"tokens per joule {a_tpj:.3f} vs {b_tpj:.3f} "
                         f"({rel * 100:+.1f} %, {verdict})")
        for key, label, better_high in (("qos_violation_rate", "QoS violations", False),
                                        ("slo_attainment", "SLO attainment", True)):
            x, y = s.get(key), b.get(key)
            if x is None or y is None:
                continue
            verdict = _judge(round(x * 100, 1), round(y * 100, 1), better_high, 0.0)
            parts.append(f"{label} {x * 100:.1f} % vs {y * 100:.1f} % ({verdict})")
        x, y = s.get("time_over_budget_s"), b.get("time_over_budget_s")
        if x is not None and y is not None and (x > 0 or y > 0):
            parts.append(f"time over budget {x:.0f} s vs {y:.0f} s "
                         f"({_judge(round(x), round(y), False, 0.0)})")
        out[name] = parts
    return out


def headline_text(summary: dict) -> str:
    """`headline` as the lines `palsctl run` prints."""
    lines = []
    for name, parts in (summary.get("headline") or {}).items():
        words = BASELINE_WORDS.get(name)
        lines.append(f"{summary['controller']} vs {name}" + (f" ({words})" if words else "")
                     + ":")
        lines += [f"  {p}" for p in parts]
    return "\n".join(lines)


def _print_report(cfg, s: dict, written) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v, fmt="{:.3g}", unit=""):
        return "—" if v is None else fmt.format(v) + unit

    wl = s.get("workload") or {}
    bases = s.get("baselines") or {}
    title = f"{cfg.name}: controller {s['controller']}" + (
        f" vs {', '.join(bases)} (same workload and seed)" if bases else "")
    t = Table(title=title, show_header=bool(bases))
    t.add_column("metric", style="bold")
    t.add_column(s["controller"], justify="right")
    for name in bases:
        t.add_column(name, justify="right")
    cells = {
        "tokens per joule": ("tokens_per_joule", "{:.4g}", " tok/J", 1),
        "energy": ("energy_j", "{:.1f}", " kJ", 1e-3),
        "generated tokens": ("generated_tokens", "{:,.0f}", "", 1),
        "mean power": ("mean_power_w", "{:.0f}", " W", 1),
        "mean throughput": ("mean_throughput_tok_s", "{:.0f}", " tok/s", 1),
        "QoS violation rate": ("qos_violation_rate", "{:.1%}", "", 1),
        "SLO attainment": ("slo_attainment", "{:.1%}", "", 1),
        "time over budget": ("time_over_budget_s", "{:.0f}", " s", 1),
        "energy over budget": ("energy_over_budget_j", "{:.0f}", " J", 1),
    }

    def cell(d: dict, label: str) -> str:
        key, fmt, unit, scale = cells[label]
        v = d.get(key)
        return f(None if v is None else v * scale, fmt, unit)

    rows = [(label, cell(s, label)) for label in cells]
    rows.insert(5, ("offered demand", f(wl.get("demand_tok_s"), "{:.0f}", " tok/s")))
    rows += [
        ("settling time (worst)", f(s["settling_time_s"], "{:.0f}", " s")
         + (f"  ({s['unsettled_steps']} unsettled)" if s.get("unsettled_steps") else "")),
        ("request TTFT p90", f(s["request_ttft_p90_s"], "{:.3f}", " s")),
        ("request TPOT p90", f(s["request_tpot_p90_s"], "{:.3f}", " s")),
        ("guard interventions", f"{s['guard_interventions']} / {s['steps']} steps"),
        ("controller step p50 / p99",
         f"{f(s['step_latency_p50_s'] and s['step_latency_p50_s'] * 1e6, '{:.0f}')}"
         f" / {f(s['step_latency_p99_s'] and s['step_latency_p99_s'] * 1e6, '{:.0f}')} µs"),
        ("duration", f(s["duration_s"], "{:.0f}", " s simulated")),
    ]
    if wl.get("dropped_rows"):
        rows.append(("[red]trace rows dropped[/red]",
                     f"[red]{wl['dropped_rows']} of {wl['trace_rows']} (--lenient)[/red]"))
    if s.get("power_tracking_mae_w") is not None:
        rows.insert(10, ("power tracking MAE", f(s["power_tracking_mae_w"], "{:.1f}", " W")))
    if s.get("safe_holds"):
        rows.insert(-2, ("[red]safe holds[/red]",
                         f"[red]{s['safe_holds']} steps (stale data or controller failure)[/red]"))
    for label, value in rows:
        t.add_row(label, value, *[cell(b, label) if label in cells else ""
                                  for b in bases.values()])
    console = Console()
    console.print(t)
    if s.get("headline"):
        console.print(headline_text(s), highlight=False, soft_wrap=True)
    console.print("wrote " + ", ".join(str(p) for p in written))
