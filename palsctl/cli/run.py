"""``palsctl run [CONFIG]``: run one experiment in closed loop and write its report."""
from __future__ import annotations

import argparse

HELP = "run an experiment (TOML; none: the embedded default) and write steps.csv, summary.json, timeline.png"

# summary keys of the `static` run reported beside the controller's (default experiment)
STATIC_KEYS = ("tokens_per_joule", "qos_violation_rate", "slo_attainment", "time_over_budget_s",
               "energy_over_budget_j", "energy_j", "generated_tokens", "mean_power_w")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG",
                        help="experiment TOML file (default: the embedded default experiment)")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default: results/<name>)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the summary JSON to PATH ('-' for stdout)")
    parser.add_argument("--controller", metavar="NAME",
                        help="override the configured controller (defaults for its parameters)")
    parser.add_argument("--seed", type=int, metavar="N", help="override the experiment's seed")
    parser.add_argument("--duration-s", type=float, metavar="S",
                        help="override the experiment's duration (simulated seconds)")
    parser.add_argument("--no-plot", action="store_true", help="skip timeline.png")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar and no table")
    parser.add_argument("--show-default", action="store_true",
                        help="print the default experiment's TOML and exit")
    parser.add_argument("--versus-static", dest="versus_static", action="store_true",
                        default=None,
                        help="also run `static` on the same workload and seed and report the gain "
                             "(default: on for the default experiment)")
    parser.add_argument("--no-versus-static", dest="versus_static", action="store_false",
                        help="do not run the `static` comparison")


def main(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from palsctl.experiment import DEFAULT_EXPERIMENT_TOML, load_experiment, run_experiment
    from palsctl.errors import ConfigError
    from palsctl.metrics import summarize

    if args.show_default:
        sys.stdout.write(DEFAULT_EXPERIMENT_TOML)
        return 0
    cfg = load_experiment(args.config)
    if args.duration_s is not None:
        if not (args.duration_s >= cfg.dt_s):
            raise ConfigError(f"must be at least dt_s ({cfg.dt_s:g} s)", key="--duration-s",
                              value=args.duration_s)
        cfg = cfg.with_overrides(duration_s=args.duration_s)
    if args.seed is not None:
        if args.seed < 0:
            raise ConfigError("must be >= 0", key="--seed", value=args.seed)
        cfg = cfg.with_overrides(seed=args.seed)
    out = Path(args.out) if args.out else Path("results") / cfg.name

    controller = args.controller or cfg.controller_name
    versus = args.versus_static
    if versus is None:
        versus = args.config is None
    versus = bool(versus) and controller != "static"

    static_record = None
    if args.quiet:
        record = run_experiment(cfg, controller=args.controller)
        if versus:
            static_record = run_experiment(cfg, controller="static")
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
            if versus:
                static_record = run_with_bar("static", "static (same workload and seed)")

    summary = summarize(record)
    summary["experiment"] = cfg.name
    summary["workload"] = record.meta.get("workload")
    if static_record is not None:
        add_gain_vs_static(summary, summarize(static_record))
    try:
        out.mkdir(parents=True, exist_ok=True)
        record.write_csv(out / "steps.csv")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        written = [out / "steps.csv", out / "summary.json"]
        if not args.no_plot:
            from palsctl.plotting import plot_timeline

            written.append(plot_timeline(record, out / "timeline.png"))
    except OSError as exc:
        raise ConfigError(f"cannot write the results: {exc}", key="--out", value=str(out)) from None
    if args.json:
        text = json.dumps(summary, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            try:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(text)
            except OSError as exc:
                raise ConfigError(f"cannot write: {exc}", key="--json", value=args.json) from None
            written.append(Path(args.json))
    if not args.quiet:
        _print_table(cfg, summary, written)
    return 0


def add_gain_vs_static(summary: dict, static: dict) -> dict:
    """Add the comparison with `static` on the same workload and seed to ``summary``:
    ``gain_vs_static`` (tokens/J ratio), ``qos_violation_rate_vs_static`` (difference, in
    rate units) and ``static``: static's main figures (`STATIC_KEYS`)."""
    a, b = summary.get("tokens_per_joule"), static.get("tokens_per_joule")
    summary["gain_vs_static"] = a / b if a is not None and b else None
    qa, qb = summary.get("qos_violation_rate"), static.get("qos_violation_rate")
    summary["qos_violation_rate_vs_static"] = qa - qb if qa is not None and qb is not None \
        else None
    summary["static"] = {k: static.get(k) for k in STATIC_KEYS}
    return summary


def _print_table(cfg, s: dict, written) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v, fmt="{:.3g}", unit=""):
        return "—" if v is None else fmt.format(v) + unit

    wl = s.get("workload") or {}
    st = s.get("static")
    title = f"{cfg.name}: controller {s['controller']}" + (
        " vs static (same workload and seed)" if st is not None else "")
    t = Table(title=title, show_header=st is not None)
    t.add_column("metric", style="bold")
    t.add_column(s["controller"], justify="right")
    if st is not None:
        t.add_column("static", justify="right")
    rows = [
        ("tokens per joule", f(s["tokens_per_joule"], "{:.4g}", " tok/J")),
        ("energy", f(s["energy_j"] and s["energy_j"] / 1e3, "{:.1f}", " kJ")),
        ("generated tokens", f(s["generated_tokens"], "{:,.0f}")),
        ("mean power", f(s["mean_power_w"], "{:.0f}", " W")),
        ("mean throughput", f(s["mean_throughput_tok_s"], "{:.0f}", " tok/s")),
        ("offered demand", f(wl.get("demand_tok_s"), "{:.0f}", " tok/s")),
        ("QoS violation rate", f(s["qos_violation_rate"], "{:.1%}")),
        ("SLO attainment", f(s["slo_attainment"], "{:.1%}")),
        ("time over budget", f(s["time_over_budget_s"], "{:.0f}", " s")),
        ("energy over budget", f(s["energy_over_budget_j"], "{:.0f}", " J")),
        ("settling time (worst)", f(s["settling_time_s"], "{:.0f}", " s")
         + (f"  ({s['unsettled_steps']} unsettled)" if s.get("unsettled_steps") else "")),
        ("request TTFT p90", f(s["request_ttft_p90_s"], "{:.3f}", " s")),
        ("request TPOT p90", f(s["request_tpot_p90_s"], "{:.3f}", " s")),
        ("guard interventions", f"{s['guard_interventions']} / {s['steps']} steps"),
        ("controller step p50 / p99", f"{f(s['step_latency_p50_s'] and s['step_latency_p50_s'] * 1e6, '{:.0f}')}"
         f" / {f(s['step_latency_p99_s'] and s['step_latency_p99_s'] * 1e6, '{:.0f}')} µs"),
        ("duration", f(s["duration_s"], "{:.0f}", " s simulated")),
    ]
    if s.get("power_tracking_mae_w") is not None:
        rows.insert(10, ("power tracking MAE", f(s["power_tracking_mae_w"], "{:.1f}", " W")))
    if s.get("safe_holds"):
        rows.insert(-2, ("[red]safe holds[/red]",
                         f"[red]{s['safe_holds']} steps (stale data or controller failure)[/red]"))
    if st is not None:
        cells = {
            "tokens per joule": f(st.get("tokens_per_joule"), "{:.4g}", " tok/J"),
            "energy": f(st.get("energy_j") and st["energy_j"] / 1e3, "{:.1f}", " kJ"),
            "generated tokens": f(st.get("generated_tokens"), "{:,.0f}"),
            "mean power": f(st.get("mean_power_w"), "{:.0f}", " W"),
            "mean throughput": f(st.get("generated_tokens") and s.get("duration_s")
                                 and st["generated_tokens"] / s["duration_s"], "{:.0f}", " tok/s"),
            "QoS violation rate": f(st.get("qos_violation_rate"), "{:.1%}"),
            "SLO attainment": f(st.get("slo_attainment"), "{:.1%}"),
            "time over budget": f(st.get("time_over_budget_s"), "{:.0f}", " s"),
            "energy over budget": f(st.get("energy_over_budget_j"), "{:.0f}", " J"),
        }
        rows = [(*r, cells.get(r[0], "")) for r in rows]
        dq = s.get("qos_violation_rate_vs_static")
        rows.insert(0, ("[bold green]gain vs static (tokens/J)[/bold green]",
                        f"[bold green]{f(s.get('gain_vs_static'), '{:.3f}', '×')}[/bold green]"
                        + ("" if dq is None else f"  (QoS {dq * 100:+.1f} points)"), "1×"))
    for r in rows:
        t.add_row(*r)
    console = Console()
    console.print(t)
    console.print("wrote " + ", ".join(str(p) for p in written))
