"""Fleet benchmarks (palsctl.cluster): one command per figure in bench/RESULTS.md.

    python bench/bench_fleet.py alloc      # allocate() time, 1..256 replicas (real envelopes)
    python bench/bench_fleet.py scale      # wall time vs replicas (local), plot
    python bench/bench_fleet.py hour64     # 64 replicas x 1 simulated hour (local)
    python bench/bench_fleet.py hour64ray  # the same on the ray engine
    python bench/bench_fleet.py ray        # ray engine vs local on the same fleet
    python bench/bench_fleet.py policies   # equal / proportional / marginal, heterogeneous fleet
    python bench/bench_fleet.py faults     # budget step and dead replica: time to comply
    python bench/bench_fleet.py pals52     # the PALS paper's Section 5.2, per controller
    python bench/bench_fleet.py pals53     # the PALS paper's Section 5.3 (demand response)
    python bench/bench_fleet.py all

Each prints its figures as JSON lines (and writes results/bench/fleet_<name>.json), with the
machine. Wall times are medians where repeated; the machine is shared and noisy, so compare
ratios measured in the same run.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _machine import machine  # noqa: E402 - bench/ is on sys.path first

OUT = ROOT / "results" / "bench"


def _emit(name: str, obj: dict) -> None:
    obj = {"bench": name, "machine": machine(), **obj}
    print(json.dumps(obj), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"fleet_{name}.json").write_text(json.dumps(obj, indent=2) + "\n")


def _fleet(path: str):
    from palsctl.cluster import load_fleet

    return load_fleet(ROOT / "examples" / path)


def _pick(s: dict, keys=("tokens_per_joule", "qos_violation_rate", "throughput_shortfall_rate",
                         "latency_violation_rate", "time_over_budget_s",
                         "time_over_budget_after_step_s", "energy_over_budget_j", "energy_j",
                         "generated_tokens", "mean_power_w", "mean_throughput_tok_s",
                         "power_tracking_rel_error", "allocation_ms_p99", "wall_s")) -> dict:
    return {k: s.get(k) for k in keys if k in s}


# ---- allocation time -----------------------------------------------------------------------
def bench_alloc() -> None:
    import numpy as np

    from palsctl.cluster.allocate import Replica, allocate
    from palsctl.cluster.runtime import build_models, build_replica_specs

    specs, _ = build_replica_specs(_fleet("fleet_hetero.toml"))
    envs, _ = build_models(specs)
    kinds = [(s.min_w, s.max_w, envs[s.name]) for s in specs]
    rng = np.random.default_rng(0)
    rows = {}
    for n in (1, 4, 16, 64, 256):
        reps = []
        for i in range(n):
            lo, hi, env = kinds[i % len(kinds)]
            top = env.throughput_tok_s[-1]
            reps.append(Replica(name=f"r{i}", min_w=lo, max_w=hi, envelope=env,
                                demand_tok_s=float(rng.uniform(0.2, 1.1) * top)))
        peak = sum(r.max_w for r in reps)
        out = {}
        for policy in ("equal", "proportional", "marginal"):
            times = []
            for k in range(200):
                budget = peak * (0.4 + 0.5 * (k % 10) / 10)
                t0 = time.perf_counter()
                allocate(reps, budget, policy=policy)
                times.append(time.perf_counter() - t0)
            out[policy] = {"median_ms": statistics.median(times) * 1e3,
                           "p99_ms": float(np.percentile(times, 99)) * 1e3}
        rows[n] = out
        print(n, json.dumps(out), flush=True)
    _emit("alloc", {"replicas": rows, "calls_per_point": 200})


# ---- scale ---------------------------------------------------------------------------------
def _scaled(n: int, duration_s: float):
    """fleet_64's four pools at n replicas in all (n/4 each; n < 4: the first pools)."""
    import dataclasses

    fleet = _fleet("fleet_64.toml")
    pools = []
    left = n
    for i, p in enumerate(fleet.pools):
        k = max(0, min(left, -(-n // 4) if i < 3 else left))
        if k:
            pools.append(dataclasses.replace(p, replicas=k))
        left -= k
    peak = 51200.0 * n / 64
    site = dataclasses.replace(fleet.site, power_budget_w=_steps_spec(peak, duration_s))
    return dataclasses.replace(fleet, pools=tuple(pools), site=site).with_overrides(
        duration_s=duration_s)


def _steps_spec(peak: float, duration_s: float):
    from palsctl.experiment.schema import setpoint_value

    return setpoint_value({"steps": [[0.0, peak], [duration_s / 3, 0.6 * peak],
                                     [2 * duration_s / 3, 0.8 * peak]]},
                          key="site.power_budget_w", file=None, base_dir=None)


def bench_scale() -> None:
    from palsctl.cluster import run_fleet, summarize_fleet

    rows = []
    for n, dur in ((1, 600.0), (4, 600.0), (16, 600.0), (64, 300.0), (256, 120.0)):
        fleet = _scaled(n, dur)
        run_fleet(_scaled(min(n, 4), 10.0), keep_records=False)   # models memoised
        t0 = time.perf_counter()
        r = run_fleet(fleet, keep_records=False)
        wall = time.perf_counter() - t0
        s = summarize_fleet(r)
        row = {"replicas": n, "simulated_s": dur, "wall_s": wall,
               "wall_s_per_replica_hour": wall / n / (dur / 3600.0),
               "allocation_ms_p99": s["allocation_ms_p99"],
               "time_over_budget_after_step_s": s["time_over_budget_after_step_s"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    _emit("scale", {"engine": "local", "rows": rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    x = [r["replicas"] for r in rows]
    ax[0].loglog(x, [r["wall_s_per_replica_hour"] * r["replicas"] for r in rows], "o-")
    ax[0].axhline(300.0, color="C3", ls="--", lw=1, label="5 min")
    ax[0].set_xlabel("replicas")
    ax[0].set_ylabel("wall s per simulated hour")
    ax[0].legend()
    ax[1].semilogx(x, [r["wall_s_per_replica_hour"] for r in rows], "o-")
    ax[1].set_xlabel("replicas")
    ax[1].set_ylabel("wall s per replica-hour")
    fig.suptitle("palsctl fleet, local engine (2 cores): wall time against replicas")
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    fig.savefig(img / "fleet_scale.png", dpi=110)
    print("wrote docs/img/fleet_scale.png")


def bench_hour64() -> None:
    from palsctl.cluster import run_fleet, summarize_fleet

    fleet = _fleet("fleet_64.toml")
    run_fleet(_scaled(4, 10.0), keep_records=False)   # offline models profiled first
    t0, c0 = time.perf_counter(), time.process_time()
    r = run_fleet(fleet, keep_records=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    s = summarize_fleet(r)
    _emit("hour64", {"replicas": 64, "simulated_s": fleet.duration_s, "wall_s": wall,
                     "cpu_s": cpu, "load_avg_1min": os.getloadavg()[0], **_pick(s)})


def bench_hour64ray() -> None:
    """The same hour on the ray engine (one host actor per CPU)."""
    from palsctl.cluster import run_fleet, summarize_fleet
    from palsctl.cluster.ray_engine import init_ray_loopback

    fleet = _fleet("fleet_64.toml")
    run_fleet(_scaled(4, 10.0), keep_records=False)
    init_ray_loopback()
    t0 = time.perf_counter()
    r = run_fleet(fleet, engine="ray", keep_records=False)
    wall = time.perf_counter() - t0
    _emit("hour64ray", {"replicas": 64, "simulated_s": fleet.duration_s, "wall_s": wall,
                        "load_avg_1min": os.getloadavg()[0], **_pick(summarize_fleet(r))})


def bench_ray() -> None:
    from palsctl.cluster import run_fleet, summarize_fleet
    from palsctl.cluster.ray_engine import init_ray_loopback

    fleet = _scaled(16, 600.0)
    run_fleet(_scaled(4, 10.0), keep_records=False)
    t0 = time.perf_counter()
    a = run_fleet(fleet, keep_records=False)
    t_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    init_ray_loopback()
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = run_fleet(fleet, engine="ray", keep_records=False)
    t_ray = time.perf_counter() - t0
    sa, sb = summarize_fleet(a), summarize_fleet(b)
    import numpy as np

    _emit("ray", {"replicas": 16, "simulated_s": 600.0, "local_wall_s": t_local,
                  "ray_wall_s": t_ray, "ray_init_s": t_init, "ray_over_local": t_ray / t_local,
                  "max_abs_power_diff_w": float(np.max(np.abs(a.power_w - b.power_w))),
                  "tokens_per_joule": [sa["tokens_per_joule"], sb["tokens_per_joule"]]})


# ---- policies on the heterogeneous fleet -------------------------------------------------------
def bench_policies() -> None:
    from palsctl.cluster import run_fleet, summarize_fleet

    fleet = _fleet("fleet_hetero.toml")
    out = {}
    for policy in ("equal", "proportional", "marginal"):
        s = summarize_fleet(run_fleet(fleet.with_overrides(policy=policy), keep_records=False))
        out[policy] = {**_pick(s), "pools": {k: _pick(v) for k, v in s["pools"].items()}}
        print(policy, json.dumps(_pick(s)), flush=True)
    e, m = out["equal"]["tokens_per_joule"], out["marginal"]["tokens_per_joule"]
    _emit("policies", {"fleet": "fleet_hetero", "replicas": fleet.num_replicas,
                       "marginal_over_equal_tokens_per_joule": m / e, "policies": out})


# ---- faults ------------------------------------------------------------------------------------
def bench_faults() -> None:
    import numpy as np

    from palsctl.cluster import FaultPlan, run_fleet, summarize_fleet

    fleet = _scaled(16, 600.0)
    victim = f"{fleet.pools[0].name}-0"
    t_kill = 301.0
    r = run_fleet(fleet, faults=FaultPlan(kill_replicas={victim: t_kill}), keep_records=False)
    s = summarize_fleet(r)
    lease, period = fleet.site.lease_s, fleet.site.period_s
    last = max((t for t in r.ticks if victim in t["shares_w"]), key=lambda t: t["t_s"])
    held = last["shares_w"][victim]
    others = [(t["t_s"], sum(v for k, v in t["shares_w"].items() if k != victim))
              for t in r.ticks]
    before = max(v for t, v in others if t <= last["t_s"] + lease - 1e-9 and t > last["t_s"])
    freed = next((t for t, v in others if t > last["t_s"] and v > before + 0.5 * held), None)
    # budget steps: how long the measured site power stayed over after each step
    b, p, dt = r.budget_w, r.power_w, r.dt_s
    over = p > b * 1.01
    steps = np.flatnonzero(np.abs(np.diff(b)) > 1.0) + 1
    after = []
    for i in steps:
        j = i
        while j < len(over) and over[j]:
            j += 1
        after.append(float((j - i) * dt))
    _emit("faults", {
        "replicas": 16, "period_s": period, "lease_s": lease,
        "killed": victim, "killed_at_s": t_kill, "its_last_lease_at_s": last["t_s"],
        "its_share_w": held, "watts_reassigned_at_s": freed,
        "reassigned_after_death_s": None if freed is None else freed - t_kill,
        "bound_lease_plus_period_s": lease + period,
        "max_committed_over_budget_w": max(0.0, max(t["committed_w"] - t["budget_w"]
                                                   for t in r.ticks)),
        "seconds_over_budget_after_each_step": after,
        "time_over_budget_after_step_s": s["time_over_budget_after_step_s"],
        "max_shares_over_budget_w": s["max_shares_over_budget_w"],
        "max_caps_over_budget_w": s["max_caps_over_budget_w"]})


# ---- the PALS paper ---------------------------------------------------------------------------
def _available(name: str) -> bool:
    from palsctl.registry import available

    return name in available("controller")


def bench_pals52() -> None:
    from palsctl.cluster import run_fleet, summarize_fleet
    from palsctl.cluster.schema import with_controller

    fleet = _fleet("fleet_pals_5_2.toml")
    runs = {"static": {"max_batch": 256}, "batch-only": {}, "cap-only": {}, "search": {}}
    out = {}
    for name, params in runs.items():
        if not _available(name):
            out[name] = "not registered"
            print(name, "not registered", flush=True)
            continue
        s = summarize_fleet(run_fleet(with_controller(fleet, name, **params),
                                      keep_records=False))
        out[name] = {**_pick(s), "pools": {k: _pick(v) for k, v in s["pools"].items()}}
        print(name, json.dumps(out[name]), flush=True)
    summary = {}
    if isinstance(out.get("search"), dict) and isinstance(out.get("static"), dict):
        base, pals = out["static"], out["search"]
        summary["tokens_per_joule_gain"] = pals["tokens_per_joule"] / base["tokens_per_joule"] - 1
        summary["violation_ratio_static_over_search"] = {
            k: (base["pools"][k]["qos_violation_rate"] /
                pals["pools"][k]["qos_violation_rate"]
                if pals["pools"][k]["qos_violation_rate"] else None)
            for k in base["pools"]}
    _emit("pals52", {"runs": out, "summary": summary,
                     "paper": {"baseline_violations": "18.7-35.2 %", "pals_violations": "3.2-5.3 %",
                               "ratio": "4-7x", "tokens_per_joule_gain": "+12.1 %"}})


def bench_pals53() -> None:
    import numpy as np

    from palsctl.cluster import run_fleet, summarize_fleet
    from palsctl.cluster.schema import with_controller

    fleet = _fleet("fleet_pals_5_3.toml")
    base = ("cap-only", {"fixed_batch": 64}) if _available("cap-only") \
        else ("cap-to-budget", {"max_batch": 64})
    out = {}
    for label, (name, params) in (("search", ("search", {})), ("fixed-batch-64", base)):
        r = run_fleet(with_controller(fleet, name, **params), keep_records=False)
        s = summarize_fleet(r)
        levels = {}
        tgt = r.budget_w   # tracking mode: the site target in force during each window
        for lvl in sorted(set(np.round(tgt, 3))):
            idx = np.flatnonzero(np.isclose(tgt, lvl))
            idx = idx[60:] if idx.size > 120 else idx   # after 60 s of settling
            levels[f"{lvl:.0f}"] = {
                "mean_power_w": float(r.power_w[idx].mean()),
                "tracking_rel_error": float(np.abs(r.power_w[idx] - lvl).mean() / lvl),
                "throughput_tok_s": float(r.throughput_tok_s[idx].mean())}
        out[label] = {"controller": name, "params": params, **_pick(s), "levels": levels}
        print(label, json.dumps(out[label]), flush=True)
    gains = {}
    for lvl in out["search"]["levels"]:
        a = out["search"]["levels"][lvl]["throughput_tok_s"]
        b = out["fixed-batch-64"]["levels"][lvl]["throughput_tok_s"]
        gains[lvl] = a / b - 1 if a and b else None
    _emit("pals53", {"runs": out, "throughput_gain_by_target_w": gains,
                     "paper": {"throughput_gain_at_low_targets": "up to +22 %",
                               "tracking_error": "not reported"}})


BENCHES = {"alloc": bench_alloc, "scale": bench_scale, "hour64": bench_hour64,
           "hour64ray": bench_hour64ray, "ray": bench_ray,
           "policies": bench_policies, "faults": bench_faults, "pals52": bench_pals52,
           "pals53": bench_pals53}


def main(argv: list[str]) -> int:
    names = list(BENCHES) if not argv or argv == ["all"] else argv
    for n in names:
        if n not in BENCHES:
            print(f"unknown benchmark {n!r}; known: {', '.join(BENCHES)}", file=sys.stderr)
            return 2
    print(machine(), flush=True)
    for n in names:
        t0 = time.perf_counter()
        BENCHES[n]()
        print(f"# {n}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
