"""The scheduler plugin's logic without vLLM: control file, change detection, the cap rule,
the actuator; the plugin against a real engine is in tests/real_vllm."""
from __future__ import annotations

import importlib.util
import os
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from palsctl.adapters import vllm_scheduler as vs
from palsctl.errors import ConfigError


def test_write_read_and_bad_contents(tmp_path):
    p = tmp_path / "batch"
    assert vs.read_batch_target(p) is None
    vs.write_batch_target(p, 12)
    assert vs.read_batch_target(p) == 12 and p.read_text() == "12\n"
    for bad in ("", "x", "0", "-3", "2.5"):
        p.write_text(bad)
        assert vs.read_batch_target(p) is None
    assert [f for f in os.listdir(tmp_path) if f.startswith(".batch-")] == []


def test_reader_notices_changes(tmp_path):
    p = tmp_path / "batch"
    r = vs.BatchTargetReader(p)
    assert r.poll() is None
    vs.write_batch_target(p, 5)
    assert r.poll() == 5
    vs.write_batch_target(p, 7)
    assert r.poll() == 7
    os.unlink(p)
    assert r.poll() is None
    assert vs.BatchTargetReader(None).poll() is None


@given(st.one_of(st.none(), st.integers(1, 1000)), st.integers(0, 600), st.integers(1, 512))
def test_effective_cap_rule(target, running, launch):
    cap = vs.effective_cap(target, running, launch)
    assert 1 <= cap <= launch
    if target is None:
        assert cap == launch
    else:
        assert cap >= min(running, launch)              # never below running (within launch)
        assert cap == min(launch, max(target, running, 1))


def test_actuator_clamps_skips_dry_run_and_restores(tmp_path):
    p = tmp_path / "batch"
    a = vs.BatchFileActuator(p, launch_max=64)
    assert a.max_batch == 64
    assert a.set_max_batch(500) == 64 and vs.read_batch_target(p) == 64
    assert a.set_max_batch(0) == 1 and vs.read_batch_target(p) == 1
    stamp = os.stat(p).st_mtime_ns, os.stat(p).st_ino
    assert a.set_max_batch(1) == 1 and (os.stat(p).st_mtime_ns, os.stat(p).st_ino) == stamp
    dry = vs.BatchFileActuator(p, launch_max=64, dry_run=True)
    assert dry.max_batch == 1 and dry.set_max_batch(9) == 9 and vs.read_batch_target(p) == 1
    a.close()
    assert vs.read_batch_target(p) == 64
    with pytest.raises(ConfigError, match="folder"):
        vs.BatchFileActuator(tmp_path / "nope" / "batch", launch_max=8)
    with pytest.raises(ConfigError):
        vs.BatchFileActuator(p, launch_max=0)


def test_mixin_sets_the_admission_attribute(tmp_path, monkeypatch):
    p = tmp_path / "batch"
    monkeypatch.setenv(vs.ENV_BATCH_FILE, str(p))

    class FakeScheduler(vs._BatchCapMixin):
        def __init__(self, newer: bool):
            self.scheduler_config = types.SimpleNamespace(max_num_seqs=16)
            self.max_num_running_reqs = 16
            if newer:
                self.max_num_active_reqs = 16
            self.running = []
            self._palsctl_init()

    for newer, attr in ((True, "max_num_active_reqs"), (False, "max_num_running_reqs")):
        s = FakeScheduler(newer)
        s._palsctl_apply()
        assert getattr(s, attr) == 16                 # no file: launch value
        vs.write_batch_target(p, 4)
        s.running = list(range(10))
        s._palsctl_apply()
        assert getattr(s, attr) == 10                 # never below running: drain down
        s.running = list(range(3))
        s._palsctl_apply()
        assert getattr(s, attr) == 4
        vs.write_batch_target(p, 99)
        s._palsctl_apply()
        assert getattr(s, attr) == 16                 # never above launch
        if newer:
            assert s.max_num_running_reqs == 16       # the runner's slot count is untouched
        os.unlink(p)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_plugin_classes_need_vllm():
    with pytest.raises(ImportError, match="palsctl\\[vllm\\]"):
        vs.PalsctlAsyncScheduler  # noqa: B018 - the attribute access is the test
    with pytest.raises(AttributeError):
        vs.NoSuchThing  # noqa: B018 - the attribute access is the test
