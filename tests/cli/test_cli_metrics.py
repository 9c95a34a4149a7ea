"""`palsctl control --metrics-port` against `palsctl emulate` on loopback: Prometheus scrapes the
controller's series, labelled so they join DCGM's (``gpu``) and vLLM's (``model_name``)."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from palsctl.adapters.exporter import METRIC_NAMES

pytestmark = pytest.mark.timeout(120)
PALSCTL = [sys.executable, "-m", "palsctl"]


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _value(samples, name, **labels) -> float:
    return samples[(name, tuple(sorted({"model_name": "m", **labels}.items())))]


@pytest.fixture()
def emulator(tmp_path):
    batch_file = tmp_path / "batch"
    proc = subprocess.Popen(PALSCTL + [
        "emulate", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--num-gpus", "2", "--port",
        "0", "--max-num-seqs", "16", "--served-model-name", "m", "--batch-file",
        str(batch_file), "--duration-s", "90"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    m = re.search(r"at (http://127\.0\.0\.1:\d+)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise AssertionError(proc.stderr.read()[-2000:])
    yield m.group(1), batch_file
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_control_serves_its_state_for_prometheus(emulator, tmp_path):
    url, batch_file = emulator
    cfg = tmp_path / "control.toml"
    cfg.write_text(f"""
name = "metrics"
dt_s = 0.5
[serving]
metrics_url = "{url}/metrics"
model_name = "m"
power = "emulator"
emulator_url = "{url}"
batch = "scheduler"
batch_file = "{batch_file}"
max_batch_launch = 16
[setpoint]
power_budget_w = 500.0
[controller]
name = "cap-to-budget"
max_batch = 3
""")
    ctl = subprocess.Popen(PALSCTL + ["control", str(cfg), "--duration-s", "10", "--out",
                                      str(tmp_path / "out"), "--metrics-port", "0"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in ctl.stderr:           # the log names the port it bound
            m = re.search(r"Prometheus metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "no metrics line logged"
        metrics = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 30
        while True:                       # wait for a few control steps (bounded)
            s = _scrape(metrics)
            if _value(s, "palsctl_control_steps_total") >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert _value(s, "palsctl_control_steps_total") >= 4
        names = {n for n, _ in s}
        for name in METRIC_NAMES:
            assert name in names or f"{name}_count" in names, name
        # the cap per GPU with DCGM's gpu label: the budget's share, 500 W / 2
        assert _value(s, "palsctl_power_cap_watts", gpu="0") == pytest.approx(250.0)
        assert _value(s, "palsctl_power_cap_watts", gpu="1") == pytest.approx(250.0)
        assert _value(s, "palsctl_batch_limit") == 3
        assert _value(s, "palsctl_power_budget_watts") == 500.0
        assert 0 < _value(s, "palsctl_power_watts") <= 2 * 700
        assert _value(s, "palsctl_controller_step_seconds_count") >= 4
        assert _value(s, "palsctl_energy_joules_total") > 0
        # beside vLLM's series of the same deployment: model_name joins them
        vllm = _scrape(f"{url}/metrics")
        assert any(n.startswith("vllm:") and dict(lb).get("model_name") == "m"
                   for n, lb in vllm)
        out, err = ctl.communicate(timeout=60)
    finally:
        if ctl.poll() is None:
            ctl.kill()
    assert ctl.returncode == 0, err[-3000:]
    assert "settings restored" in out
    with pytest.raises(OSError):         # the exporter stopped with the loop
        urllib.request.urlopen(metrics, timeout=2)
