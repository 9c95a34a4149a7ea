"""``palsctl fleet run|compare FLEET.toml``: many replicas under one site power budget."""
from __future__ import annotations

import argparse

__all__ = ["HELP", "add_arguments", "main"]

HELP = "run a fleet (pools of replicas under one site budget) or compare allocation policies"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``palsctl fleet`` to its parser."""
    sub = parser.add_subparsers(dest="fleet_command", metavar="{run,compare}")
    for name, helptext in (("run", "run the fleet; write per-replica steps.csv, summary.json, "
                                   "site.csv and site_timeline.png"),
                           ("compare", "run several allocation policies side by side")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("config", metavar="FLEET.toml", help="fleet TOML file")
        p.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: in-process (default); ray: Ray actors (palsctl[cluster])")
        p.add_argument("--address", metavar="ADDR", default=None,
                       help="join this Ray cluster (default: start Ray on 127.0.0.1 only)")
        p.add_argument("--out", metavar="DIR", help="output folder (default: results/<name>)")
        p.add_argument("--json", metavar="PATH",
                       help="also write the summary JSON to PATH ('-' for stdout)")
        p.add_argument("--seed", type=int, metavar="N", help="override the fleet's seed")
        p.add_argument("--duration-s", type=float, metavar="S", help="override duration_s")
        p.add_argument("--quiet", "-q", action="store_true", help="no table")
        if name == "run":
            p.add_argument("--policy", choices=("equal", "proportional", "marginal"),
                           help="override the site's allocation policy")
            p.add_argument("--no-plot", action="store_true", help="skip site_timeline.png")
        else:
            p.add_argument("--policies", default="equal,proportional,marginal",
                           help="comma-separated policies (default: all three)")


def _load(args: argparse.Namespace):
    from palsctl.cli.options import duration_override, not_the_input
    from palsctl.cluster import load_fleet
    from palsctl.errors import ConfigError

    cfg = load_fleet(args.config)
    not_the_input("--json", args.json, args.config, "fleet file")
    if args.duration_s is not None:
        cfg = cfg.with_overrides(duration_s=duration_override(args.duration_s, cfg.dt_s))
    if args.seed is not None:
        if args.seed < 0:
            raise ConfigError("must be >= 0", key="--seed", value=args.seed)
        cfg = cfg.with_overrides(seed=args.seed)
    return cfg


def _write_json(obj, dest: str) -> None:
    import json
    import sys
    from pathlib import Path

    from palsctl.errors import ConfigError

    text = json.dumps(obj, indent=2) + "\n"
    if dest == "-":
        sys.stdout.write(text)
        return
    try:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_text(text)
    except OSError as exc:
        raise ConfigError(f"cannot write: {exc}", key="--json", value=dest) from None


_COLS = (("tokens_per_joule", "tok/J", "{:.3f}"), ("qos_violation_rate", "QoS viol.", "{:.1%}"),
         ("time_over_budget_s", "over budget (s)", "{:.0f}"),
         ("energy_j", "energy (MJ)", "{:.2f}"), ("generated_tokens", "tokens (M)", "{:.2f}"),
         ("allocation_ms_p99", "alloc p99 (ms)", "{:.2f}"))


def _fmt(key: str, fmt: str, v) -> str:
    if v is None:
        return "-"
    if key in ("energy_j", "generated_tokens"):
        v = v / 1e6
    return fmt.format(v)


def _table(title: str, rows: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("")
    for _, head, _ in _COLS:
        t.add_column(head, justify="right")
    for name, s in rows.items():
        t.add_row(name, *[_fmt(k, f, s.get(k)) for k, head, f in _COLS])
    Console().print(t)


def main(args: argparse.Namespace) -> int:
    """Run ``palsctl fleet`` with parsed options; return the exit status."""
    from pathlib import Path

    from palsctl.cluster import run_fleet, summarize_fleet, write_fleet_outputs
    from palsctl.errors import ConfigError

    cmd = getattr(args, "fleet_command", None)
    if cmd is None:
        raise ConfigError("give a sub-command: run or compare", key="fleet")
    cfg = _load(args)
    out = Path(args.out) if args.out else Path("results") / cfg.name
    if cmd == "run":
        if args.policy:
            cfg = cfg.with_overrides(policy=args.policy)
        result = run_fleet(cfg, engine=args.engine, ray_address=args.address)
        try:
            written = write_fleet_outputs(result, out, plot=not args.no_plot)
        except OSError as exc:
            raise ConfigError(f"cannot write the results: {exc}", key="--out",
                              value=str(out)) from None
        summary = summarize_fleet(result)
        if args.json:
            _write_json(summary, args.json)
        if not args.quiet:
            rows = {"site": summary, **{f"  {k}": v for k, v in summary["pools"].items()}}
            _table(f"{cfg.name}: {cfg.site.policy} allocation, {cfg.num_replicas} replicas "
                   f"({args.engine})", rows)
            print(f"wrote {len(written)} files under {out}")
        return 0
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in ("equal", "proportional", "marginal"):
            raise ConfigError("unknown policy; known: equal, proportional, marginal",
                              key="--policies", value=p)
    if not policies:
        raise ConfigError("give at least one policy", key="--policies", value=args.policies)
    summaries: dict[str, dict] = {}
    for p in dict.fromkeys(policies):
        result = run_fleet(cfg.with_overrides(policy=p), engine=args.engine,
                           ray_address=args.address, keep_records=False)
        summaries[p] = summarize_fleet(result)
        try:
            write_fleet_outputs(result, out / p)
        except OSError as exc:
            raise ConfigError(f"cannot write the results: {exc}", key="--out",
                              value=str(out)) from None
    if args.json:
        _write_json(summaries, args.json)
    if not args.quiet:
        _table(f"{cfg.name}: allocation policies, {cfg.num_replicas} replicas ({args.engine})",
               summaries)
    return 0
