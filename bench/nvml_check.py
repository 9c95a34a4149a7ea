"""Read-only check of the NVML adapter on a real GPU (never changes a GPU setting).

Reads constraints, names and clocks; samples power (instant and the driver's average) and the
energy counter for ``--seconds`` at ``--hz``; compares the energy counter's delta with the
integral of the sampled power; times one `NvmlPower.read_gpus()`; exercises `set_power_cap_w` in
dry-run only and checks that the enforced limit did not move.

    python bench/nvml_check.py [--seconds 10] [--hz 10] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    from palsctl.adapters.nvml import NvmlPower

    out: dict = {"python": platform.python_version()}
    nv = NvmlPower(dry_run=True)
    try:
        out["gpus"] = [c.__repr__() for c in nv.constraints]
        print("constraints:", *nv.constraints, sep="\n  ")
        t_read = []
        samples = []
        n = max(2, int(args.seconds * args.hz))
        t_start = time.monotonic()
        for k in range(n):
            target = t_start + k / args.hz
            time.sleep(max(0.0, target - time.monotonic()))
            t0 = time.perf_counter()
            r = nv.read_gpus()
            t_read.append(time.perf_counter() - t0)
            samples.append((time.monotonic(), r))
        for g in range(len(nv.indices)):
            ts = [t for t, _ in samples]
            inst = [r[g].power_instant_w for _, r in samples]
            avg = [r[g].power_avg_w for _, r in samples]
            e = [r[g].energy_j for _, r in samples]
            span = ts[-1] - ts[0]
            integ_avg = sum((avg[i] + avg[i + 1]) / 2 * (ts[i + 1] - ts[i])
                            for i in range(len(ts) - 1))
            integ_inst = sum((inst[i] + inst[i + 1]) / 2 * (ts[i + 1] - ts[i])
                             for i in range(len(ts) - 1))
            row = {
                "index": nv.indices[g], "span_s": span,
                "power_instant_w": {"min": min(inst), "median": statistics.median(inst),
                                    "max": max(inst)},
                "power_avg_w": {"min": min(avg), "median": statistics.median(avg),
                                "max": max(avg)},
                "energy_delta_j": None if e[0] is None else e[-1] - e[0],
                "integral_avg_power_j": integ_avg, "integral_instant_power_j": integ_inst,
                "sm_clock_mhz": sorted({r[g].sm_clock_mhz for _, r in samples})[:5],
                "sw_power_cap": sorted({str(r[g].sw_power_cap) for _, r in samples}),
                "power_limit_w": samples[-1][1][g].power_limit_w,
            }
            out.setdefault("readings", []).append(row)
            print(json.dumps(row, indent=1))
        out["read_ms"] = {"median": 1e3 * statistics.median(t_read), "max": 1e3 * max(t_read)}
        print(f"NvmlPower.read_gpus(): median {out['read_ms']['median']:.3f} ms, "
              f"max {out['read_ms']['max']:.3f} ms")
        before = [r.power_limit_w for r in nv.read_gpus()]
        c = nv.constraints[0]
        want = c.power_cap_min_w + 0.5 * (c.power_cap_max_w - c.power_cap_min_w) + 0.7
        applied = nv.set_power_cap_w(want)
        after = [r.power_limit_w for r in nv.read_gpus()]
        out["dry_run"] = {"asked_w": want, "reported_w": applied, "limit_before_w": before,
                          "limit_after_w": after, "unchanged": before == after}
        print("dry run:", out["dry_run"])
    finally:
        nv.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if out["dry_run"]["unchanged"] else 1


if __name__ == "__main__":
    sys.exit(main())
