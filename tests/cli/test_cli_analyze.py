"""`palsctl analyze` end to end (one operating point to stay fast) and its user errors."""
import json
import os
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


def test_analyze_prints_margins_writes_json_and_maps(tmp_path, capsys):
    out_json = tmp_path / "report.json"
    rc = main(["analyze", _config(tmp_path), "--no-model", "--load", "high", "--budget",
               "tight", "--json", str(out_json), "--plot", str(tmp_path / "maps")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "high-load/tight-budget" in text and "budget loop (step-test)" in text
    assert "GM" in text and "PM" in text and "settling" in text and "poles" in text
    rep = json.loads(out_json.read_text())
    (loop,) = rep["loops"]
    assert loop["loop"] == "budget" and loop["kp"] == 0.3 and loop["ki"] == 0.5
    assert loop["plant"]["gain"] == pytest.approx(1.0, rel=0.05)   # binding cap: 1 W per W
    assert loop["stable"] is True and loop["gain_margin_db"] > 0
    assert loop["settling_time_s"] > 0 and len(loop["poles"]) >= 2
    pngs = list((tmp_path / "maps").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:4] == b"\x89PNG"


def test_analyze_warns_on_unstable_gains_and_strict_fails(tmp_path, capsys):
    rc = main(["analyze", _config(tmp_path, kp=2.0, ki=3.0), "--no-model", "--load", "high",
               "--budget", "tight", "--strict"])
    assert rc == 1
    out = capsys.readouterr().out
    assert "WARNING" in out and "UNSTABLE" in out


@pytest.mark.parametrize("args,needle", [
    (["--load", "huge"], "--load"),
    (["--budget", ""], "--budget"),
    (["--min-gm-db", "nan"], "--min-gm-db"),
])
def test_analyze_user_errors_are_one_line_exit_2(tmp_path, capsys, args, needle):
    rc = main(["analyze", _config(tmp_path), "--no-model", *args])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_analyze_bad_model_file_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "model.json"
    bad.write_text('{"x": 1}')
    assert main(["analyze", _config(tmp_path), "--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--model" in err and len(err.splitlines()) == 1


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
