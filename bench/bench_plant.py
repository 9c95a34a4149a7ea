"""Benchmarks of the simulated plant: steady_state latency, saturated-replica speed (the
fleet's budget: >= 1,500x real time for one saturated H100 replica) and trace-replay speed.

    python bench/bench_plant.py [--repeats 3] [--no-trace] [--no-steady] [--reference]

Prints medians of wall-clock and CPU time (``time.process_time``: robust to other processes on
a shared machine). ``--reference`` runs the engine as it was before its step path was
rewritten for speed (tests/plants/sim/reference_engine.py) interleaved with the current one on
the saturated and trace cases, and prints the speed-ups. Figures go to the "Plant" sections of
bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

from _machine import machine  # bench/ is on sys.path

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


def _engines(reference: bool) -> list[tuple[str, object]]:
    """(label, plant factory): the current plant, and the reference one when asked."""
    if not reference:
        return [("current", SimPlant)]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.plants.sim.reference_engine import reference_plant

    return [("reference", reference_plant), ("current", SimPlant)]


def _report(label: str, runs: dict[str, list[tuple[float, float]]], sim_s: float) -> None:
    """One line per engine: median speed in wall and CPU time; speed-ups of the current engine
    over the reference (median of the per-round ratios, rounds interleaved)."""
    for name, rs in runs.items():
        wall = statistics.median(w for w, _ in rs)
        cpu = statistics.median(c for _, c in rs)
        print(f"  {name:9s} median {sim_s / wall:6.0f}x real time wall, {sim_s / cpu:6.0f}x CPU "
              f"(runs, wall: {', '.join(f'{sim_s / w:.0f}' for w, _ in rs)})")
    if "reference" in runs:
        pairs = list(zip(runs["reference"], runs["current"], strict=True))
        w = statistics.median(r[0] / c[0] for r, c in pairs)
        c = statistics.median(r[1] / c[1] for r, c in pairs)
        print(f"  {label}: current / reference speed {w:.2f}x wall, {c:.2f}x CPU "
              f"(median of {len(pairs)} interleaved pairs)")


def _timed(run) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_saturated(repeats: int, sim_s: float = 600.0, reference: bool = False) -> None:
    """One replica kept saturated (a backlog of requests with output lengths ±50 %), driven by
    a 1 s control loop (advance, read, completed) as a fleet drives each replica."""
    import numpy as np

    engines = _engines(reference)
    for model, gpu, n, par, batch, prompt, output in SATURATED_CASES:
        ss = steady_state(model, gpu, n, batch, None, prompt, output, parallelism=par)
        count = int(ss.throughput_tok_s * sim_s / output * 1.3) + batch
        rng = np.random.default_rng(0)
        outs = rng.integers(output // 2, output + output // 2 + 1, size=count)
        reqs = [Request(request_id=i, arrival_s=0.0, prompt_tokens=prompt,
                        output_tokens=int(x)) for i, x in enumerate(outs)]
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in engines}
        steps = {}
        for i in range(repeats):
            for name, make in engines[::1 - 2 * (i % 2)]:     # alternate who goes first
                plant = make(model, gpu, n, seed=0, max_batch_launch=batch, parallelism=par)
                plant.submit(reqs)
                d0 = plant.engine.dstep

                def loop(plant=plant):
                    for _ in range(int(sim_s)):
                        plant.advance(1.0)
                        plant.read()
                        plant.completed()
                runs[name].append(_timed(loop))
                steps[name] = plant.engine.dstep - d0
                assert plant.engine.waiting, "backlog ran dry: not saturated"
        assert len(set(steps.values())) == 1, f"the engines disagree: {steps}"
        k = steps["current"]
        print(f"saturated {model} {n}x{gpu} {par} batch {batch}, {prompt}/{output} tokens, "
              f"{sim_s:.0f} s simulated ({k} engine steps, {k / sim_s:.0f}/s):")
        _report(f"saturated {model} {n}x{gpu} {par}", runs, sim_s)


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


def bench_trace(repeats: int, model: str, gpu: str, n: int, reference: bool = False) -> None:
    reqs = load_azure("conv")
    duration = reqs[-1].arrival_s + 60.0
    engines = _engines(reference)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in engines}
    done = {}
    for i in range(repeats):
        for name, make in engines[::1 - 2 * (i % 2)]:         # alternate who goes first
            plant = make(model, gpu, n, seed=0)

            def loop(plant=plant):
                plant.submit(reqs)
                t = 0.0
                while t < duration:
                    plant.advance(1.0)
                    plant.read()
                    plant.completed()
                    t += 1.0
            runs[name].append(_timed(loop))
            done[name] = plant.engine.finished
    assert len(set(done.values())) == 1, f"the engines disagree: {done}"
    print(f"Azure conv trace ({len(reqs)} requests, {duration:.0f} s) on {model} {n}x{gpu}, "
          f"1 s control loop, {done['current']} finished:")
    _report(f"Azure conv {model} {n}x{gpu}", runs, duration)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-trace", action="store_true", help="skip the Azure trace replays")
    ap.add_argument("--no-steady", action="store_true", help="skip the steady_state timings")
    ap.add_argument("--reference", action="store_true",
                    help="interleave the engine before its fast step path (from tests/) and "
                         "print the speed-ups")
    args = ap.parse_args()
    print(machine())
    if not args.no_steady:
        bench_steady(args.repeats)
    bench_saturated(args.repeats, reference=args.reference)
    if not args.no_trace:
        bench_trace(args.repeats, "mixtral-8x7b", "a100-sxm4-80gb", 4, args.reference)
        bench_trace(args.repeats, "llama-3.1-70b", "h100-sxm", 4, args.reference)


if __name__ == "__main__":
    main()
