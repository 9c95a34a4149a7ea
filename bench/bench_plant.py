"""Benchmarks of the simulated plant: steady_state latency, saturated-replica speed (the
fleet's budget: >= 1,500x real time for one saturated H100 replica) and trace-replay speed.

    python bench/bench_plant.py [--repeats 3] [--no-trace]

Prints medians; figures go to the "Plant" sections of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from datetime import datetime

from _machine import machine

from palsctl.paths import data_file
from palsctl.plants.sim import SimPlant, steady_state
from palsctl.plants.sim.steady import group_model
from palsctl.types import Request

STEADY_CASES = [
    ("llama-3.1-8b", "h100-sxm", 1, 8, None, 200, 600, "tp"),
    ("qwen3-30b-a3b", "h100-sxm", 2, 512, None, 200, 900, "tp+ep"),
    ("qwen3-30b-a3b", "h100-sxm", 2, 512, None, 200, 900, "ep"),
    ("mixtral-8x7b", "a100-sxm4-80gb", 4, 64, 200, 100, 5, "tp"),
    ("qwen3-32b", "h100-sxm", 2, 384, None, 1500, 250, "tp"),
    ("deepseek-v3", "b200", 8, 256, None, 200, 400, "tp+ep"),
]


def bench_steady(repeats: int) -> None:
    for case in STEADY_CASES:
        model, gpu, n, b, cap, p, o, par = case
        kw = dict(parallelism=par, output_cv=0.8, prompt_cv=1.0)
        steady_state(model, gpu, n, b, cap, p, o, **kw)  # warm the GroupModel cache
        per_call = []
        for _ in range(repeats):
            k = 200
            t0 = time.perf_counter()
            for _ in range(k):
                steady_state(model, gpu, n, b, cap, p, o, **kw)
            per_call.append((time.perf_counter() - t0) / k)
        # first call for a new configuration (GroupModel built, no cache)
        cold = []
        for _ in range(repeats):
            group_model.cache_clear()
            t0 = time.perf_counter()
            steady_state(model, gpu, n, b, cap, p, o, **kw)
            cold.append(time.perf_counter() - t0)
        print(f"steady_state {model} {n}x{gpu} {par} batch {b} cap {cap}: "
              f"median {1e3 * statistics.median(per_call):.3f} ms/call "
              f"(cold {1e3 * statistics.median(cold):.3f} ms)")


SATURATED_CASES = [
    # (model, gpu, GPUs, parallelism, launch batch, prompt, output)
    ("llama-3.1-8b", "h100-sxm", 1, "tp", 256, 512, 256),
    ("qwen3-30b-a3b", "h100-sxm", 1, "tp", 256, 512, 256),
    ("qwen3-30b-a3b", "h100-sxm", 2, "ep", 256, 512, 256),
    ("llama-3.1-70b", "h100-sxm", 4, "tp", 256, 512, 256),
]


def bench_saturated(repeats: int, sim_s: float = 600.0) -> None:
    """One replica kept saturated (a backlog of requests with output lengths ±50 %), driven by
    a 1 s control loop (advance, read, completed) as a fleet drives each replica."""
    import numpy as np

    for model, gpu, n, par, batch, prompt, output in SATURATED_CASES:
        ss = steady_state(model, gpu, n, batch, None, prompt, output, parallelism=par)
        count = int(ss.throughput_tok_s * sim_s / output * 1.3) + batch
        rng = np.random.default_rng(0)
        outs = rng.integers(output // 2, output + output // 2 + 1, size=count)
        reqs = [Request(request_id=i, arrival_s=0.0, prompt_tokens=prompt,
                        output_tokens=int(x)) for i, x in enumerate(outs)]
        speed, steps = [], 0
        for _ in range(repeats):
            plant = SimPlant(model, gpu, n, seed=0, max_batch_launch=batch, parallelism=par)
            plant.submit(reqs)
            d0 = plant.engine.dstep
            t0 = time.perf_counter()
            for _ in range(int(sim_s)):
                plant.advance(1.0)
                plant.read()
                plant.completed()
            wall = time.perf_counter() - t0
            speed.append(sim_s / wall)
            steps = plant.engine.dstep - d0
            assert plant.engine.waiting, "backlog ran dry: not saturated"
        print(f"saturated {model} {n}x{gpu} {par} batch {batch}, {prompt}/{output} tokens, "
              f"{sim_s:.0f} s simulated ({steps} engine steps, {steps / sim_s:.0f}/s): median "
              f"{statistics.median(speed):.0f}x real time "
              f"(runs: {', '.join(f'{x:.0f}' for x in speed)})")


def load_azure(name: str) -> list[Request]:
    path = data_file(f"azure-llm-2023/AzureLLMInferenceTrace_{name}.csv")
    out = []
    t0 = None
    with open(path, newline="") as fh:
        for i, r in enumerate(csv.DictReader(fh)):
            t = datetime.fromisoformat(r["TIMESTAMP"][:26]).timestamp()
            t0 = t if t0 is None else t0
            out.append(Request(request_id=i, arrival_s=t - t0,
                               prompt_tokens=max(1, int(r["ContextTokens"])),
                               output_tokens=max(1, int(r["GeneratedTokens"]))))
    return out


def bench_trace(repeats: int, model: str, gpu: str, n: int) -> None:
    reqs = load_azure("conv")
    duration = reqs[-1].arrival_s + 60.0
    speed = []
    for _ in range(repeats):
        plant = SimPlant(model, gpu, n, seed=0)
        t0 = time.perf_counter()
        plant.submit(reqs)
        t = 0.0
        while t < duration:
            plant.advance(1.0)
            plant.read()
            plant.completed()
            t += 1.0
        wall = time.perf_counter() - t0
        speed.append(duration / wall)
        done = plant.engine.finished
    print(f"Azure conv trace ({len(reqs)} requests, {duration:.0f} s) on {model} {n}x{gpu}, "
          f"1 s control loop: median {statistics.median(speed):.0f}x real time "
          f"(runs: {', '.join(f'{s:.0f}' for s in speed)}; {done} finished)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-trace", action="store_true", help="skip the Azure trace replays")
    args = ap.parse_args()
    print(machine())
    bench_steady(args.repeats)
    bench_saturated(args.repeats)
    if not args.no_trace:
        bench_trace(args.repeats, "mixtral-8x7b", "a100-sxm4-80gb", 4)
        bench_trace(args.repeats, "llama-3.1-70b", "h100-sxm", 4)


if __name__ == "__main__":
    main()
