"""Controller step latency: replay the measurements and setpoints of one recorded closed-loop
run (moe_throughput_targets, static controller) through each controller and time ``step()``
alone (no guard, no plant). Prints p50/p99 per controller (median over repeats), wall clock
(``perf_counter``) and the thread's CPU time (``thread_time``: on a shared, oversubscribed
machine the wall-clock tail mostly measures the scheduler preempting the process).

    .venv/bin/python bench/bench_controllers.py [--repeats 3] [--steps 600]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "examples" / "moe_throughput_targets.toml"
TARGETS_MS = {"search": 1.0, "pi": 0.05, "mpc": 20.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--controllers",
                    default="search,pi,mpc,cap-only,search-truth,zeus,batch-only,static")
    args = ap.parse_args()

    from palsctl.experiment import load_experiment, run_experiment
    from palsctl.registry import resolve

    cfg = load_experiment(CONFIG).with_overrides(duration_s=float(args.steps))
    rec = run_experiment(cfg, controller="static", seed=0)
    pairs = [(s.measurement, s.setpoint) for s in rec.steps]
    for name in args.controllers.split(","):
        p50s, p99s, c50s, c99s = [], [], [], []
        for _ in range(args.repeats):
            ctl = resolve(name)()
            ctl.setup(limits=rec.limits, dt_s=rec.dt_s, plant_info=rec.plant_info)
            lat = np.empty(len(pairs))
            cpu = np.empty(len(pairs))
            gc.collect()
            gc.disable()
            try:
                for i, (m, sp) in enumerate(pairs):
                    c0 = time.thread_time()
                    t0 = time.perf_counter()
                    ctl.step(m, sp)
                    lat[i] = time.perf_counter() - t0
                    cpu[i] = time.thread_time() - c0
            finally:
                gc.enable()
            p50s.append(float(np.percentile(lat, 50)) * 1e3)
            p99s.append(float(np.percentile(lat, 99)) * 1e3)
            c50s.append(float(np.percentile(cpu, 50)) * 1e3)
            c99s.append(float(np.percentile(cpu, 99)) * 1e3)
        target = TARGETS_MS.get(name)
        print(f"{name:12s} wall p50 {statistics.median(p50s):8.4f} ms  p99 "
              f"{statistics.median(p99s):8.4f} ms | cpu p50 {statistics.median(c50s):8.4f} ms  "
              f"p99 {statistics.median(c99s):8.4f} ms"
              + (f"  (target p99 <= {target} ms)" if target else ""), flush=True)


if __name__ == "__main__":
    main()
