"""``palsctl calibrate``: fit the simulated plant's constants to measured vLLM runs."""
from __future__ import annotations

import argparse

__all__ = ["HELP", "add_arguments", "main", "print_summary"]

HELP = ("fit the simulated plant's global constants (H100 and B200 sets) to the ML.ENERGY "
        "measurements and print the errors per row, family, parallelism and GPU (--check: "
        "evaluate the committed constants against the targets)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``palsctl calibrate`` to its parser."""
    parser.add_argument("--check", action="store_true",
                        help="evaluate the committed constants (no fit); exit 1 if a target is "
                             "missed")
    parser.add_argument("--json", metavar="PATH",
                        help="write the full report (per-row table) as JSON")
    parser.add_argument("--data", metavar="DIR",
                        help="the data folder holding mlenergy-v3/llm_configs.csv (default: "
                             "PALSCTL_DATA, else the data folder beside a source checkout, else "
                             "the user cache; see palsctl data)")
    parser.add_argument("--csv", metavar="PATH",
                        help="the ML.ENERGY llm_configs.csv file itself (instead of --data)")
    parser.add_argument("--write", metavar="PATH",
                        help="write the fitted constants file (the committed one is "
                             "palsctl/data/calibration.json)")
    parser.add_argument("--plot", metavar="PNG",
                        help="write a predicted-vs-measured PNG (throughput, power, median ITL)")
    parser.add_argument("--no-lofo", action="store_true",
                        help="skip the leave-one-family-out refits")
    parser.add_argument("--quiet", action="store_true", help="print the summary only, no row table")


def _pct(x: float) -> str:
    return f"{100 * x:+6.1f}%"


def _print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'model':<20} {'task':<16} {'gpus':>4} {'par':<5} {'batch':>5}  {'thr meas':>9} "
          f"{'sim':>9} {'err':>7}  {'W meas':>7} {'sim':>7} {'err':>7}  {'ITL ms':>7} {'sim':>7} "
          f"{'err':>7}")
    for r in rows:
        print(f"{r['model']:<20} {r['task']:<16} {r['num_gpus']:>4} {r['parallelism']:<5} "
              f"{r['batch']:>5}  {r['thr_meas']:>9.0f} {r['thr_sim']:>9.0f} {_pct(r['err_thr'])}  "
              f"{r['power_meas']:>7.0f} {r['power_sim']:>7.0f} {_pct(r['err_power'])}  "
              f"{1e3 * r['itl_meas']:>7.1f} {1e3 * r['itl_sim']:>7.1f} {_pct(r['err_itl'])}")


def _line(label: str, s: dict) -> str:
    return (f"{label:<34} {s['rows']:>4}  {s['mape_throughput']:>6.1%}  {s['mape_power']:>6.1%}  "
            f"{s['mape_itl']:>6.1%}")


def print_summary(report: dict) -> None:
    """The error tables of a calibration report (median absolute percentage errors)."""
    print(f"\n{'median |error|':<34} {'rows':>4}  {'thr':>6}  {'power':>6}  {'ITL':>6}")
    for grp in ("h100", "b200"):
        print(_line(f"{grp.upper()} all", report[grp]))
        for k, s in report["breakdown"][grp].items():
            print(_line(f"  {grp.upper()} {k}", s))
    print(_line("expert parallel (tp+ep, ep), all GPUs", report["ep"]))
    ex = report["excluded"]
    if ex["rows"]:
        print(_line("excluded (not fitted)", ex["summary"]))
        for k, why in ex["reasons"].items():
            print(f"  excluded '{k}': {why}")
    for grp, fams in report.get("lofo", {}).items():
        for fam, s in fams.items():
            print(_line(f"{grp.upper()} leave out {fam}", s))


def _csv_path(args: argparse.Namespace) -> str | None:
    """The ML.ENERGY CSV: ``--csv``, else inside ``--data`` (a folder; a file there is the old
    meaning of ``--data``, still accepted with a warning), else None (the data folder lookup)."""
    import sys
    from pathlib import Path

    from palsctl.errors import ConfigError
    from palsctl.paths import data_file
    from palsctl.plants.sim import calibration as cal

    if args.csv is not None and args.data is not None:
        raise ConfigError("give --csv or --data, not both", key="--csv", value=args.csv)
    if args.data is None and args.csv is None:
        return None
    key, path = ("--csv", Path(args.csv)) if args.csv is not None else ("--data", Path(args.data))
    if key == "--data" and not (path.suffix.lower() == ".csv" or path.is_file()):
        return str(data_file(cal.DATA_RELATIVE, explicit=path))   # the data folder
    if key == "--data":
        print("palsctl calibrate: warning: --data with a CSV file is deprecated; use --csv "
              "(--data names the data folder)", file=sys.stderr)
    if not path.is_file():
        raise ConfigError("file not found", key=key, value=str(path))
    return str(path)


def main(args: argparse.Namespace) -> int:
    """Run ``palsctl calibrate`` with parsed options; return the exit status."""
    import json
    import sys

    from palsctl.plants.sim import calibration as cal
    from palsctl.plants.sim.gpu import default_constants

    def progress(msg: str) -> None:
        print(f"calibrate: {msg}", file=sys.stderr, flush=True)

    csv_path = _csv_path(args)
    rows = cal.load_rows(csv_path, with_excluded=True)
    committed = {"h100": default_constants("h100-sxm"), "b200": default_constants("b200")}
    if args.check:
        report = cal.evaluate(committed, rows)
        if not args.no_lofo:
            report.update(cal.leave_one_family_out(rows, committed, progress=progress))
    else:
        # from the built-in starting values, so the committed file is reproducible
        report = cal.calibrate(csv_path, lofo=not args.no_lofo, progress=progress, rows=rows)
    if not args.quiet:
        _print_rows("H100 rows (fitted: H100 constants)", report["rows_h100"])
        _print_rows("B200 rows (fitted: B200 constants)", report["rows_b200"])
        if report["rows_excluded"]:
            _print_rows("excluded rows (not fitted)", report["rows_excluded"])
    for key, consts in report["constants_by_gpu"].items():
        print(f"\nconstants {key}: " + ", ".join(f"{k}={v:.4g}" for k, v in consts.items()))
    print_summary(report)
    a = report["a100_caps"]
    print(f"\nA100 4x mixtral-8x7b, 100/5 tokens: batch-64 tokens/J peaks at {a['peak_cap_w']} W, "
          f"{a['tpj_gain']:+.1%} vs 400 W, keeping {a['thr_keep']:.1%} of the throughput; "
          f"batch-1 draw <= {a['b1_max_power_per_gpu_w']:.0f} W per GPU; throughput rises with "
          f"batch at every cap: {a['throughput_rises_with_batch']}")
    m = report["moe_batch_scaling"]
    lo, hi = m["measured"]
    print(f"A100 4x deepseek-moe-16b, 100/5 tokens: batch-64 / batch-1 throughput "
          f"{min(m['ratio_b64_b1']):.1f}-{max(m['ratio_b64_b1']):.1f}x over caps "
          f"{m['caps_w'][0]}-{m['caps_w'][-1]} W (published sweep: {lo:g}-{hi:g}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
            fh.write("\n")
    if args.plot:
        cal.plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    if args.write:
        cal.save_constants(report, args.write)
        print(f"wrote {args.write}")
    print()
    targets = cal.issue_targets(report)
    for what, got, tgt, ok in targets:
        print(f"fidelity target {what}: {got:.1%} (target <= {tgt:.0%}) "
              f"{'met' if ok else 'MISSED'}")
    print(f"fidelity targets met: {sum(ok for *_, ok in targets)} of {len(targets)}")
    fails = cal.check_report(report)
    for f in fails:
        print(f"regression bound missed: {f}")
    if not fails:
        t = cal.TARGETS
        print(f"regression bounds met (the looser limits --check exits 1 on: H100 median "
              f"errors <= {t['mape_throughput']:.0%} / {t['mape_power']:.0%} / "
              f"{t['mape_itl']:.0%}, leave-one-family-out <= {t['lofo_mape']:.0%}, "
              f"A100 cap behaviour)")
    return 1 if (fails and args.check) else 0
