"""``palsctl calibrate``: fit the simulated plant's constants to measured vLLM runs."""
from __future__ import annotations

import argparse

HELP = ("fit the simulated plant's global constants to the ML.ENERGY measurements and print the "
        "per-row errors (--check: evaluate the committed constants against the targets)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="evaluate the committed constants (no fit); exit 1 if a target is missed")
    parser.add_argument("--json", metavar="PATH", help="write the full report (per-row table) as JSON")
    parser.add_argument("--data", metavar="PATH",
                        help="ML.ENERGY llm_configs.csv (default: the shared data folder)")
    parser.add_argument("--write", metavar="PATH",
                        help="write the fitted constants file (the committed one is "
                             "palsctl/data/calibration.json)")
    parser.add_argument("--plot", metavar="PATH", help="write a measured-vs-simulated PNG")
    parser.add_argument("--no-lofo", action="store_true",
                        help="skip the leave-one-family-out refits")
    parser.add_argument("--quiet", action="store_true", help="print the summary only, no row table")


def _pct(x: float) -> str:
    return f"{100 * x:+6.1f}%"


def _print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'model':<20} {'task':<16} {'gpus':>4} {'batch':>5}  {'thr meas':>9} {'sim':>9} {'err':>7}"
          f"  {'W meas':>7} {'sim':>7} {'err':>7}  {'ITL ms':>7} {'sim':>7} {'err':>7}")
    for r in rows:
        print(f"{r['model']:<20} {r['task']:<16} {r['num_gpus']:>4} {r['batch']:>5}  "
              f"{r['thr_meas']:>9.0f} {r['thr_sim']:>9.0f} {_pct(r['err_thr'])}  "
              f"{r['power_meas']:>7.0f} {r['power_sim']:>7.0f} {_pct(r['err_power'])}  "
              f"{1e3 * r['itl_meas']:>7.1f} {1e3 * r['itl_sim']:>7.1f} {_pct(r['err_itl'])}")


def main(args: argparse.Namespace) -> int:
    import json
    import sys

    from palsctl.plants.sim import calibration as cal
    from palsctl.plants.sim.gpu import default_constants

    def progress(msg: str) -> None:
        print(f"calibrate: {msg}", file=sys.stderr, flush=True)

    rows = cal.load_rows(args.data)
    if args.check:
        report = cal.evaluate(default_constants(), rows)
        if not args.no_lofo:
            report.update(cal.leave_one_family_out(rows, default_constants(), progress=progress))
    else:
        report = cal.calibrate(args.data, start=default_constants(), lofo=not args.no_lofo,
                               progress=progress, rows=rows)
    if not args.quiet:
        _print_rows("H100 rows (fitted)", report["rows_h100"])
        _print_rows("B200 rows (not fitted, reported)", report["rows_b200"])
    print("\nconstants: " + ", ".join(f"{k}={v:.4g}" for k, v in report["constants"].items()))
    for gpu in ("h100", "b200"):
        s = report[gpu]
        print(f"{gpu.upper()} ({s['rows']} rows) median |error|: throughput {s['mape_throughput']:.1%}"
              f"  power {s['mape_power']:.1%}  median ITL {s['mape_itl']:.1%}")
    if "lofo" in report:
        for fam, s in report["lofo"].items():
            print(f"leave out {fam:<12} ({s['rows']:>3} rows): throughput {s['mape_throughput']:.1%}"
                  f"  power {s['mape_power']:.1%}  median ITL {s['mape_itl']:.1%}")
    a = report["a100_caps"]
    print(f"A100 4x mixtral-8x7b, 100/5 tokens: batch-64 tokens/J peaks at {a['peak_cap_w']} W, "
          f"{a['tpj_gain']:+.1%} vs 400 W, keeping {a['thr_keep']:.1%} of the throughput; "
          f"batch-1 draw <= {a['b1_max_power_per_gpu_w']:.0f} W per GPU; throughput rises with "
          f"batch at every cap: {a['throughput_rises_with_batch']}")
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
    fails = cal.check_report(report)
    for f in fails:
        print(f"target missed: {f}")
    if not fails:
        print("all calibration targets met")
    return 1 if (fails and args.check) else 0
