"""Compare controllers from Python: the library behind ``palsctl compare``.

Runs `static`, `search` (PALS), `pi`, `mpc` and the `oracle` on the throughput-target scenario
(same plant, same requests, same seed), prints tokens/J, the gain over `static` and the QoS
violation rate, and saves an overlaid timeline. Headless (matplotlib Agg).

    python examples/compare_controllers.py [--duration-s 120] [--out results/compare-example]
"""
from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=None,
                    help="simulated seconds (default: the scenario's)")
    ap.add_argument("--out", default="results/compare-example", help="folder for the plot")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from palsctl.experiment import compare, load_experiment
    from palsctl.plotting import plot_overlay

    cfg = load_experiment(HERE / "moe_throughput_targets.toml")
    if args.duration_s is not None:
        cfg = cfg.with_overrides(duration_s=args.duration_s)
    records: dict = {}
    result = compare(cfg, ["static", "search", "pi", "mpc"], seeds=[args.seed], records=records)
    print(f"{'controller':12s} {'tokens/J':>9s} {'vs static':>9s} {'QoS viol':>9s}")
    for name, agg in result.items():
        q = agg.get("qos_violation_rate")
        print(f"{name:12s} {agg['tokens_per_joule']:9.3f} {agg['gain_vs_static']:9.3f} "
              f"{'-' if q is None else f'{100 * q:8.1f}%'}")
    png = plot_overlay({n: rs[0] for n, rs in records.items()}, Path(args.out) / "timeline.png",
                       title=f"{cfg.name} (seed {args.seed})")
    print(f"timeline: {png}")


if __name__ == "__main__":
    main()
