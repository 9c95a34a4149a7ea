"""`palsctl analyze` end to end (one operating point to stay fast) and its user errors."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from palsctl.cli import main

CONFIG = """\
name = "pi-check"
duration_s = 60.0
dt_s = 1.0
seed = 0

[plant]
kind = "sim"
model = "llama-3.1-8b"
gpu = "h100-sxm"
num_gpus = 1
max_batch_launch = 128

[workload]
kind = "poisson"
rate_req_s = 5.0

[setpoint]
throughput_tok_s = "demand"

[controller]
name = "pi"
kp_cap_budget = {kp}
ki_cap_budget_per_s = {ki}
"""


def _config(tmp_path: Path, kp: float = 0.3, ki: float = 0.5) -> str:
    p = tmp_path / "exp.toml"
    p.write_text(CONFIG.format(kp=kp, ki=ki))
    return str(p)


def _words(text: str) -> str:
    """The console wraps long lines: compare with the whitespace collapsed."""
    return " ".join(text.split())


def test_analyze_prints_verdicts_with_their_fit_writes_json_and_plots(tmp_path, capsys):
    out_json = tmp_path / "report.json"
    rc = main(["analyze", _config(tmp_path), "--no-model", "--load", "high", "--budget",
               "tight", "--json", str(out_json), "--out", str(tmp_path / "plots")])
    assert rc == 0
    text = _words(capsys.readouterr().out)
    assert "high-load/tight-budget" in text
    assert re.search(r"budget loop \(step-test model, fit (9\d|100) %\): stable", text), text
    assert "GM" in text and "PM" in text and "settling" in text and "poles" in text
    # pi as a whole is also step-tested on the closed loop
    assert "closed-loop budget steps" in text and "pi, high-load/tight-budget: budget" in text
    rep = json.loads(out_json.read_text())
    (loop,) = rep["loops"]
    assert loop["loop"] == "budget" and loop["kp"] == 0.3 and loop["ki"] == 0.5
    assert loop["plant"]["gain"] == pytest.approx(1.0, rel=0.05)   # binding cap: 1 W per W
    assert loop["stable"] is True and loop["gain_margin_db"] > 0
    assert loop["verdict"] == "stable" and loop["fit"]["ok"] and loop["fit"]["fit_pct"] > 99
    assert loop["settling_time_s"] > 0 and len(loop["poles"]) >= 2
    assert rep["verdicts"]["stable"] >= 1 and len(rep["empirical"]) == 1
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["bode_high-load_tight-budget_budget.png",
                    "map_high-load_tight-budget_budget.png",
                    "step_high-load_tight-budget_budget.png",
                    "step_pi_high-load_tight-budget_budget.png"]
    for p in (tmp_path / "plots").glob("*.png"):
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_analyze_warns_on_unstable_gains_and_strict_fails(tmp_path, capsys):
    rc = main(["analyze", _config(tmp_path, kp=2.0, ki=3.0), "--no-model", "--load", "high",
               "--budget", "tight", "--strict"])
    assert rc == 1
    out = _words(capsys.readouterr().out)
    assert "UNSTABLE" in out and "1 UNSTABLE" in out and "all 1 loops stable" not in out


def test_a_slow_loop_is_sluggish_not_ok(tmp_path, capsys):
    # stable with wide margins, but a small integral gain settles in minutes
    rc = main(["analyze", _config(tmp_path, kp=0.0, ki=0.02), "--no-model", "--load", "high",
               "--budget", "tight", "--strict", "--json", "-"])
    assert rc == 1
    rep = json.loads(capsys.readouterr().out)
    (loop,) = rep["loops"]
    assert loop["stable"] and loop["meets_margins"] and loop["settling_time_s"] > 60
    assert loop["verdict"] == "sluggish" and not rep["all_stable"]
    main(["analyze", _config(tmp_path, kp=0.0, ki=0.02), "--no-model", "--load", "high",
          "--budget", "tight", "--max-settling-s", "1000", "--json", "-"])
    (loop,) = json.loads(capsys.readouterr().out)["loops"]
    assert loop["verdict"] == "stable"


def test_a_loop_whose_model_does_not_fit_is_unverified_never_stable(tmp_path, capsys):
    # the loose-budget loops act on the throughput, whose 1 s readings swing with the engine's
    # admissions and completions far more than a cap step moves it at low load
    rc = main(["analyze", _config(tmp_path), "--no-model", "--load", "low", "--budget",
               "loose", "--json", "-"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    bad = [r for r in rep["loops"] if not r["fit"]["ok"]]
    assert bad, [(r["loop"], r["fit"]) for r in rep["loops"]]
    for r in bad:
        assert r["verdict"] == "unverified"
    assert not rep["all_stable"]
    for r in rep["loops"]:    # every verdict is stated with the fit beside it
        assert r["verdict"] != "stable" or r["fit"]["ok"]


def test_verify_checks_the_prediction_on_the_simulated_plant(tmp_path, capsys):
    rc = main(["analyze", _config(tmp_path), "--no-model", "--load", "high", "--budget",
               "tight", "--verify", "--json", "-"])
    assert rc == 0
    (loop,) = json.loads(capsys.readouterr().out)["loops"]
    v = loop["verification"]
    assert v["agrees"] and v["conclusive"] and 0.02 <= v["band"] <= 0.1
    assert v["measured_settling_time_s"] == pytest.approx(v["predicted_settling_time_s"],
                                                          rel=0.3, abs=2.0)


def test_search_is_analysed_by_closed_loop_budget_steps(tmp_path, capsys):
    rc = main(["analyze", _config(tmp_path), "--controllers", "search", "--load", "high",
               "--budget", "tight", "--json", "-", "--out", str(tmp_path / "plots")])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["loops"] == []
    (e,) = rep["empirical"]
    assert e["controller"] == "search" and e["point"] == "high-load/tight-budget"
    assert e["budget_after_w"] < e["budget_before_w"]
    assert e["verdict"] in ("stable", "sluggish", "oscillates", "does not settle")
    assert e["final_power_w"] <= e["budget_after_w"] * 1.01      # it obeys the new budget
    assert (tmp_path / "plots" / "step_search_high-load_tight-budget_budget.png").exists()


def test_deprecated_spellings_still_work_and_say_so(tmp_path, capsys):
    rc = main(["analyze", _config(tmp_path), "--no-model", "--load", "high", "--budget",
               "tight", "--plot", str(tmp_path / "maps")])
    assert rc == 0
    assert "--plot is deprecated; use --out" in capsys.readouterr().err
    assert len(list((tmp_path / "maps").glob("*.png"))) == 4


@pytest.mark.parametrize("args,needle", [
    (["--load", "huge"], "--load"),
    (["--budget", ""], "--budget"),
    (["--min-gm-db", "nan"], "--min-gm-db"),
    (["--max-settling-s", "0"], "--max-settling-s"),
    (["--controllers", "pi,nope"], "--controllers"),
])
def test_analyze_user_errors_are_one_line_exit_2(tmp_path, capsys, args, needle):
    rc = main(["analyze", _config(tmp_path), "--no-model", *args])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_analyze_bad_model_file_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "model.json"
    bad.write_text('{"x": 1}')
    assert main(["analyze", _config(tmp_path), "--model-file", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--model-file" in err and len(err.splitlines()) == 1


def test_analyze_missing_config_is_exit_2(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope.toml"), "--no-model"]) == 2
    assert "not found" in capsys.readouterr().err


def test_example_runs_headless(tmp_path):
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "examples" / "stability_analysis.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, MPLBACKEND="Agg"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "GM =" in proc.stdout and "recommended" in proc.stdout
    assert (tmp_path / "budget_loop_map.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "budget_loop_bode.png").read_bytes()[:4] == b"\x89PNG"
    fit = re.search(r"\(fit (\d+) %", proc.stdout)
    assert fit and int(fit.group(1)) >= 80 and "agrees" in proc.stdout, proc.stdout
