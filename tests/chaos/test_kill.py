"""SIGKILL at random moments (seeded), then a restart: the original settings come back.

``palsctl control`` drives an emulated GPU and the admission gateway; it is killed with SIGKILL
(no handler runs) at a random moment: while starting, after its claim, in the loop, or while it
restores after a SIGTERM. The emulator and the gateway then hold whatever it had set. A restart
— ``palsctl restore`` by hand, or the next ``palsctl control``, which must restore the dead
owner's originals *before* reading "originals" itself — puts back 700 W and 16 exactly, and
leaves no claim. The steps the killed run appended are whole rows. A ``palsctl run`` killed
at a random moment leaves its results folder either as it was or complete, never torn.
"""
from __future__ import annotations

import json
import random
import subprocess

import pytest

from palsctl.experiment.results import csv_digest
from tests.support.processes import (
    ORIGINAL,
    PALSCTL,
    claims,
    kill_control_once,
    serving_stack,
    whole_rows,
)

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

KILLS = 5


def test_sigkill_of_control_then_restart_restores_the_originals(tmp_path, monkeypatch):
    state_dir = tmp_path / "state"
    monkeypatch.setenv("PALSCTL_STATE_DIR", str(state_dir))
    rng = random.Random(20261207)
    seen = []
    with serving_stack(tmp_path) as st:
        for i in range(KILLS):
            left, how = kill_control_once(st, tmp_path / f"out{i}", rng)
            whole_rows(tmp_path / f"out{i}" / "steps.csv")
            seen.append((how, left))
            if left != ORIGINAL:
                assert claims(state_dir), f"{how}: settings {left} changed and no claim"
            if i % 2 == 0:      # by hand
                r = subprocess.run(PALSCTL + ["restore"], capture_output=True, text=True,
                                   timeout=120)
                assert r.returncode == 0, r.stdout + r.stderr
            else:               # the next start restores first, then runs and restores again
                r = subprocess.run(PALSCTL + ["control", str(st["cfg"]), "--duration-s", "1.0",
                                              "--out", str(tmp_path / f"next{i}")],
                                   capture_output=True, text=True, timeout=120)
                assert r.returncode == 0, r.stderr[-2000:]
                assert "settings restored" in r.stdout
                if left != ORIGINAL:
                    assert "restored the settings left by pid" in r.stderr
                summary = json.loads((tmp_path / f"next{i}" / "summary.json").read_text())
                assert summary["steps"] == summary["steps_file"]["rows"] == 2
            assert (st["cap"](), st["limit"]()) == ORIGINAL, (how, left, r.stdout, r.stderr)
            assert claims(state_dir) == []
    assert any(left != ORIGINAL for _, left in seen), seen      # some kills left them changed


def test_sigkill_of_run_never_leaves_torn_results(tmp_path):
    out = tmp_path / "res"
    args = PALSCTL + ["run", "-q", "--no-plot", "--duration-s", "90", "--out", str(out)]
    r = subprocess.run(args + ["--seed", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rng = random.Random(7)
    for seed in range(2, 5):
        proc = subprocess.Popen(args + ["--seed", str(seed)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(rng.uniform(0.5, 6.0))
        except subprocess.TimeoutExpired:
            pass
        finally:
            proc.kill()
            proc.wait(30)
        summary = json.loads((out / "summary.json").read_text())
        entry = summary["steps_file"]
        assert (entry["rows"], entry["sha256"]) == csv_digest(out / entry["path"])
        assert entry["rows"] == 90
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "res"]
        for name in leftovers:       # a killed run's temporary folder, never in place
            assert name.startswith(".res.") and name.endswith((".tmp", ".old")), name
