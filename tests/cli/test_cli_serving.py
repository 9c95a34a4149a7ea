"""The command lines together, as a user runs them: `palsctl emulate`, `palsctl gateway`,
`palsctl control` (bounded, dry run, and stopped by SIGTERM with settings restored)."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest

from tests.support.processes import PALSCTL, get_json, serving_stack, start

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """Every palsctl started here keeps its claims in the test's own state folder."""
    d = tmp_path / "state"
    monkeypatch.setenv("PALSCTL_STATE_DIR", str(d))
    return d


@pytest.fixture()
def stack(tmp_path):
    with serving_stack(tmp_path) as st:
        yield st


def test_control_bounded_run_applies_and_restores(stack, state_dir):
    out = stack["tmp"] / "out"
    r = subprocess.run(PALSCTL + ["control", str(stack["cfg"]), "--duration-s", "1.5",
                                  "--out", str(out), "--status-every", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "3 steps" in r.stdout and "settings restored" in r.stdout
    assert "step 2: " in r.stderr and "budget 400 W" in r.stderr     # the status line
    rows = (out / "steps.csv").read_text().splitlines()
    assert len(rows) == 4
    summary = json.loads((out / "summary.json").read_text())
    from palsctl.experiment.results import csv_digest
    assert summary["steps_file"] == {"path": "steps.csv", "rows": 3,
                                     "sha256": csv_digest(out / "steps.csv")[1]}
    assert summary["settings_restored"] is True and summary["outcome"] == "completed"
    assert summary["drift_events"] == {"power": 0, "batch": 0} and summary["steps"] == 3
    assert list(state_dir.iterdir()) == []         # the claim was removed after restoring
    assert (out / "timeline.png").stat().st_size > 10_000 and "timeline in" in r.stdout
    header = rows[0].split(",")
    first = dict(zip(header, rows[1].split(",")))
    assert float(first["applied_cap_w"]) == 400.0 and int(first["applied_batch"]) == 3
    # restored
    assert get_json(stack["emu_url"] + "/palsctl/power")["gpus"][0]["power_limit_w"] == 700.0
    assert get_json(stack["ctl_url"] + "/control", stack["token"])["max_concurrency"] == 16


def test_control_dry_run_changes_nothing(stack, caplog):
    r = subprocess.run(PALSCTL + ["control", str(stack["cfg"]), "--duration-s", "1.0",
                                  "--dry-run", "--no-plot", "--out", str(stack["tmp"] / "dry")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DRY RUN" in r.stderr and "dry run: would set" in r.stderr
    assert not (stack["tmp"] / "dry" / "timeline.png").exists()     # --no-plot
    assert get_json(stack["emu_url"] + "/palsctl/power")["gpus"][0]["power_limit_w"] == 700.0
    assert get_json(stack["ctl_url"] + "/control", stack["token"])["max_concurrency"] == 16


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_control_signal_restores(stack, sig):
    proc = subprocess.Popen(PALSCTL + ["control", str(stack["cfg"]), "--out",
                                       str(stack["tmp"] / "term")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait until the first step was applied (the cap changed at the emulator)
        for line in proc.stderr:
            if "gateway max_concurrency" in line or "controlling" in line:
                break
        for _ in range(5000):   # bounded poll until both knobs were applied
            cap = get_json(stack["emu_url"] + "/palsctl/power")["gpus"][0]["power_limit_w"]
            batch = get_json(stack["ctl_url"] + "/control", stack["token"])["max_concurrency"]
            if (cap, batch) == (400.0, 3) or proc.poll() is not None:
                break
        assert (cap, batch) == (400.0, 3) and proc.poll() is None
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "settings restored" in out
    summary = json.loads((stack["tmp"] / "term" / "summary.json").read_text())
    assert summary["outcome"] == f"stopped by {sig}" and summary["settings_restored"]
    rows = (stack["tmp"] / "term" / "steps.csv").read_text().splitlines()
    assert summary["steps"] == summary["steps_file"]["rows"] == len(rows) - 1 >= 1
    assert get_json(stack["emu_url"] + "/palsctl/power")["gpus"][0]["power_limit_w"] == 700.0
    assert get_json(stack["ctl_url"] + "/control", stack["token"])["max_concurrency"] == 16


@pytest.mark.parametrize("body, words", [
    ('name = "x"\n[controller]\nname = "static"\n', "serving"),
    ('name = "x"\n[serving]\nmetrics_url = "http://127.0.0.1:9/metrics"\nbogus = 1\n'
     '[controller]\nname = "static"\n', "serving.bogus"),
    ('name = "x"\n[serving]\nmetrics_url = "http://127.0.0.1:9/metrics"\npower = "emulator"\n'
     '[controller]\nname = "static"\n', "serving.emulator_url"),
    ('name = "x"\n[serving]\nmetrics_url = "http://127.0.0.1:9/metrics"\nbatch = "scheduler"\n'
     '[controller]\nname = "static"\n', "serving.batch_file"),
    ('name = "x"\n[serving]\nmetrics_url = "ftp://x"\n[controller]\nname = "static"\n',
     "must be an http"),
    ('name = "x"\n[serving]\nmetrics_url = "http://127.0.0.1:9/metrics"\n'
     '[controller]\nname = "nope"\n', "controller.name"),
])
def test_bad_control_config_is_one_line_exit_2(tmp_path, body, words):
    cfg = tmp_path / "c.toml"
    cfg.write_text(body)
    r = subprocess.run(PALSCTL + ["control", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_control_without_gpu_driver_is_actionable(tmp_path):
    """With power = "nvml" on a machine without a driver: one clear line, exit 2 (on a GPU machine
    the metrics endpoint is unreachable instead, which is not an error at open)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "x"\nduration_s = 1.0\n[serving]\n'
                   'metrics_url = "http://127.0.0.1:9/metrics"\n'
                   '[controller]\nname = "static"\n')
    r = subprocess.run(PALSCTL + ["control", str(cfg), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60)
    if r.returncode == 2:
        assert "NVIDIA" in r.stderr or "GPU" in r.stderr
        assert "Traceback" not in r.stderr
    else:
        assert r.returncode == 0 and "stale" in r.stdout


def test_control_with_scheduler_batch_file_against_emulator(tmp_path):
    bf = tmp_path / "batch"
    emu, m = start(["emulate", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--port", "0",
                     "--max-num-seqs", "32", "--served-model-name", "m", "--batch-file", str(bf),
                     "--duration-s", "60"], r"at (http://127\.0\.0\.1:\d+)")
    url = m.group(1)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
name = "sched"
dt_s = 0.5
duration_s = 1.0
[serving]
metrics_url = "{url}/metrics"
power = "emulator"
emulator_url = "{url}"
batch = "scheduler"
batch_file = "batch"
max_batch_launch = 32
[controller]
name = "static"
max_batch = 5
""")
    try:
        r = subprocess.run(PALSCTL + ["control", str(cfg), "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        rows = (tmp_path / "o" / "steps.csv").read_text().splitlines()
        header = rows[0].split(",")
        assert all(dict(zip(header, row.split(",")))["applied_batch"] == "5" for row in rows[1:])
        assert bf.read_text() == "32\n"          # restored to the launch value on exit
    finally:
        emu.send_signal(signal.SIGTERM)
        emu.wait(20)


def test_endpoint_down_at_shutdown_is_reported_truthfully(stack, state_dir):
    """The emulator (the power endpoint) goes away while palsctl controls it: the loop goes on
    with stale steps; at shutdown the restore fails, palsctl says so (exit 1, never "settings
    restored") and keeps its claim for `palsctl restore`."""
    out_dir = stack["tmp"] / "down"
    proc = subprocess.Popen(PALSCTL + ["control", str(stack["cfg"]), "--out", str(out_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(5000):   # bounded poll until the cap was applied
            if get_json(stack["emu_url"] + "/palsctl/power")["gpus"][0]["power_limit_w"] == 400.0 \
                    or proc.poll() is not None:
                break
        assert proc.poll() is None
        stack["emu"].send_signal(signal.SIGTERM)
        stack["emu"].wait(20)
        steps = out_dir / "steps.csv"
        for _ in range(5000):   # bounded: until a step recorded the fault (appended as it ran)
            if "stale measurement" in steps.read_text() or proc.poll() is not None:
                break
        assert proc.poll() is None, "palsctl control ended when its endpoint went away"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-2000:]
    assert "settings NOT restored" in out and "settings restored" not in out
    assert "could not restore" in err and "palsctl restore" in err and "Traceback" not in err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["settings_restored"] is False and summary["restore_errors"]
    assert summary["stale_steps"] >= 1 and summary["faults"]["actuator_faults"] >= 1
    claims = list(state_dir.glob("claim-*.json"))
    assert [str(c) for c in claims] == [summary["state_file"]]
    r = subprocess.run(PALSCTL + ["restore", "--list"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "gone" in r.stdout and "emulator:" in r.stdout


def test_a_second_control_on_the_same_targets_is_refused(stack):
    first = subprocess.Popen(PALSCTL + ["control", str(stack["cfg"]), "--out",
                                        str(stack["tmp"] / "first")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(5000):   # bounded poll until the first one has set both knobs
            if (stack["cap"](), stack["limit"]()) == (400.0, 3) or first.poll() is not None:
                break
        assert first.poll() is None
        r = subprocess.run(PALSCTL + ["control", str(stack["cfg"]), "--duration-s", "1",
                                      "--out", str(stack["tmp"] / "second")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "another palsctl, pid" in r.stderr and "stop it first" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert (stack["cap"](), stack["limit"]()) == (400.0, 3)     # untouched
        r = subprocess.run(PALSCTL + ["control", str(stack["cfg"]), "--duration-s", "1",
                                      "--dry-run", "--no-plot", "--out", str(stack["tmp"] / "dry")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "a dry run writes nothing: going on" in r.stderr
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and "settings restored" in out
    assert (stack["cap"](), stack["limit"]()) == (700.0, 16)
