"""Claims of original settings (atomic, owner PID), recovery of a dead owner's settings,
conflicts with a live owner, retries with backoff, drift episodes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from palsctl.adapters import state as S
from palsctl.adapters.vllm_scheduler import read_batch_target, write_batch_target
from tests.support.fake_nvml import FakeGpu, FakeNvml


def test_atomic_write_replaces_whole_and_sets_the_mode(tmp_path):
    p = tmp_path / "f.json"
    S.atomic_write_text(p, "one\n", mode=0o600)
    S.atomic_write_text(p, "two\n", mode=0o600)
    assert p.read_text() == "two\n" and (p.stat().st_mode & 0o777) == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]       # no temporary left


def test_retry_backs_off_then_raises_the_last_error():
    sleeps, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(f"try {len(calls)}")
        return "ok"

    assert S.retry(flaky, attempts=5, first_delay_s=0.1, sleep=sleeps.append) == "ok"
    assert sleeps == [0.1, 0.2]
    sleeps.clear()
    with pytest.raises(OSError, match="try 4"):
        S.retry(lambda: (_ for _ in ()).throw(OSError("try 4")), attempts=4,
                first_delay_s=0.5, max_delay_s=1.0, sleep=sleeps.append)
    assert sleeps == [0.5, 1.0, 1.0]


def test_drift_watch_counts_episodes():
    d = S.DriftWatch("knob")
    assert not d.check(0, 5, None)               # nothing commanded yet
    assert d.check(0, 7, 5) and d.check(0, 7, 5) and not d.check(0, 5, 5)
    assert d.check(0, 9, 5) and d.events == 2


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(30)
    return p.pid


def test_claim_round_trip_and_owner_liveness(tmp_path):
    c = S.Claim.write(tmp_path, [{"kind": "batch_file", "path": "/x/b", "max_batch": 8}],
                      command="palsctl control x.toml")
    assert (c.path.stat().st_mode & 0o777) == 0o600
    loaded = S.Claim.load(c.path)
    assert loaded.targets == c.targets and loaded.pid == os.getpid() and loaded.owner_alive()
    assert S.find_claims(tmp_path)[0].keys == {"batch_file:/x/b"}
    body = json.loads(c.path.read_text())
    body["pid"] = _dead_pid()
    c.path.write_text(json.dumps(body))
    assert not S.Claim.load(c.path).owner_alive()
    body["pid"], body["start_ticks"] = os.getpid(), 1       # this PID, an earlier process
    c.path.write_text(json.dumps(body))
    assert not S.Claim.load(c.path).owner_alive()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(200):                  # bounded: until it exited (unreaped: a zombie)
            st = S._proc_stat(zombie.pid)
            if st is None or st[0] == "Z":
                break
            time.sleep(0.01)      # a real process on the wall clock
        body["pid"], body["start_ticks"] = zombie.pid, None
        c.path.write_text(json.dumps(body))
        assert not S.Claim.load(c.path).owner_alive()
    finally:
        zombie.wait(30)
    (tmp_path / "claim-bad.json").write_text("{not json")
    body["host"] = "another-host"
    c.path.write_text(json.dumps(body))
    assert S.find_claims(tmp_path) == []        # other hosts' and unreadable files are skipped


def test_recover_restores_a_dead_owners_settings_and_removes_the_claim(tmp_path):
    bf = tmp_path / "batch"
    write_batch_target(bf, 3)                      # left low by a killed palsctl
    fake = FakeNvml(gpus=[FakeGpu(limit_mw=450_000), FakeGpu(limit_mw=700_000)])
    c = S.Claim.write(tmp_path / "state", [
        {"kind": "batch_file", "path": str(bf), "max_batch": 32},
        {"kind": "nvml", "index": 0, "power_limit_w": 700.0},
        {"kind": "nvml", "index": 1, "power_limit_w": 700.0}])
    body = json.loads(c.path.read_text())
    body["pid"] = _dead_pid()
    c.path.write_text(json.dumps(body))
    out = S.recover(tmp_path / "state", {"nvml:*"}, nvml_backend=fake.as_module(),
                    first_delay_s=0.0)
    assert len(out) == 1 and out[0].ok and len(out[0].restored) == 2
    assert read_batch_target(bf) == 32 and [g.limit_mw for g in fake.gpus] == [700_000] * 2
    assert not c.path.exists()


def test_a_failed_restore_keeps_the_claim_and_a_live_owner_is_a_conflict(tmp_path):
    c = S.Claim.write(tmp_path, [{"kind": "emulator", "url": "http://127.0.0.1:9",
                                  "power_limit_w": 700.0}])
    with pytest.raises(S.ClaimConflict, match="stop it first"):     # our own live claim
        S.recover(tmp_path, {"emulator:http://127.0.0.1:9"})
    assert S.recover(tmp_path, {"emulator:http://127.0.0.1:8"}) == []  # other targets: fine
    assert S.recover(tmp_path) == []                   # by hand: live owners are left alone
    body = json.loads(c.path.read_text())
    body["pid"] = _dead_pid()
    c.path.write_text(json.dumps(body))
    sleeps = []
    (r,) = S.recover(tmp_path, attempts=3, first_delay_s=0.25, sleep=sleeps.append)
    assert not r.ok and "could not restore the emulated power limit" in r.failed[0]
    assert sleeps == [0.25, 0.5] and c.path.exists()


def test_keys_overlap_with_every_gpu():
    assert S._keys_overlap({"nvml:*"}, {"nvml:3", "gateway:x"})
    assert S._keys_overlap({"nvml:1"}, {"nvml:1"})
    assert not S._keys_overlap({"nvml:1"}, {"nvml:2", "emulator:x"})
    assert not S._keys_overlap({"emulator:a"}, {"nvml:*"})
