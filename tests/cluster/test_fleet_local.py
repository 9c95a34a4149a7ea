"""The fleet on the in-process engine: budget steps, the lease protocol under faults."""
from __future__ import annotations

import numpy as np
import pytest

from palsctl.cluster import FaultPlan, run_fleet, summarize_fleet
from tests.cluster.fleets import PEAK_W, small_fleet


@pytest.fixture(scope="module")
def stepped():
    return run_fleet(small_fleet(controller="search"))


def test_budget_step_to_60_percent_never_over_after_one_period(stepped):
    r = stepped
    b = r.budget_w
    assert b[0] == PEAK_W and b[-1] == pytest.approx(0.6 * PEAK_W)
    # granted shares and the sum of caps (caps x GPUs) never exceed the budget in force
    assert (r.shares_w <= b + 1e-6).all()
    assert (r.caps_w[1:] <= b[1:] + 1e-6).all()
    s = summarize_fleet(r)
    assert s["max_shares_over_budget_w"] == 0.0 and s["max_caps_over_budget_w"] == 0.0
    # measured site power: over budget only within one period after the step
    assert s["time_over_budget_after_step_s"] == 0.0
    # the cut was granted for the very decision that the new budget governs
    tick = next(t for t in r.ticks if t["budget_w"] < PEAK_W)
    assert tick["t_s"] == 20.0 and tick["committed_w"] <= 0.6 * PEAK_W + 1e-6
    assert s["generated_tokens"] > 0 and s["tokens_per_joule"] > 0
    assert set(s["pools"]) == {"llama"} and s["pools"]["llama"]["replicas"] == 4
    assert s["allocation_ms_p99"] is not None


def test_same_seed_same_result():
    a = run_fleet(small_fleet(duration_s=20.0), keep_records=False)
    b = run_fleet(small_fleet(duration_s=20.0), keep_records=False)
    assert np.array_equal(a.power_w, b.power_w) and np.array_equal(a.shares_w, b.shares_w)


def test_dead_replica_watts_reused_only_after_its_lease():
    fleet = small_fleet(duration_s=60.0, budget=f"{0.6 * PEAK_W}", lease_s=10.0)
    r = run_fleet(fleet, faults=FaultPlan(kill_replicas={"llama-1": 21.0}), keep_records=False)
    by = {x.name: x for x in r.replicas}
    dead = by["llama-1"]
    assert not dead.alive and np.isnan(dead.power_w[25:]).all()
    last_lease = max((t for t in r.ticks if t["t_s"] <= 21.0 and "llama-1" in t["shares_w"]),
                     key=lambda t: t["t_s"])
    held = last_lease["shares_w"]["llama-1"]
    expiry = last_lease["t_s"] + 10.0
    for t in r.ticks:
        alive_sum = sum(v for k, v in t["shares_w"].items() if k != "llama-1")
        if last_lease["t_s"] < t["t_s"] < expiry:
            assert alive_sum <= 0.6 * PEAK_W - held + 1e-6        # its watts still held
        assert t["committed_w"] <= 0.6 * PEAK_W + 1e-6
    # reassigned within one lease plus one period
    after = [t for t in r.ticks if expiry <= t["t_s"] <= expiry + 5.0]
    assert after and sum(after[-1]["shares_w"].values()) > 0.6 * PEAK_W - held + 1.0
    assert "llama-1" not in after[-1]["shares_w"]


def test_agents_keep_their_share_until_the_lease_ends_then_fall_back():
    fleet = small_fleet(duration_s=60.0, budget=f"{0.6 * PEAK_W}", lease_s=10.0)
    r = run_fleet(fleet, faults=FaultPlan(coordinator_down=((21.0, 50.0),)), keep_records=False)
    last = max((t for t in r.ticks if t["t_s"] <= 21.0), key=lambda t: t["t_s"])
    for rep in r.replicas:
        share = rep.share_w   # share in force during window k = share at k*dt
        granted = last["shares_w"][rep.name]
        t_exp = int(last["t_s"] + 10.0)
        assert share[t_exp - 1] == pytest.approx(granted)           # still the lease's
        assert share[t_exp + 2] == pytest.approx(min(granted, 200.0))   # the safe share
        assert share[48] == pytest.approx(min(granted, 200.0))
    assert (r.shares_w <= r.budget_w + 1e-6).all()
    # the coordinator is back at t = 50 and raises again
    assert any(t["t_s"] >= 50.0 for t in r.ticks)
    assert r.shares_w[-1] > 4 * 200.0


def test_restarted_coordinator_rebuilds_from_reports():
    fleet = small_fleet(duration_s=40.0)
    r = run_fleet(fleet, faults=FaultPlan(restart_coordinator_s=(22.0,)), keep_records=False)
    epochs = [t["epoch"] for t in r.ticks]
    assert epochs[0] == 0 and epochs[-1] == 1
    first_new = next(t for t in r.ticks if t["epoch"] == 1)
    assert first_new["committed_w"] <= first_new["budget_w"] + 1e-6
    assert (r.shares_w <= r.budget_w + 1e-6).all()


def test_tracking_mode_splits_the_site_target():
    from palsctl.cluster.schema import parse_fleet_text

    cfg = parse_fleet_text("""
name = "track"
duration_s = 30.0
[site]
power_target_w = 1200.0
policy = "equal"
[[pool]]
name = "p"
replicas = 2
plant = { model = "llama-3.1-8b", gpu = "h100-sxm", num_gpus = 1, max_batch_launch = 64 }
workload = { kind = "poisson", load = 0.9, prompt_tokens_mean = 256, output_tokens_mean = 128 }
controller = { name = "pi" }
""")
    r = run_fleet(cfg, keep_records=True)
    assert r.tracking
    for rep in r.replicas:
        sp = rep.record.steps[-1].setpoint
        assert sp.power_target_w == pytest.approx(600.0) and sp.power_budget_w is None
    s = summarize_fleet(r)
    assert s["power_tracking_mae_w"] is not None and s["time_over_budget_s"] is None


def test_site_series_hold_a_dead_replicas_share_until_its_lease_ends():
    fleet = small_fleet(duration_s=60.0, budget=f"{0.6 * PEAK_W}", lease_s=10.0)
    r = run_fleet(fleet, faults=FaultPlan(kill_replicas={"llama-1": 21.0}), keep_records=False)
    s = summarize_fleet(r)
    assert s["max_shares_over_budget_w"] == 0.0 and s["max_caps_over_budget_w"] == 0.0
    dead = next(x for x in r.replicas if x.name == "llama-1")
    assert dead.held_until is not None and 25 <= dead.held_until <= 35
