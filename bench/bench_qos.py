"""QoS first, joules second: every controller on every scenario of `examples/` (and the default
experiment), several seeds, against `static`, `cap-to-budget` (at the budget itself, and with
the 1.5 % budget margin the model-based controllers keep), `cap-only` (PALS's "Adaptive Cap")
and `hindsight` (the best fixed configuration per segment, chosen in hindsight). Prints one
table per scenario and checks the targets of the QoS-first issue; writes everything to JSON.

    .venv/bin/python bench/bench_qos.py [--seeds 3] [--scenarios default,moe_power_budget]
        [--json bench/results/qos.json]

Held out: ``--dir bench/heldout --no-hindsight`` runs the scenarios of `bench/heldout/` —
models, GPUs, parallelism, arrival processes and budget shapes that no example uses and that
no default was tuned on — with the same controllers and checks (those that need `hindsight`
are left out).

Scenarios whose data is missing (no shared data folder) are skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONTROLLERS = ("search", "mpc", "pi", "cap-only", "cap-to-budget", "static")
MARGIN_VARIANT = "cap-to-budget@1.5%"


def scenarios(names: list[str] | None,
              folder: Path | None = None) -> list[tuple[str, Path | None]]:
    """``(name, path)`` of the scenarios: the default experiment and `examples/` (fleets apart),
    or every TOML of ``folder``."""
    if folder is None:
        out = [("default", None)] + [(p.stem, p) for p in sorted((ROOT / "examples").glob("*.toml"))
                                     if not p.stem.startswith("fleet")]
    else:
        out = [(p.stem, p) for p in sorted(folder.glob("*.toml"))]
    return [s for s in out if not names or s[0] in names]


def run_scenario(cfg, seeds: list[int], hindsight_batches: tuple[int, ...] | None) -> dict:
    from palsctl.controllers.baselines import CapToBudgetController
    from palsctl.experiment.compare import add_derived, aggregate, run_all, summarize_all
    from palsctl.experiment.run import run_experiment

    names = list(CONTROLLERS) + (["hindsight"] if hindsight_batches else [])
    recs = run_all(cfg, names, seeds, hindsight={"batches": hindsight_batches})
    recs[MARGIN_VARIANT] = [run_experiment(cfg, controller=CapToBudgetController(
        budget_margin=0.015), seed=s) for s in seeds]
    summaries = summarize_all(recs)
    res = aggregate(summaries)
    add_derived(res, summaries)
    return res


def checks(name: str, r: dict) -> list[tuple[str, bool, str]]:
    """The issue's targets, evaluated on one scenario's aggregate."""
    s, st, c2b, c2bm = r["search"], r["static"], r["cap-to-budget"], r[MARGIN_VARIANT]
    co, hs = r["cap-only"], r.get("hindsight")
    out = []
    g = s["gain_vs_static"]
    out.append(("search tokens/J >= 1.20x static", g >= 1.20, f"{g:.3f}x"))
    if hs is not None:
        hf = s["hindsight_fraction"]
        out.append(("search >= 0.97x hindsight at <= its QoS",
                    hf >= 0.97 and s["qos_violation_rate"] <= hs["qos_violation_rate"] + 1e-12,
                    f"{hf:.3f}x, QoS {100 * s['qos_violation_rate']:.2f} vs "
                    f"{100 * hs['qos_violation_rate']:.2f} %"))
    for ref, label in ((c2b, "cap-to-budget"), (c2bm, MARGIN_VARIANT)):
        out.append((f"search QoS <= {label}",
                    s["qos_violation_rate"] <= ref["qos_violation_rate"] + 1e-12,
                    f"{100 * s['qos_violation_rate']:.2f} vs "
                    f"{100 * ref['qos_violation_rate']:.2f} %"))
    if (s.get("binding_fraction") or 0.0) == 0.0:
        out.append(("budget never binds: search QoS <= static + 1 pt",
                    s["qos_violation_rate"] <= st["qos_violation_rate"] + 0.01,
                    f"{100 * s['qos_violation_rate']:.2f} vs "
                    f"{100 * st['qos_violation_rate']:.2f} %"))
    else:
        qb, qc = s["qos_violation_rate_binding"], co["qos_violation_rate_binding"]
        ratio = (qc / qb) if qb else float("inf") if qc else None
        out.append(("binding stretches: >= 4x fewer violations than cap-only",
                    ratio is not None and ratio >= 4.0 or (not qb and not qc),
                    f"{100 * qb:.2f} vs {100 * qc:.2f} % "
                    + ("(neither violates)" if ratio is None else f"({ratio:.1f}x)")))
    for ctl in ("search", "mpc"):
        # judged on what the GPUs drew (the energy counter); the power reading's figure, which
        # adds the simulated sensor's 1 % noise, is shown beside it
        late = r[ctl]["time_over_budget_late_counter_s"]
        late_read = r[ctl]["time_over_budget_late_s"]
        out.append((f"{ctl}: no time over budget after the first window of a cut", late == 0.0,
                    f"{late:.1f} s by the energy counter ({late_read:.1f} s by the power "
                    f"reading)"))
        b, c = r[ctl]["batch_changes_per_100s"], r[ctl]["cap_reversals_per_100s"]
        br = r[ctl].get("budget_reversals_per_100s") or 0.0
        out.append((f"{ctl}: batch changes <= 5, cap reversals <= 10 per 100 s",
                    b <= 5 and c <= 10, f"{b:.1f}, {c:.1f} (the budget itself reverses "
                                        f"{br:.1f} times per 100 s)"))
    for ctl in ("pi", "mpc"):
        f = r[ctl]["tokens_per_joule"] / s["tokens_per_joule"]
        ok = f >= 0.95 and r[ctl]["qos_violation_rate"] <= s["qos_violation_rate"] + 1e-12
        out.append((f"{ctl} within 5 % of search's tokens/J at no worse QoS", ok,
                    f"{f:.3f}x, QoS {100 * r[ctl]['qos_violation_rate']:.2f} %"))
    return out


COLS = (("tokens_per_joule", "tok/J", "{:.3f}", 1), ("gain_vs_static", "gain", "{:.3f}", 1),
        ("hindsight_fraction", "hs frac", "{:.3f}", 1),
        ("qos_violation_rate", "QoS %", "{:.2f}", 100),
        ("qos_violation_rate_binding", "QoS bind %", "{:.2f}", 100),
        ("qos_violation_rate_loose", "QoS loose %", "{:.2f}", 100),
        ("throughput_violation_rate", "thr %", "{:.2f}", 100),
        ("time_over_budget_s", "over s", "{:.0f}", 1),
        ("time_over_budget_late_s", "late s", "{:.0f}", 1),
        ("time_over_budget_late_counter_s", "late s (counter)", "{:.0f}", 1),
        ("batch_changes_per_100s", "bch/100s", "{:.1f}", 1),
        ("cap_reversals_per_100s", "crev/100s", "{:.1f}", 1),
        ("budget_reversals_per_100s", "budget rev/100s", "{:.1f}", 1))


def table(name: str, r: dict) -> str:
    head = "| controller | " + " | ".join(h for _, h, _, _ in COLS) + " |"
    lines = [f"#### {name}", "", head, "|" + "---|" * (len(COLS) + 1)]
    for ctl, a in r.items():
        cells = []
        for k, _, fmt, sc in COLS:
            v = a.get(k)
            cells.append("–" if v is None else fmt.format(v * sc))
        lines.append(f"| {ctl} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scenarios", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--json", default=str(HERE / "results" / "qos.json"))
    ap.add_argument("--hindsight-batches", default="64,128,256",
                    help="batch limits of hindsight's grid (caps: every 25 W)")
    ap.add_argument("--no-hindsight", action="store_true",
                    help="leave the hindsight reference (and the checks that need it) out")
    ap.add_argument("--dir", default=None,
                    help="run every TOML of this folder instead of the examples")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _machine import machine as describe

    from palsctl.errors import ConfigError
    from palsctl.experiment import load_experiment

    print(describe(), flush=True)
    names = args.scenarios.split(",") if args.scenarios else None
    results, all_checks = {}, {}
    folder = Path(args.dir) if args.dir else None
    if folder is not None and not folder.is_dir():
        print(f"error: --dir {folder}: not a folder", file=sys.stderr)
        return 2
    hs_batches = None if args.no_hindsight else \
        tuple(int(b) for b in args.hindsight_batches.split(","))
    for name, path in scenarios(names, folder):
        try:
            cfg = load_experiment(path)
        except ConfigError as exc:
            print(f"\n{name}: skipped ({exc})", flush=True)
            continue
        t0 = time.perf_counter()
        r = run_scenario(cfg, [cfg.seed + i for i in range(args.seeds)], hs_batches)
        results[name] = r
        all_checks[name] = [{"check": c, "ok": ok, "value": v} for c, ok, v in checks(name, r)]
        print("\n" + table(f"{name} ({args.seeds} seeds, {time.perf_counter() - t0:.0f} s)", r),
              flush=True)
        for c in all_checks[name]:
            print(f"  [{'ok' if c['ok'] else 'MISS'}] {c['check']}: {c['value']}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": describe(), "seeds": args.seeds,
                                           "results": results, "checks": all_checks},
                                          indent=1, sort_keys=True, default=str) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
