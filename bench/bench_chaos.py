"""Chaos benchmark of the guard, the loop and the restore path (issue 13's figures).

1. Random fault sequences × 3 controllers (``cap-to-budget``, ``pi``, ``search``) behind the
   default SafetyGuard on a simulated H100 (Llama-3.1-8B) under Poisson load
   (`tests.support.chaos.ChaosLoop`, invariants checked after every step, not strict: counted).
   A sequence: a random budget (35–95 % of the GPU's maximum) and load; 30 steps of random
   faults (each step starts, with probability 0.2, a sensor fault — NaN, None, exception,
   stale repeat — or an actuator fault — exception, cap ignored, cap held loosely — for 1–5
   steps, or a budget step); then the actuator *stops obeying*: from then on the firmware
   holds 1.1–1.6× the commanded cap and reads back the commanded one, for 20 more steps
   with the budget fixed. Every step is also appended to a steps file (`StepsWriter`).
   Counted: loop deaths (an exception out of a step), steps lost (steps taken − steps
   recorded, and − rows in the steps file), invariant violations, and the longest run of
   consecutive windows with measured power over the budget by more than 3 % (and by more
   than 1 %, the metrics' band) after the actuator stopped obeying. A second, smaller set
   measures the same after the cap writes are *ignored* altogether while the budget drops by
   30 % (only the batch is left: running requests drain, so this is not expected to meet
   2 windows). Sequences whose budget cannot be met once the actuator disobeys (its firmware
   holds more than the budget less the guard's 3 % band even at the minimum cap) are counted
   apart. The consecutive windows are counted from the first step after the actuator
   stopped obeying.
2. SIGKILL of ``palsctl control`` (emulator + gateway on loopback) at random moments, then a
   restart (``palsctl restore`` or the next ``palsctl control``, alternately): how many
   restarts found the original cap and batch limit back.

Run: ``python bench/bench_chaos.py [--sequences N] [--ignore-sequences N] [--kills N]
[--json PATH] [--tolerance-frac F]``. Prints counts; medians where there are distributions.
``--tolerance-frac`` sets the guard's ``power_tolerance_frac`` (its band before it judges a
window over the budget); the reporting bands (3 %, 1 %) stay as they are.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine  # bench/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))      # the test harness lives in tests/support


def one_sequence(controller: str, seed: int, *, disobey: str, steps_file: Path,
                 tolerance_frac: float | None = None) -> dict:
    from palsctl.loop import StepsWriter
    from palsctl.safety import GuardConfig
    from tests.support.chaos import ACTUATOR_FAULTS, SENSOR_FAULTS, ChaosLoop

    rng = random.Random(seed)
    out = {"death": None, "violations": 0, "lost": 0, "max_over_3": 0, "max_over_1": 0,
           "reachable": True, "batch_min_step": None}
    with StepsWriter(steps_file) as writer:
        c = ChaosLoop(controller, seed=seed, strict=False,
                      budget_frac=rng.uniform(0.35, 0.95),
                      rate_req_s=rng.choice([4.0, 12.0, 20.0]), on_step=[writer],
                      guard_config=None if tolerance_frac is None else GuardConfig(
                          power_tolerance_frac=tolerance_frac))
        plant = c.plant
        taken = 0
        try:
            left = 0
            for _ in range(30):
                if left == 0:
                    plant.sensor = plant.actuator = None
                    if rng.random() < 0.2:
                        kind = rng.choice(["sensor", "actuator", "budget"])
                        left = rng.randint(1, 5)
                        if kind == "sensor":
                            plant.sensor = rng.choice(SENSOR_FAULTS)
                        elif kind == "actuator":
                            plant.actuator = rng.choice(ACTUATOR_FAULTS)
                            plant.lie_factor = rng.uniform(1.1, 1.6)
                        else:
                            c.budget_w = rng.uniform(0.3, 1.0) * c.max_total_w
                            left = 1
                else:
                    left -= 1
                c.step()
                taken += 1
            plant.sensor = None
            plant.actuator, plant.lie_factor = disobey, rng.uniform(1.1, 1.6)
            if disobey == "ignore":      # the cap stays where it was: the budget must drop
                c.budget_w = (c.budget_w or c.max_total_w) * 0.7
            lim = c.limits
            # can the budget be met at all? the firmware holds lie x the minimum cap at best
            floor_w = lim.power_cap_min_w * lim.num_gpus * (
                plant.lie_factor if disobey == "lie" else 1.0)
            out["reachable"] = c.budget_w is None or floor_w * (1 + c.tol) <= c.budget_w
            over = {0.03: [], 0.01: []}
            for i in range(20):
                rec = c.step()
                taken += 1
                if (out["batch_min_step"] is None
                        and c.commanded[-1].action.max_batch == lim.max_batch_min):
                    out["batch_min_step"] = i + 1   # the batch, the lever left, at its floor
                wb = c.loop.record.steps[-2].setpoint.power_budget_w
                p = rec.measurement.power_w
                for band, flags in over.items():
                    flags.append(wb is not None and p > wb * (1 + band))
            out["max_over_3"], out["max_over_1"] = (_longest_run(over[0.03]),
                                                    _longest_run(over[0.01]))
        except Exception as exc:  # noqa: BLE001 - a loop death is what is counted
            out["death"] = f"{type(exc).__name__}: {exc}"
        out["violations"] = len(c.violations)
        out["violation_examples"] = c.violations[:2]
        out["lost"] = max(taken - len(c.loop.record.steps), taken - writer.rows)
        plant.close()
    return out


def _longest_run(flags: list[bool]) -> int:
    run = best = 0
    for f in flags:
        run = run + 1 if f else 0
        best = max(best, run)
    return best


def chaos(n: int, disobey: str, tmp: Path, tolerance_frac: float | None = None) -> dict:
    from tests.support.chaos import CONTROLLERS

    res = {}
    for ctl in CONTROLLERS:
        t0 = time.perf_counter()
        rows = [one_sequence(ctl, 1000 * (disobey == "ignore") + k, disobey=disobey,
                             steps_file=tmp / f"{ctl}-{k}.csv", tolerance_frac=tolerance_frac)
                for k in range(n)]
        ok = [r for r in rows if r["reachable"]]
        over3 = [r["max_over_3"] for r in ok] or [0]
        over1 = [r["max_over_1"] for r in ok] or [0]
        res[ctl] = {
            "sequences": n, "deaths": sum(r["death"] is not None for r in rows),
            "steps_lost": sum(r["lost"] for r in rows),
            "violations": sum(r["violations"] for r in rows),
            "violation_examples": [e for r in rows for e in r["violation_examples"]][:3],
            "death_examples": [r["death"] for r in rows if r["death"]][:3],
            "max_consecutive_over_3pct": max(over3), "median_consecutive_over_3pct":
                statistics.median(over3), "sequences_over_3pct_more_than_2":
                sum(x > 2 for x in over3),
            "max_consecutive_over_1pct": max(over1),
            "sequences_over_1pct_more_than_2": sum(x > 2 for x in over1),
            "unreachable_sequences": len(rows) - len(ok),
            "unreachable_max_consecutive_over_3pct": max(
                [r["max_over_3"] for r in rows if not r["reachable"]] or [0]),
            "over_3pct_more_than_2_at_batch_min": sum(
                r["max_over_3"] > 2 and r["batch_min_step"] is not None for r in rows),
            "steps_to_batch_min_median": statistics.median(
                [r["batch_min_step"] for r in rows if r["max_over_3"] > 2
                 and r["batch_min_step"] is not None] or [0]),
            "wall_s": time.perf_counter() - t0,
        }
        r = res[ctl]
        print(f"  {ctl:14s} {disobey:6s} {n} sequences: deaths {r['deaths']}, steps lost "
              f"{r['steps_lost']}, invariant violations {r['violations']}; consecutive windows "
              f"> 3 % over budget after the actuator stopped obeying: max "
              f"{r['max_consecutive_over_3pct']} (median {r['median_consecutive_over_3pct']}, "
              f"{r['sequences_over_3pct_more_than_2']} sequences > 2); > 1 %: max "
              f"{r['max_consecutive_over_1pct']} "
              f"({r['sequences_over_1pct_more_than_2']} > 2); budget out of reach (the firmware "
              f"within 3 % of it or over it even at the minimum cap): "
              f"{r['unreachable_sequences']} sequences, not in "
              f"these maxima (their max {r['unreachable_max_consecutive_over_3pct']}); of all "
              f"sequences > 2 windows over 3 %, {r['over_3pct_more_than_2_at_batch_min']} had "
              f"the batch at its minimum (median {r['steps_to_batch_min_median']} steps after "
              f"the actuator stopped obeying) [{r['wall_s']:.0f} s]", flush=True)
    return res


def kills(n: int, tmp: Path) -> dict:
    import os
    import subprocess

    from tests.support.processes import (
        ORIGINAL,
        PALSCTL,
        claims,
        kill_control_once,
        serving_stack,
        whole_rows,
    )

    state = tmp / "state"
    os.environ["PALSCTL_STATE_DIR"] = str(state)
    rng = random.Random(11)
    restored = changed = torn = 0
    moments: dict[str, int] = {}
    restart_s = []
    with serving_stack(tmp, duration_s=3600) as st:
        for i in range(n):
            left, how = kill_control_once(st, tmp / f"out{i}", rng)
            moments[how] = moments.get(how, 0) + 1
            changed += left != ORIGINAL
            try:
                whole_rows(tmp / f"out{i}" / "steps.csv")
            except AssertionError:
                torn += 1
            t0 = time.perf_counter()
            if i % 2 == 0:
                cmd = PALSCTL + ["restore"]
            else:
                cmd = PALSCTL + ["control", str(st["cfg"]), "--duration-s", "1.0", "--out",
                                 str(tmp / f"next{i}")]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            restart_s.append(time.perf_counter() - t0)
            ok = r.returncode == 0 and (st["cap"](), st["limit"]()) == ORIGINAL \
                and not claims(state)
            restored += ok
            if not ok:
                print(f"  kill {i} ({how}, left {left}): NOT restored: rc {r.returncode} "
                      f"{r.stdout[-300:]} {r.stderr[-300:]}", flush=True)
    print(f"  SIGKILL of palsctl control: {n} kills ({moments}); {changed} left the settings "
          f"changed; restored on restart: {restored}/{n} ({100 * restored / n:.0f} %); steps "
          f"files with a torn row: {torn}; restart median {statistics.median(restart_s):.1f} s",
          flush=True)
    return {"kills": n, "moments": moments, "left_changed": changed, "restored": restored,
            "torn_steps_files": torn, "restart_median_s": statistics.median(restart_s)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=1000)
    ap.add_argument("--ignore-sequences", type=int, default=100)
    ap.add_argument("--kills", type=int, default=40)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tolerance-frac", type=float, default=None,
                    help="the guard's power_tolerance_frac (default: GuardConfig's)")
    args = ap.parse_args()
    print(machine())
    import logging

    logging.disable(logging.CRITICAL)   # the faults log as designed; keep the output short
    out = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("random fault sequences, then firmware that holds more than the cap commanded:")
        out["lie"] = chaos(args.sequences, "lie", tmp, args.tolerance_frac)
        if args.ignore_sequences:
            print("random fault sequences, then cap writes ignored (only the batch left):")
            out["ignore"] = chaos(args.ignore_sequences, "ignore", tmp, args.tolerance_frac)
        if args.kills:
            logging.disable(logging.NOTSET)
            out["sigkill"] = kills(args.kills, tmp)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
