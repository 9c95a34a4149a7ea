"""`palsctl compare`: JSON keys, aggregation, versus_static, errors, and the example scenarios."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from palsctl.cli import main
from palsctl.experiment import load_experiment
from palsctl.experiment.compare import aggregate

ROOT = Path(__file__).resolve().parents[2]
# experiment files (fleet files, examples/fleet_*.toml, are tested in tests/cluster)
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.toml")
                  if not p.stem.startswith("fleet_"))

TINY = """
name = "tiny"
duration_s = 30.0
dt_s = 1.0
seed = 0
[plant]
kind = "sim"
model = "mixtral-8x7b"
gpu = "a100-sxm4-80gb"
num_gpus = 4
[workload]
kind = "poisson"
load = 0.4
[setpoint]
throughput_tok_s = "demand"
power_budget_w = { steps = [[0.0, 1600.0], [15.0, 900.0]] }
[controller]
name = "search"
"""


def test_aggregate_means_stds_and_ratios():
    s = {"static": [{"tokens_per_joule": 1.0, "x": None}, {"tokens_per_joule": 2.0, "x": None}],
         "a": [{"tokens_per_joule": 1.5, "x": None}, {"tokens_per_joule": 3.0, "x": None}]}
    r = aggregate(s)
    assert r["a"]["tokens_per_joule"] == pytest.approx(2.25)
    assert r["a"]["tokens_per_joule_std"] == pytest.approx(0.75)
    assert r["a"]["gain_vs_static"] == pytest.approx(1.5)
    assert r["a"]["hindsight_fraction"] is None and r["a"]["x"] is None


def test_compare_cli_writes_json_and_plots(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    out_json = tmp_path / "cmp.json"
    rc = main(["compare", str(cfg), "--controllers", "search,cap-to-budget", "--seeds", "2",
               "--references", "static,hindsight", "--json", str(out_json), "--out",
               str(tmp_path / "plots"), "-q"])
    assert rc == 0
    data = json.loads(out_json.read_text())
    # exactly the controllers asked for, plus the reference rows asked for (marked)
    assert set(data) == {"search", "cap-to-budget", "static", "hindsight"}
    assert [n for n, a in data.items() if a["reference"]] in (["static", "hindsight"],
                                                              ["hindsight", "static"])
    from palsctl.metrics import SUMMARY_KEYS
    for agg in data.values():
        for k in SUMMARY_KEYS:
            assert k in agg
        for k in ("tokens_per_joule_std", "gain_vs_static", "hindsight_fraction",
                  "step_latency_p99_s", "throughput_violation_rate", "batch_changes_per_100s",
                  "cap_reversals_per_100s", "qos_violation_rate_binding",
                  "qos_violation_rate_loose", "binding_fraction"):
            assert k in agg
        assert agg["seeds"] == 2
    assert data["static"]["gain_vs_static"] == pytest.approx(1.0)
    assert data["hindsight"]["hindsight_fraction"] == pytest.approx(1.0)
    # the budget drops below what static draws at 15 s: binding stretches exist
    assert 0.0 < data["search"]["binding_fraction"] < 1.0
    assert (tmp_path / "plots" / "timeline_all.png").stat().st_size > 0


def test_compare_runs_exactly_the_controllers_given(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    rc = main(["compare", str(cfg), "--controllers", "cap-to-budget", "--seeds", "1",
               "--duration-s", "10", "--json", "-", "-q"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"cap-to-budget"}          # no static or hindsight row added


def test_compare_unknown_controller_is_one_line_exit_2(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    assert main(["compare", str(cfg), "--controllers", "nope", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


@pytest.mark.parametrize("value", ["", " , "])
def test_compare_an_empty_controller_list_is_one_line_exit_2(tmp_path, capsys, value):
    # it ran every registered controller and the reference rows
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    assert main(["compare", str(cfg), "--controllers", value, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"palsctl compare: error: key '--controllers': give at least one controller "
                   f"(leave the option out for every registered one) (got {value!r})"]


@pytest.mark.parametrize("command", ["compare", "analyze"])
def test_json_at_the_experiment_file_is_refused_and_the_file_kept(tmp_path, capsys, command):
    # the comparison (or the stability report) replaced the user's experiment file
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    assert main([command, str(cfg), "--controllers", "static", "--json", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"palsctl {command}: error: key '--json': would overwrite the experiment file "
                   f"it reads; choose another file (got {str(cfg)!r})")
    assert cfg.read_text() == TINY


def test_versus_static_runs_both_on_the_same_workload():
    import tomllib

    from palsctl.experiment import experiment_from_dict, versus_static

    cfg = experiment_from_dict(tomllib.loads(TINY))
    a, b = versus_static(cfg, "search")
    assert a["generated_tokens"] > 0 and b["generated_tokens"] > 0
    assert a["tokens_per_joule"] > b["tokens_per_joule"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_scenarios_load(path, require_data):
    require_data(config=path)
    cfg = load_experiment(path)
    assert cfg.controller_name == "search"


def test_compare_controllers_example_runs_headless(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "compare_controllers.py"),
                        "--duration-s", "40", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={"MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin",
                            **{k: v for k, v in __import__("os").environ.items()
                               if k.startswith("PALSCTL")}})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "search" in r.stdout


def test_frontier_marks_the_non_dominated_points():
    from palsctl.experiment.compare import frontier

    pts = [(0.10, 1.0), (0.05, 1.2), (0.05, 1.1), (0.00, 0.9), (0.20, 1.3), (0.20, 1.2)]
    assert frontier(pts) == [False, True, False, True, True, False]


def test_compare_pareto_writes_points_png_and_names_the_frontier(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY.replace("duration_s = 30.0", "duration_s = 20.0"))
    out_json = tmp_path / "pareto.json"
    rc = main(["compare", str(cfg), "--controllers", "search,cap-only", "--seeds", "1",
               "--pareto", "--json", str(out_json), "--out", str(tmp_path / "p")])
    assert rc == 0
    data = json.loads(out_json.read_text())
    by = {}
    for p in data["points"]:
        by.setdefault(p["controller"], []).append(p)
    # static's grid (5 caps x 3 batches) and each controller's knob settings
    assert len(by["static"]) == 15
    from palsctl.controllers.cap_only import CapOnlyController
    from palsctl.controllers.search import SearchController
    assert [p["params"]["latency_margin"] for p in by["search"]] == \
        list(SearchController.aggressiveness[1])
    assert len(by["cap-only"]) == len(CapOnlyController.aggressiveness[1])
    front = [p for p in data["points"] if p["on_frontier"]]
    assert front and set(data["on_frontier"]) == {p["controller"] for p in front}
    for p in data["points"]:   # no frontier point is dominated by any point
        if p["on_frontier"]:
            assert not any(q["qos_violation_rate"] <= p["qos_violation_rate"]
                           and q["tokens_per_joule"] > p["tokens_per_joule"]
                           for q in data["points"])
    assert (tmp_path / "p" / "pareto.png").stat().st_size > 0
    assert "on the frontier:" in capsys.readouterr().out
