"""Benchmark of the closed loop and the default experiment.

1. The default experiment (20 simulated minutes): wall time of ``run_experiment`` (build +
   loop) and of the whole ``palsctl run`` command (process start, imports, CSV, JSON, PNG).
2. Loop overhead per control step beyond plant and controller, measured inside the default
   experiment: the plant's methods and the controller's ``step`` are timed with
   ``perf_counter`` and subtracted from the loop's total; what remains is the loop itself
   (workload arrivals, schedule, safety guard, recording), reported with and without the
   workload's request generation (timed the same way).

Run: ``python bench/bench_loop.py [--repeat N]``. Prints medians.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def machine() -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"nproc {os.cpu_count()}, {cpu}, Python {platform.python_version()}"


class Timed:
    """Wraps a plant or controller; accumulates the time spent in the named methods."""

    def __init__(self, inner, methods):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "total_s", 0.0)
        for name in methods:
            fn = getattr(inner, name)

            def wrapped(*a, _fn=fn, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    object.__setattr__(self, "total_s", self.total_s + time.perf_counter() - t0)
            object.__setattr__(self, name, wrapped)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def run_default_instrumented():
    from palsctl import config as C
    from palsctl.interfaces import Controller, SimulatedPlant
    from palsctl.loop import run_loop

    cfg = C.load_experiment()
    t0 = time.perf_counter()
    ctl = C.build_controller(cfg)
    plant = C.build_plant(cfg)
    workload = C.build_workload(cfg)
    schedule = C.build_schedule(cfg, workload)
    t_build = time.perf_counter() - t0

    tplant = Timed(plant, ["advance", "read", "apply", "submit", "completed"])
    # run_loop needs isinstance(plant, SimulatedPlant): a thin subclass forwarding to the timers
    class PlantProxy(SimulatedPlant):
        limits, dt_s, info = plant.limits, plant.dt_s, plant.info
        now_s = property(lambda self: plant.now_s)
        advance = staticmethod(tplant.advance)
        read = staticmethod(tplant.read)
        apply = staticmethod(tplant.apply)
        submit = staticmethod(tplant.submit)
        completed = staticmethod(tplant.completed)

    ctl_time = {"s": 0.0}
    inner_step = ctl.step

    def timed_step(m, sp):
        t = time.perf_counter()
        try:
            return inner_step(m, sp)
        finally:
            ctl_time["s"] += time.perf_counter() - t
    ctl.step = timed_step  # instance attribute shadows the method
    wl_time = {"s": 0.0}
    inner_between = workload.requests_between

    def timed_between(t0_s, t1_s):
        t = time.perf_counter()
        try:
            return inner_between(t0_s, t1_s)
        finally:
            wl_time["s"] += time.perf_counter() - t
    workload.requests_between = timed_between
    assert isinstance(ctl, Controller)
    t1 = time.perf_counter()
    rec = run_loop(PlantProxy(), ctl, duration_s=cfg.duration_s, schedule=schedule,
                   workload=workload, guard=cfg.guard)
    t_loop = time.perf_counter() - t1
    n = len(rec.steps)
    # the timing wrappers themselves cost ~2 perf_counter calls per wrapped call; that cost
    # lands partly outside the timed spans and is (conservatively) left in the overhead
    overhead = (t_loop - tplant.total_s - ctl_time["s"]) / n
    return {"build_s": t_build, "loop_s": t_loop, "plant_s": tplant.total_s,
            "controller_s": ctl_time["s"], "steps": n, "overhead_per_step_s": overhead,
            "workload_per_step_s": wl_time["s"] / n,
            "overhead_excl_workload_per_step_s": overhead - wl_time["s"] / n}


def loop_microbench(n_steps: int = 20000) -> dict:
    """Per-step cost of run_loop around a plant and a controller that do (almost) nothing,
    minus the cost of calling those same methods directly: the loop's own cost (schedule with
    a step budget, default guard, recording), with no workload."""
    from palsctl.controllers.baselines import StaticController
    from palsctl.interfaces import SimulatedPlant
    from palsctl.loop import run_loop
    from palsctl.types import Action, Limits, Measurement, PlantInfo
    from palsctl.workloads import SetpointSchedule, Steps

    m = Measurement(t_s=1.0, window_s=1.0, power_w=1000.0, energy_j=1000.0,
                    throughput_tok_s=100.0, power_cap_w=400.0, max_batch=256)
    applied = Action(power_cap_w=350.0, max_batch=256)

    class NullPlant(SimulatedPlant):
        limits = Limits(power_cap_min_w=100, power_cap_max_w=400, power_cap_default_w=400,
                        num_gpus=4)
        dt_s = 1.0
        info = PlantInfo(model="null", gpu="null", num_gpus=4, simulated=True)
        now_s = 0.0

        def advance(self, dt_s):
            pass

        def read(self):
            return m

        def apply(self, action):
            return applied

        def completed(self):
            return []

    sched = SetpointSchedule(power_budget_w=Steps([(0, 1400.0), (480, 900.0), (840, 1400.0)]))
    plant, ctl = NullPlant(), StaticController()
    ctl.setup(limits=plant.limits, dt_s=1.0, plant_info=plant.info)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        plant.advance(1.0)
        mm = plant.read()
        a = ctl.step(mm, None)
        plant.apply(a)
        plant.completed()
    direct = (time.perf_counter() - t0) / n_steps
    t0 = time.perf_counter()
    run_loop(plant, StaticController(), duration_s=float(n_steps), schedule=sched)
    looped = (time.perf_counter() - t0) / n_steps
    return {"direct_s": direct, "loop_s": looped, "overhead_s": looped - direct}


def run_default_plain() -> float:
    from palsctl.config import load_experiment, run_experiment

    t0 = time.perf_counter()
    run_experiment(load_experiment())
    return time.perf_counter() - t0


def run_cli() -> float:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "palsctl", "run", "-q", "--out", d], check=True)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(machine())
    plain = [run_default_plain() for _ in range(args.repeat)]
    print(f"default experiment, run_experiment (20 simulated min): median {statistics.median(plain):.2f} s "
          f"(runs: {', '.join(f'{x:.2f}' for x in plain)})")
    cli = [run_cli() for _ in range(args.repeat)]
    print(f"default experiment, whole `palsctl run` command: median {statistics.median(cli):.2f} s "
          f"(runs: {', '.join(f'{x:.2f}' for x in cli)})")
    micro = [loop_microbench() for _ in range(args.repeat)]
    runs = ", ".join(f"{r['overhead_s'] * 1e6:.1f}" for r in micro)
    print(f"loop overhead per step, null plant + static controller, default guard, step budget "
          f"schedule, no workload: median {statistics.median(r['overhead_s'] for r in micro) * 1e6:.1f}"
          f" µs (runs: {runs})")
    inst = [run_default_instrumented() for _ in range(args.repeat)]
    med = {k: statistics.median(r[k] for r in inst) for k in inst[0]}
    print(f"instrumented: loop {med['loop_s']:.2f} s = plant {med['plant_s']:.2f} s + controller "
          f"{med['controller_s'] * 1e3:.1f} ms + loop overhead; {med['steps']:.0f} steps")
    runs = ", ".join(f"{r['overhead_per_step_s'] * 1e6:.1f}" for r in inst)
    print(f"loop overhead per step (workload arrivals, schedule, guard, recording): median "
          f"{med['overhead_per_step_s'] * 1e6:.1f} µs (runs: {runs})")
    print(f"  of which generating the workload's requests: median "
          f"{med['workload_per_step_s'] * 1e6:.1f} µs; the loop without it (schedule, guard, "
          f"recording): median {med['overhead_excl_workload_per_step_s'] * 1e6:.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
