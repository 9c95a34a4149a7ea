"""palsctl command lines as subprocesses on loopback, for the CLI and kill tests: start one and
wait for the line that says where it listens; a serving stack (emulator + gateway + a control
config) that stops by itself."""
from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

PALSCTL = [sys.executable, "-m", "palsctl"]


def start(args, pattern):
    """Start ``palsctl ARGS``; return (process, match of ``pattern`` on its first line)."""
    proc = subprocess.Popen(PALSCTL + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    m = re.search(pattern, line)
    if not m:
        proc.kill()
        raise AssertionError(f"unexpected first line {line!r}: {proc.stderr.read()[-2000:]}")
    return proc, m


def get_json(url, token=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def stop(proc, timeout_s=20):
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


@contextmanager
def serving_stack(tmp_path: Path, *, budget_w: float = 400.0, max_batch: int = 3,
                  duration_s: int = 60):
    """``palsctl emulate`` (Llama-3.1-8B on one H100, batch 16) behind ``palsctl gateway``
    (limit 16) and a control config driving both with ``cap-to-budget`` at ``budget_w``, dt 0.5
    s. Yields a dict: ``emu_url``, ``gw_url``, ``ctl_url``, ``cfg``, ``token``, ``tmp``,
    ``emu``/``gw`` (the processes), ``cap()`` and ``limit()`` (the settings in force)."""
    emu, m = start(["emulate", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--port", "0",
                    "--max-num-seqs", "16", "--served-model-name", "m", "--duration-s",
                    str(duration_s)], r"at (http://127\.0\.0\.1:\d+)")
    emu_url = m.group(1)
    token_file = tmp_path / "gw.token"
    try:
        gw, m = start(["gateway", "--upstream", emu_url, "--listen", "127.0.0.1:0", "--control",
                       "127.0.0.1:0", "--max-concurrency", "16", "--token-file", str(token_file),
                       "--duration-s", str(duration_s)],
                      r"gateway (http://\S+) -> \S+; control (http://\S+)")
    except BaseException:
        stop(emu)
        raise
    gw_url, ctl_url = m.group(1), m.group(2)
    cfg = tmp_path / "control.toml"
    cfg.write_text(f"""
name = "e2e"
dt_s = 0.5
[serving]
metrics_url = "{emu_url}/metrics"
model_name = "m"
power = "emulator"
emulator_url = "{emu_url}"
batch = "gateway"
gateway_control_url = "{ctl_url}"
gateway_token_file = "gw.token"
max_batch_launch = 16
[setpoint]
power_budget_w = {budget_w}
[controller]
name = "cap-to-budget"
max_batch = {max_batch}
""")
    token = token_file.read_text().strip()
    stack = dict(emu_url=emu_url, gw_url=gw_url, ctl_url=ctl_url, cfg=cfg, token=token,
                 tmp=tmp_path, emu=emu, gw=gw,
                 cap=lambda: get_json(emu_url + "/palsctl/power")["gpus"][0]["power_limit_w"],
                 limit=lambda: get_json(ctl_url + "/control", token)["max_concurrency"])
    try:
        yield stack
    finally:
        for p in (gw, emu):
            stop(p)


#: the settings the stack's emulator and gateway start with
ORIGINAL = (700.0, 16)


def claims(state_dir: Path) -> list[Path]:
    """The claim files in a state folder."""
    return sorted(state_dir.glob("claim-*.json")) if state_dir.exists() else []


def whole_rows(path: Path) -> int:
    """Data rows of a steps CSV, asserting that every row is whole (as many fields as the
    header); 0 when the file does not exist."""
    if not path.exists():
        return 0
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows and all(len(r) == len(rows[0]) for r in rows), f"torn row in {path}"
    return len(rows) - 1


def kill_control_once(st, out: Path, rng) -> tuple[tuple[float, int], str]:
    """Start ``palsctl control`` on the stack and SIGKILL it at a random moment (``rng``):
    ``early`` (importing, recovering, claiming), ``running`` (after both knobs were set), or
    ``restoring`` (just after a SIGTERM). Returns ((cap, limit) left, which moment)."""
    proc = subprocess.Popen(PALSCTL + ["control", str(st["cfg"]), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    how = rng.choice(["early", "running", "running", "restoring"])
    try:
        delay = rng.uniform(0.0, 1.5)
        if how != "early":
            for _ in range(600):    # bounded wait (wall clock) until it has set both knobs
                if proc.poll() is not None or (st["cap"](), st["limit"]()) == (400.0, 3):
                    break
                try:
                    proc.wait(0.05)
                except subprocess.TimeoutExpired:
                    pass
            if how == "restoring":
                proc.send_signal(signal.SIGTERM)
                delay = rng.uniform(0.0, 0.3)
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            pass
    finally:
        proc.kill()
        proc.wait(30)               # reaped: its PID is dead, not a zombie
    return (st["cap"](), st["limit"]()), how
