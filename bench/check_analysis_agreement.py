"""How often the stability analysis agrees with the simulated plant — a longer run of the checks
in ``tests/analysis/test_prediction_vs_sim.py`` (same plant, regime and definitions), with more
random gains than a unit test can afford.

Run: ``python bench/check_analysis_agreement.py [--seed S] [--n-class N] [--n-settle M]``.
Prints: classification agreement (stable ↔ oscillation decays) and the relative error of the
predicted settling time, over gains drawn uniformly (seeded) and kept by the test's regime.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--n-class", type=int, default=150)
    ap.add_argument("--n-settle", type=int, default=80)
    args = ap.parse_args()

    path = Path(__file__).resolve().parents[1] / "tests" / "analysis" / "test_prediction_vs_sim.py"
    spec = importlib.util.spec_from_file_location("prediction_checks", path)
    T = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(T)
    from palsctl.analysis.stability import analyze_loop, critical_gain_scale, loop_tf, pi_tf
    from palsctl.analysis.verify import run_power_step

    make, plant, (floor_w, natural_w), limits = T._setup()
    print(f"plant {T.MODEL} on {T.N_GPUS} x {T.GPU}, batch {T.BATCH}, cap {T.CAP0_W:g} W, "
          f"dt {T.DT_S:g} s; identified K={plant.gain:.4f}, tau={plant.tau_s:.4f} s, "
          f"theta={plant.delay_s:.4f} s; cap binds in [{floor_w:.0f}, {natural_w:.0f}] W")
    rng = np.random.default_rng(args.seed)

    def run(kp, ki, step_w):
        return run_power_step(make, kp=kp, ki_per_s=ki, power_cap_w=T.CAP0_W,
                              max_batch=T.BATCH, step_w=step_w, record_s=20.0)

    drawn = checked = n_stable = wrong = 0
    while checked < args.n_class:
        kp, ki = rng.uniform(0, 2.5), rng.uniform(0.5, 24.0)
        drawn += 1
        k_crit = critical_gain_scale(loop_tf(plant, pi_tf(kp, ki, T.DT_S)))
        if 0.8 < k_crit < 1.25:
            continue
        res = analyze_loop(plant, kp=kp, ki=ki)
        if res.stable and not T._in_range(plant, kp, ki, T.STEP_CLASSIFY_W):
            continue
        checked += 1
        n_stable += res.stable
        if run(kp, ki, T.STEP_CLASSIFY_W).decays() != res.stable:
            wrong += 1
            print(f"  disagreement: kp={kp:.4f} ki={ki:.4f} k_crit={k_crit:.3f} "
                  f"predicted stable={res.stable}")
    print(f"classification: {checked - wrong}/{checked} agree ({n_stable} called stable; "
          f"{drawn} drawn)")

    drawn = checked = 0
    errs = []
    while checked < args.n_settle:
        kp, ki = rng.uniform(0, 1.5), rng.uniform(0.6, 3.0)
        drawn += 1
        res = analyze_loop(plant, kp=kp, ki=ki)
        if not (res.meets_margins and res.step.settling_time_s >= T.MIN_PERIODS * T.DT_S
                and T._in_range(plant, kp, ki, T.STEP_W) and T._well_conditioned(plant, kp, ki)
                and limits.power_cap_step_w / (ki * T.DT_S)
                < T.SETTLING_THRESHOLD * T.STEP_W / T.N_GPUS):
            continue
        checked += 1
        measured = run(kp, ki, T.STEP_W).settling_time_s(final="measured")
        errs.append(abs(measured - res.step.settling_time_s) / measured)
    e = np.asarray(errs)
    print(f"settling time: {checked} gains ({drawn} drawn): relative error median "
          f"{np.median(e):.3f}, max {e.max():.3f}, over 30 %: {int((e > 0.3).sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
