"""Offline stability analysis of the `pi` controller's budget loop, from Python.

1. identify the loop (power cap -> power) with a step test on the simulated plant,
2. analyse the configured PI gains: closed-loop poles, gain/phase margins, step metrics,
3. draw the (Kp, Ki) stability map and pick the fastest gains with >= 6 dB and >= 45 deg,
4. check the prediction with a closed-loop run of the real PIController on the plant.

Run:  python examples/stability_analysis.py [OUT_DIR]      (headless: writes PNGs only)
"""
from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from palsctl.analysis.identify import identify_from_step_test, step_test  # noqa: E402
from palsctl.analysis.report import map_grid  # noqa: E402
from palsctl.analysis.stability import (analyze_loop, plot_stability_map,  # noqa: E402
                                        recommend_gains, stability_map)
from palsctl.analysis.verify import run_power_step  # noqa: E402
from palsctl.plants.sim import SimPlant  # noqa: E402

MODEL, GPU, NUM_GPUS, BATCH = "llama-3.1-8b", "h100-sxm", 1, 64
DT_S, CAP_W = 0.5, 330.0          # cap per GPU, below the plant's natural draw (it binds)
# the pi controller's budget-loop gains (kp_cap_budget, ki_cap_budget_per_s)
KP, KI = 0.3, 0.5


def main(out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    make = functools.partial(SimPlant, MODEL, GPU, NUM_GPUS, dt_s=DT_S, seed=0, noise=False)

    # 1. step test: cap +30 W at the operating point, plant saturated by a backlog
    plant = identify_from_step_test(step_test(make, loop="budget", power_cap_w=CAP_W,
                                              max_batch=BATCH, step=30.0))
    print(f"identified: K = {plant.gain:.3f} W/W, tau = {plant.tau_s:.3f} s, "
          f"theta = {plant.delay_s:.3f} s, window = {plant.window_s:.2f} s "
          f"(fit RMS {plant.fit_rms:.3f} W)")

    # 2. the configured gains
    res = analyze_loop(plant, kp=KP, ki=KI)
    print(f"Kp = {KP}, Ki = {KI}/s: stable = {res.stable}, "
          f"poles |max| = {res.spectral_radius:.3f}, GM = {res.gain_margin_db:.1f} dB, "
          f"PM = {res.phase_margin_deg:.0f} deg, settling = {res.step.settling_time_s:.2f} s, "
          f"overshoot = {res.step.overshoot_pct:.0f} %")
    for w in res.warnings():
        print("WARNING:", w)

    # 3. map and recommendation
    smap = stability_map(plant, *map_grid(plant, KP, KI, 15))
    rec = recommend_gains(plant, smap=smap)
    png = plot_stability_map(smap, str(out_dir / "budget_loop_map.png"), current=(KP, KI),
                             recommended=(rec.kp, rec.ki) if rec.kp is not None else None)
    if rec.analysis is not None:
        print(f"recommended: Kp = {rec.kp:.3g}, Ki = {rec.ki:.3g}/s (GM "
              f"{rec.analysis.gain_margin_db:.1f} dB, PM {rec.analysis.phase_margin_deg:.0f} deg, "
              f"settling {rec.analysis.step.settling_time_s:.2f} s)")
    print(f"stability map: {png}")

    # 4. prediction vs the simulated plant (power target step of +100 W)
    run = run_power_step(make, kp=KP, ki_per_s=KI, power_cap_w=CAP_W, max_batch=BATCH,
                         step_w=100.0, record_s=15.0)
    print(f"closed loop on the simulated plant: oscillation decays = {run.decays()}, "
          f"settling (about the final value) = {run.settling_time_s(final='measured'):.2f} s "
          f"vs predicted {res.step.settling_time_s:.2f} s")
    return 0


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="palsctl-"))
    sys.exit(main(out))
