"""Benchmark of the closed loop and the default experiment.

1. The default experiment (20 simulated minutes): wall time of ``run_experiment`` (build +
   loop) and of the whole ``palsctl run`` command (process start, imports, CSV, JSON, PNG).
2. Loop overhead per control step beyond plant and controller, in CPU time (the machine is
   shared): (a) around a null plant and the static controller (20,000 steps), and (b) inside the
   default experiment, as the difference between ``run_loop`` and a bare loop making the same
   plant, controller and workload calls. The workload's request generation is timed apart.

Run: ``python bench/bench_loop.py [--repeat N]``. Prints medians.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

from _machine import machine


def loop_replay(repeat: int) -> dict:
    """The default experiment's recorded steps replayed through ``run_loop`` by a plant that
    only hands back the recorded measurements and applied actions (real workload arrivals,
    schedule, static controller, default guard, recording), minus the same plant, controller and
    workload calls made directly. CPU time (``process_time``): the loop's own cost per step with
    the default experiment's data, free of the simulator's run-to-run variance."""
    import palsctl.experiment as C
    from palsctl.interfaces import SimulatedPlant
    from palsctl.loop import run_loop

    cfg = C.load_experiment()
    rec = C.run_experiment(cfg)
    meas = [s.measurement for s in rec.steps]
    acts = [s.applied for s in rec.steps]
    n = len(meas)
    sim = C.build_plant(cfg)

    class ReplayPlant(SimulatedPlant):
        limits, dt_s, info = sim.limits, sim.dt_s, sim.info

        def __init__(self):
            self.k = -1
            self.t = 0.0

        @property
        def now_s(self):
            return self.t

        def submit(self, requests):
            pass

        def advance(self, dt_s):
            self.k += 1
            self.t += dt_s

        def read(self):
            return meas[self.k]

        def apply(self, action):
            return acts[self.k]

        def completed(self):
            return []

    looped, direct, wl = [], [], []
    for _ in range(repeat):
        plant, ctl = ReplayPlant(), C.build_controller(cfg)
        w = C.build_workload(cfg)
        sched = C.build_schedule(cfg, w)
        t0 = time.process_time()
        run_loop(plant, ctl, duration_s=cfg.duration_s, schedule=sched, workload=w,
                 guard=cfg.guard)
        looped.append((time.process_time() - t0) / n)
        plant, ctl = ReplayPlant(), C.build_controller(cfg)
        ctl.setup(limits=plant.limits, dt_s=plant.dt_s, plant_info=plant.info)
        w = C.build_workload(cfg)
        sp = sched(0.0)
        t0 = time.process_time()
        for k in range(n):
            plant.submit(w.requests_between(k * cfg.dt_s, (k + 1) * cfg.dt_s))
            plant.advance(cfg.dt_s)
            ctl.step(plant.read(), sp)
            plant.apply(acts[k])
            plant.completed()
        direct.append((time.process_time() - t0) / n)
        w = C.build_workload(cfg)
        t0 = time.process_time()
        for k in range(n):
            w.requests_between(k * cfg.dt_s, (k + 1) * cfg.dt_s)
        wl.append((time.process_time() - t0) / n)
    return {"loop_s": statistics.median(looped), "direct_s": statistics.median(direct),
            "overhead_s": statistics.median(a - b for a, b in zip(looped, direct)),
            "workload_s": statistics.median(wl)}


def loop_microbench(n_steps: int = 20000) -> dict:
    """Per-step cost of run_loop around a plant and a controller that do (almost) nothing,
    minus the cost of calling those same methods directly: the loop's own cost (schedule with
    a step budget, default guard, recording), with no workload."""
    from palsctl.controllers.baselines import StaticController
    from palsctl.interfaces import SimulatedPlant
    from palsctl.loop import run_loop
    from palsctl.types import Action, Limits, Measurement, PlantInfo
    from palsctl.workloads import SetpointSchedule, Steps

    # time and the energy counter advance, as a healthy sensor's do (a repeated measurement
    # is stale data: the guard would hold a safe action without asking the controller), and
    # the power stays under every budget of the schedule (the guard tightens otherwise)
    ms = [Measurement(t_s=k + 1.0, window_s=1.0, power_w=800.0, energy_j=800.0 * (k + 1),
                      throughput_tok_s=100.0, power_cap_w=400.0, max_batch=256)
          for k in range(n_steps)]
    applied = Action(power_cap_w=350.0, max_batch=256)

    class NullPlant(SimulatedPlant):
        limits = Limits(power_cap_min_w=100, power_cap_max_w=400, power_cap_default_w=400,
                        num_gpus=4)
        dt_s = 1.0
        info = PlantInfo(model="null", gpu="null", num_gpus=4, simulated=True)
        now_s = 0.0

        def __init__(self):
            self.k = -1

        def advance(self, dt_s):
            self.k += 1

        def read(self):
            return ms[self.k]

        def apply(self, action):
            return applied

        def completed(self):
            return []

    sched = SetpointSchedule(power_budget_w=Steps([(0, 1400.0), (480, 900.0), (840, 1400.0)]))
    plant, ctl = NullPlant(), StaticController()
    ctl.setup(limits=plant.limits, dt_s=1.0, plant_info=plant.info)
    t0 = time.process_time()
    for _ in range(n_steps):
        plant.advance(1.0)
        mm = plant.read()
        a = ctl.step(mm, None)
        plant.apply(a)
        plant.completed()
    direct = (time.process_time() - t0) / n_steps
    plant = NullPlant()
    t0 = time.process_time()
    run_loop(plant, StaticController(), duration_s=float(n_steps), schedule=sched)
    looped = (time.process_time() - t0) / n_steps
    return {"direct_s": direct, "loop_s": looped, "overhead_s": looped - direct}


def run_default_plain() -> float:
    from palsctl.experiment import load_experiment, run_experiment

    t0 = time.perf_counter()
    run_experiment(load_experiment())
    return time.perf_counter() - t0


def run_cli() -> tuple[float, float]:
    """(wall s, CPU s of the child process) of a whole ``palsctl run -q``."""
    import resource

    with tempfile.TemporaryDirectory() as d:
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "palsctl", "run", "-q", "--out", d], check=True)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(machine())
    plain = [run_default_plain() for _ in range(args.repeat)]
    print(f"default experiment, run_experiment (20 simulated min): median "
          f"{statistics.median(plain):.2f} s (runs: {', '.join(f'{x:.2f}' for x in plain)})")
    cli = [run_cli() for _ in range(args.repeat)]
    walls, cpus = [c[0] for c in cli], [c[1] for c in cli]
    print(f"default experiment, whole `palsctl run` command: median wall "
          f"{statistics.median(walls):.2f} s (runs: {', '.join(f'{x:.2f}' for x in walls)}); "
          f"median CPU {statistics.median(cpus):.2f} s "
          f"(runs: {', '.join(f'{x:.2f}' for x in cpus)})")
    micro = [loop_microbench() for _ in range(args.repeat)]
    runs = ", ".join(f"{r['overhead_s'] * 1e6:.1f}" for r in micro)
    med_us = statistics.median(r['overhead_s'] for r in micro) * 1e6
    print(f"loop overhead per step (CPU), null plant + static controller, default guard, step "
          f"budget schedule, no workload: median {med_us:.1f} µs (runs: {runs})")
    rp = loop_replay(args.repeat * 4)
    print(f"default experiment replayed (recorded measurements, real workload arrivals, CPU time "
          f"per step): run_loop {rp['loop_s'] * 1e6:.1f} µs, the same plant/controller/workload "
          f"calls alone {rp['direct_s'] * 1e6:.1f} µs; loop's own cost: median "
          f"{rp['overhead_s'] * 1e6:.1f} µs per step")
    print(f"  generating the workload's requests (in both, not counted as loop): median "
          f"{rp['workload_s'] * 1e6:.1f} µs per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
