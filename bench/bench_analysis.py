"""Benchmark of the stability analysis (``palsctl.analysis``).

1. ``analyze_loop`` of one PI loop (poles, margins, step metrics), CPU time per call;
2. a 25 x 25 (Kp, Ki) ``stability_map`` and ``recommend_gains`` on it;
3. one step test on the simulated plant + ``identify_fopdt`` (budget loop, and the paired
   throughput step test of the batch loop);
4. the whole ``palsctl analyze`` command on a small experiment (six operating points, no model
   profiling), wall and CPU time of the process, without and with ``--verify``;
5. ``recommend_pi_gains`` for a plant preset, uncached (what a `pi` controller's setup pays
   once per plant), CPU time per call.

Run: ``python bench/bench_analysis.py [--repeat N]``. Prints medians (CPU time: the machine is
shared).
"""
from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine

CONFIG = """\
name = "bench-analyze"
duration_s = 60.0
dt_s = 1.0
seed = 0

[plant]
kind = "sim"
model = "llama-3.1-8b"
gpu = "h100-sxm"
num_gpus = 1
max_batch_launch = 128

[workload]
kind = "poisson"
rate_req_s = 5.0

[setpoint]
throughput_tok_s = "demand"

[controller]
name = "pi"
"""


def cpu_median(fn, repeat: int, inner: int = 1) -> float:
    """Median CPU seconds per call of ``fn`` over ``repeat`` batches of ``inner`` calls."""
    out = []
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(inner):
            fn()
        out.append((time.process_time() - t0) / inner)
    return statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from palsctl.analysis.identify import identify_from_step_test, step_test
    from palsctl.analysis.report import map_grid
    from palsctl.analysis.stability import FOPDT, analyze_loop, recommend_gains, stability_map
    from palsctl.plants.sim import SimPlant

    print(machine())
    plant = FOPDT(gain=1.0, tau_s=0.1, delay_s=0.05, dt_s=1.0, window_s=1.0)
    t = cpu_median(lambda: analyze_loop(plant, kp=0.3, ki=0.5), args.repeat, inner=50)
    print(f"analyze_loop (one PI loop): {t * 1e3:.2f} ms CPU per call")

    grid = map_grid(plant, 0.3, 0.5, 25)
    t = cpu_median(lambda: recommend_gains(plant, smap=stability_map(plant, *grid)),
                   args.repeat)
    print(f"stability_map 25x25 + recommend_gains: {t:.2f} s CPU")

    make = functools.partial(SimPlant, "llama-3.1-8b", "h100-sxm", 1, dt_s=1.0, seed=0,
                             noise=False)
    t = cpu_median(lambda: identify_from_step_test(step_test(
        make, loop="budget", power_cap_w=350.0, max_batch=32, step=20.0)), args.repeat)
    print(f"step test + identification, budget loop: {t:.2f} s CPU")
    t = cpu_median(lambda: identify_from_step_test(step_test(
        make, loop="batch", power_cap_w=480.0, max_batch=32, step=4.0)), args.repeat)
    print(f"paired step test + identification, batch loop: {t:.2f} s CPU")

    from palsctl.analysis import gains as gains_mod

    def uncached():
        gains_mod._recommend.cache_clear()
        gains_mod.preset_gradients.cache_clear()
        gains_mod.recommend_pi_gains(dt_s=1.0, model="mixtral-8x7b", gpu="a100-sxm4-80gb",
                                     num_gpus=4, max_batch_launch=256)

    uncached()     # imports
    t = cpu_median(uncached, args.repeat)
    print(f"recommend_pi_gains (preset, uncached, 3 loops): {t * 1e3:.0f} ms CPU per call")

    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "exp.toml"
        cfg.write_text(CONFIG)
        for extra in ([], ["--verify"]):
            walls, cpus = [], []
            for _ in range(args.repeat):
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                w0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "palsctl", "analyze", str(cfg),
                                "--no-model", *extra], check=False, capture_output=True)
                walls.append(time.perf_counter() - w0)
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
            print(f"palsctl analyze {' '.join(extra)} (6 points, 9 loops + 3 closed-loop budget "
                  f"steps, --no-model): wall {statistics.median(walls):.1f} s, CPU "
                  f"{statistics.median(cpus):.1f} s (runs: "
                  f"{', '.join(f'{w:.1f}' for w in walls)} s wall)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
