"""Offline stability analysis of the `pi` controller's budget loop, from Python.

1. identify the loop (power cap -> power) with a step test on the simulated plant and check
   that the model fits it (a loop whose model does not fit cannot be verified),
2. analyse the configured PI gains: closed-loop poles, gain/phase margins, step metrics,
3. draw the (Kp, Ki) stability map and pick the fastest gains with >= 6 dB and >= 45 deg,
4. check the prediction with the loop closed on the plant (`verify_loop`) and with a
   closed-loop run of the real PIController (`run_power_step`),
5. draw the Bode plot of the loop.

Run:  python examples/stability_analysis.py [OUT_DIR]      (headless: writes PNGs only)
"""
from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from palsctl.analysis.identify import (
    assess_fit,
    identify_from_step_test,
    step_test,
)
from palsctl.analysis.report import map_grid
from palsctl.analysis.stability import (
    analyze_loop,
    plot_stability_map,
    recommend_gains,
    stability_map,
)
from palsctl.analysis.verify import run_power_step, verify_loop
from palsctl.plants.sim import SimPlant

MODEL, GPU, NUM_GPUS, BATCH = "llama-3.1-8b", "h100-sxm", 1, 64
DT_S, CAP_W = 0.5, 330.0          # cap per GPU, below the plant's natural draw (it binds)
# the pi controller's budget-loop gains (kp_cap_budget, ki_cap_budget_per_s)
KP, KI = 0.3, 0.5


def main(out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    make = functools.partial(SimPlant, MODEL, GPU, NUM_GPUS, dt_s=DT_S, seed=0, noise=False)

    # 1. step test: cap +30 W at the operating point, plant saturated by a backlog
    test = step_test(make, loop="budget", power_cap_w=CAP_W, max_batch=BATCH, step=30.0)
    plant = identify_from_step_test(test)
    fit = assess_fit(test, plant)
    print(f"identified: K = {plant.gain:.3f} W/W, tau = {plant.tau_s:.3f} s, "
          f"theta = {plant.delay_s:.3f} s, window = {plant.window_s:.2f} s "
          f"({fit.text()}, RMS {fit.residual_rms:.3f} W)")
    if not fit.ok:
        print("the model does not fit its step test: the analysis below is unverified")

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

    # 4. prediction vs the simulated plant (setpoint step of +100 W)
    check = verify_loop(make, plant, loop="budget", kp=KP, ki=KI, power_cap_w=CAP_W,
                        max_batch=BATCH, step=100.0)
    print(f"the loop as analysed, closed on the plant: {check.text()}")
    run = run_power_step(make, kp=KP, ki_per_s=KI, power_cap_w=CAP_W, max_batch=BATCH,
                         step_w=100.0, record_s=15.0)
    print(f"the PIController on the plant: oscillation decays = {run.decays()}, "
          f"settling (about the final value) = {run.settling_time_s(final='measured'):.2f} s "
          f"vs predicted {res.step.settling_time_s:.2f} s")

    # 5. Bode plot of the open loop with the exact margins
    import control as ct

    from palsctl.analysis.stability import loop_tf, pi_tf

    cp = ct.bode_plot(loop_tf(plant, pi_tf(KP, KI, DT_S)), dB=True, display_margins=False)
    cp.figure.suptitle(f"budget loop: GM {res.gain_margin_db:.1f} dB, "
                       f"PM {res.phase_margin_deg:.0f} deg", fontsize=9)
    cp.figure.savefig(out_dir / "budget_loop_bode.png")
    print(f"Bode plot: {out_dir / 'budget_loop_bode.png'}")
    return 0


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="palsctl-"))
    sys.exit(main(out))
