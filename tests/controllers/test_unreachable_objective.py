"""Closed loop on the simulated plant with a TPOT objective no setting can meet (1,500-token
heavy-tailed prompts stall the decode steps; p90 TPOT 30 ms on one H100 under a 450-W budget).
Every controller misses the objective there; what is tested is that each still serves the load
— throughput before latency — without thrashing the batch limit. Before mpc's batch bound gave
way to throughput and pi's batch loop stopped cutting while requests waited, both let the queue
grow to ~370 requests in these 240 s (search: none) and pi changed its limit 108 times."""
from __future__ import annotations

import pytest

from palsctl.experiment import run_experiment
from palsctl.experiment.schema import experiment_from_dict
from palsctl.registry import make_controller

RAW = {
    "name": "unreachable-tpot", "duration_s": 240.0, "dt_s": 1.0, "seed": 0,
    "plant": {"kind": "sim", "model": "llama-3.1-8b", "gpu": "h100-sxm", "num_gpus": 1,
              "max_batch_launch": 512},
    "workload": {"kind": "poisson", "load": 0.8, "prompt_tokens_mean": 1500.0,
                 "prompt_tokens_sigma": 1.2, "output_tokens_mean": 200.0,
                 "output_tokens_sigma": 1.0},
    "setpoint": {"throughput_tok_s": "demand", "tpot_slo_s": 0.03, "ttft_slo_s": 1.5,
                 "power_budget_w": 450.0},
    "controller": {"name": "search"},
}


@pytest.fixture(scope="module")
def runs():
    cfg = experiment_from_dict(RAW)
    return {name: run_experiment(cfg, controller=make_controller(name), seed=0).steps
            for name in ("search", "mpc", "pi")}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["search", "mpc", "pi"])
def test_the_load_is_served_when_the_tpot_objective_is_out_of_reach(runs, name):
    steps = runs[name]
    # the objective is out of reach (else this test would test nothing): search, serving the
    # load, misses it in most windows ...
    over = sum(1 for s in runs["search"] if (s.measurement.tpot_p90_s or 0.0) > 0.03)
    assert over > len(runs["search"]) / 2
    # ... but the queue does not grow: at most a burst's worth waits at the end, and the tokens
    # generated are within 2 % of search's
    assert steps[-1].measurement.waiting <= 50
    tokens = sum(s.measurement.throughput_tok_s * s.measurement.window_s for s in steps)
    ref = sum(s.measurement.throughput_tok_s * s.measurement.window_s for s in runs["search"])
    assert tokens >= 0.98 * ref
    # ... the batch limit does not thrash, and the budget is kept
    changes = sum(a.applied.max_batch != b.applied.max_batch for a, b in zip(steps, steps[1:]))
    assert changes <= 30
    assert all(s.applied.power_cap_w <= 450.0 for s in steps)
