"""Benchmark of the offline power-performance models.

1. Prediction speed: one ``predict`` call over a 500-candidate grid (25 caps x 20 batches), for
   each model kind; ``gradients`` over the same grid. Wall time and CPU time (``process_time``;
   the machine is shared), medians.
2. Fit and profile cost: a 12-point profile on the simulated plant; fits with and without
   5-fold cross-validation.
3. Accuracy on the simulated plant against ``steady_state`` over the full 7 caps x 7 batches
   grid, from 12 profiled (measured) points: MAPE of throughput and power, and the efficiency
   of the configuration the model ranks best by tokens/J subject to a throughput target
   (fraction of the grid's top throughput), relative to the true best — with the chosen
   configuration's true throughput relative to the target.

Run: ``python bench/bench_models.py [--repeat N]``. Prints medians and a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
from _machine import machine

PLANTS = [("mixtral-8x7b", "a100-sxm4-80gb", 4), ("llama-3.1-8b", "h100-sxm", 1)]
WORKLOADS = [(512, 256), (1226, 213)]  # synthetic; the default experiment's azure-conv means
FRACTIONS = (0.3, 0.5, 0.7, 0.85, 0.9)


def timed(fn, repeat):
    wall, cpu = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(wall), statistics.median(cpu)


def profile_rows(model, gpu, n, prompt, output, seed=0):
    from palsctl.models.profile import default_grid, profile_plant, sample_points
    from palsctl.plants.sim import SimPlant

    def make(s):
        return SimPlant(model=model, gpu=gpu, num_gpus=n, seed=s)

    caps, batches = default_grid(make(0).limits)
    pts = sample_points(caps, batches, 12, seed=seed)
    return caps, batches, profile_plant(make, pts, warmup_s=20.0, window_s=30.0,
                                        prompt_tokens=prompt, output_tokens=output,
                                        out_csv=None, seed=seed)


def speed(repeat: int) -> None:
    from palsctl.models import PowerPerfModel

    _, _, rows = profile_rows(*PLANTS[0], 512, 256)
    caps = np.linspace(100.0, 400.0, 25)
    batches = np.linspace(1.0, 64.0, 20)
    C, B = np.meshgrid(caps, batches, indexing="ij")
    print("## speed (500-candidate grid)")
    for kind in ("parametric", "gbt", "forest"):
        m = PowerPerfModel.fit(rows, kind=kind, cv_folds=0)
        for _ in range(20):
            m.predict(power_cap_w=C, max_batch=B)
        w, c = timed(lambda m=m: m.predict(power_cap_w=C, max_batch=B), repeat)
        line = f"{kind:10s} predict 500: wall {w * 1e3:.3f} ms, cpu {c * 1e3:.3f} ms"
        if kind == "parametric":
            gw, gc = timed(lambda m=m: m.gradients(C, B), max(20, repeat // 5))
            line += f"; gradients 500: wall {gw * 1e3:.2f} ms, cpu {gc * 1e3:.2f} ms"
        print(line)
    print("## fit / profile cost (mixtral-8x7b, 4 x A100, 12 points)")
    w, c = timed(lambda: profile_rows(*PLANTS[0], 512, 256), 3)
    print(f"profile 12 points (20 s warm-up + 30 s window each, simulated): wall {w:.2f} s, "
          f"cpu {c:.2f} s")
    for kind, folds in (("parametric", 0), ("parametric", 5), ("gbt", 0), ("gbt", 5)):
        w, c = timed(lambda kind=kind, folds=folds: PowerPerfModel.fit(rows, kind=kind,
                                                                       cv_folds=folds), 3)
        print(f"fit {kind} cv_folds={folds}: wall {w:.2f} s, cpu {c:.2f} s")


def _choice_cells(p, T, P):
    tpj = T / P
    strict, band = [], []
    for f in FRACTIONS:
        target = f * T.max()
        ok = p.throughput_tok_s >= target
        if not ok.any():
            strict.append("none")
            band.append("none")
            continue
        i = int(np.argmax(np.where(ok, p.tokens_per_joule, -np.inf)))
        best = tpj[T >= target].max()
        best_band = tpj[T >= 1.03 * target].max()
        strict.append(f"{tpj[i] / best:.3f} ({T[i] / target:.2f})")
        band.append("ok" if tpj[i] >= 0.97 * best_band and T[i] >= 0.97 * target else
                    f"FAIL {tpj[i] / best_band:.3f} ({T[i] / target:.2f})")
    return strict, band


def accuracy(seeds) -> None:
    from palsctl.models import PowerPerfModel, build_model_for
    from palsctl.plants.sim import steady_state

    print("## accuracy vs steady_state on the full 7 x 7 grid, 12 profiled points")
    print("design: 'space-filling' = sample_points(12); 'adaptive' = build_model_for "
          "(8 space-filling + 4 frontier points)")
    print("choice cells: true tok/J of the model's pick / true best (pick's true throughput / "
          "target); band: pick >= 97 % of the best meeting 1.03 x target and delivers >= 97 %")
    print("| plant | prompt/output | design | kind | seed | MAPE thr | MAPE power | max err thr | "
          + " | ".join(f"@{f:.0%}" for f in FRACTIONS) + " | 3 % band |")
    for model, gpu, n in PLANTS:
        for prompt, output in WORKLOADS:
            for seed in seeds:
                caps, batches, rows = profile_rows(model, gpu, n, prompt, output, seed)
                C, B = (a.ravel() for a in np.meshgrid(caps, batches, indexing="ij"))
                truth = [steady_state(model, gpu, n, int(b), float(c), prompt, output)
                         for c, b in zip(C, B)]
                T = np.array([s.throughput_tok_s for s in truth])
                P = np.array([s.power_w for s in truth])
                fits = [("space-filling", kind, PowerPerfModel.fit(rows, kind=kind, cv_folds=0,
                                                                   seed=seed))
                        for kind in ("parametric", "gbt")]
                fits.append(("adaptive", "parametric",
                             build_model_for(model, gpu, n, prompt_tokens=prompt,
                                             output_tokens=output, seed=seed)))
                for design, kind, m in fits:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        p = m.predict(power_cap_w=C, max_batch=B)
                    et = np.abs(p.throughput_tok_s / T - 1)
                    ep = np.abs(p.power_w / P - 1)
                    strict, band = _choice_cells(p, T, P)
                    band_txt = "all ok" if all(c == "ok" for c in band) else "; ".join(
                        f"@{f:.0%} {c}" for f, c in zip(FRACTIONS, band) if c != "ok")
                    print(f"| {model} {n}x{gpu} | {prompt}/{output} | {design} | {kind} | {seed} | "
                          f"{et.mean():.1%} | {ep.mean():.1%} | {et.max():.1%} | "
                          + " | ".join(strict) + f" | {band_txt} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=300, help="repetitions of a predict call")
    ap.add_argument("--seeds", type=int, default=2, help="profile seeds per plant/workload")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    print(machine())
    speed(args.repeat)
    if not args.skip_accuracy:
        accuracy(range(args.seeds))


if __name__ == "__main__":
    main()
