"""NVML adapter with an injected fake backend: units, clamping, no-op writes, dry run, error
translation, restore on close / crash / SIGTERM / SIGINT; the Sensor and Actuator, read-back and
drift repair, truthful restore."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from palsctl.adapters.nvml import NvmlPower
from palsctl.errors import ActuatorError, HardwareError, SensorError
from palsctl.types import Action
from tests.support import fake_nvml
from tests.support.fake_nvml import FakeGpu, FakeNvml

HERE = Path(__file__).resolve().parent


def open_fake(fake: FakeNvml, **kw) -> NvmlPower:
    return NvmlPower(backend=fake.as_module(), install_signal_handlers=False, **kw)


def test_read_units_and_fields():
    fake = FakeNvml(gpus=[FakeGpu(reasons=0x4), FakeGpu(instant_mw=None, energy_mj=None)])
    with open_fake(fake) as nv:
        r0, r1 = nv.read_gpus()
        assert r0.power_instant_w == pytest.approx(480.0)
        assert r0.power_avg_w == pytest.approx(450.0)
        assert r0.energy_j == pytest.approx(1000.0)
        assert r0.power_limit_w == pytest.approx(700.0)
        assert r0.sm_clock_mhz == 1980 and r0.sw_power_cap is True
        # field not supported: instant falls back to the driver power reading; no energy
        assert r1.power_instant_w == pytest.approx(450.0) and r1.energy_j is None
        assert r1.sw_power_cap is False
        c = nv.constraints[0]
        assert (c.power_cap_min_w, c.power_cap_max_w, c.power_cap_default_w) == (200, 700, 700)


def test_energy_counter_deltas_in_joules():
    fake = FakeNvml()
    with open_fake(fake) as nv:
        e0 = nv.read_gpus()[0].energy_j
        fake.gpus[0].energy_mj += 350_500
        assert nv.read_gpus()[0].energy_j - e0 == pytest.approx(350.5)


def test_set_cap_clamps_skips_noops_and_restores_on_close():
    fake = FakeNvml(gpus=[FakeGpu(), FakeGpu()])
    nv = open_fake(fake)
    assert nv.set_power_cap_w(99.0) == 200.0          # clamped to the minimum
    assert nv.set_power_cap_w(5000.0) == 700.0        # clamped to the maximum (no write: original)
    assert nv.set_power_cap_w(333.7) == 333.0         # rounded down to 1 W
    n = len(fake.writes)
    assert nv.set_power_cap_w(333.2) == 333.0 and len(fake.writes) == n   # no-op skipped
    assert [g.limit_mw for g in fake.gpus] == [333_000, 333_000]
    nv.close()
    assert [g.limit_mw for g in fake.gpus] == [700_000, 700_000]
    nv.close()  # idempotent
    assert fake.shutdowns == 1
    with pytest.raises(HardwareError):
        nv.set_power_cap_w(300.0)


def test_dry_run_writes_nothing(caplog):
    fake = FakeNvml()
    with open_fake(fake, dry_run=True) as nv:
        with caplog.at_level("INFO"):
            assert nv.set_power_cap_w(300.0) == 300.0
        assert "dry run" in caplog.text
    assert fake.writes == [] and fake.gpus[0].limit_mw == 700_000


def test_restore_on_controller_crash():
    fake = FakeNvml()
    with pytest.raises(ZeroDivisionError):
        with open_fake(fake) as nv:
            nv.set_power_cap_w(250.0)
            raise ZeroDivisionError("the controller crashed")
    assert fake.gpus[0].limit_mw == 700_000


@pytest.mark.parametrize("fn, code, words", [
    ("nvmlInit", fake_nvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver"),
    ("nvmlInit", fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED, "no NVIDIA driver"),
    ("nvmlDeviceSetPowerManagementLimit", fake_nvml.NVML_ERROR_NO_PERMISSION, "CAP_SYS_ADMIN"),
    ("nvmlDeviceSetPowerManagementLimit", fake_nvml.NVML_ERROR_NOT_SUPPORTED, "not supported"),
    ("nvmlDeviceGetPowerUsage", fake_nvml.NVML_ERROR_GPU_IS_LOST, "GPU not found or lost"),
    ("nvmlDeviceGetPowerUsage", fake_nvml.NVML_ERROR_UNKNOWN, "NVML error"),
])
def test_error_translation(fn, code, words):
    fake = FakeNvml(fail={fn: code})
    with pytest.raises(HardwareError, match=words) as info:
        nv = open_fake(fake)
        nv.read_gpus()
        nv.set_power_cap_w(300.0)
    assert info.value.nvml_code == code


def test_unsupported_optional_readings_are_none():
    fake = FakeNvml(fail={"nvmlDeviceGetClockInfo": fake_nvml.NVML_ERROR_NOT_SUPPORTED,
                          "nvmlDeviceGetCurrentClocksEventReasons":
                              fake_nvml.NVML_ERROR_NOT_SUPPORTED})
    with open_fake(fake) as nv:
        r = nv.read_gpus()[0]
    assert r.sm_clock_mhz is None and r.sw_power_cap is None


def test_no_gpu_and_bad_index():
    with pytest.raises(HardwareError, match="no GPU"):
        open_fake(FakeNvml(gpus=[]))
    with pytest.raises(HardwareError, match="index 3"):
        open_fake(FakeNvml(), indices=[3])


def test_real_library_without_driver_raises_hardware_error():
    """The real pynvml path: on a machine with a GPU it opens; without one it must fail with an
    actionable HardwareError, never a raw NVMLError."""
    try:
        nv = NvmlPower(install_signal_handlers=False)
    except HardwareError as exc:
        assert "driver" in str(exc) or "GPU" in str(exc)
        return
    try:
        readings = nv.read_gpus()
        assert readings and all(r.power_avg_w > 0 for r in readings)
    finally:
        nv.close()


CHILD = textwrap.dedent("""
    import signal, sys, time
    # as an interactive start has it, whatever started the test suite (a background job
    # inherits SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests_dir!r})
    from tests.support.fake_nvml import FakeNvml, FakeGpu
    from palsctl.adapters.nvml import NvmlPower
    fake = FakeNvml(gpus=[FakeGpu(), FakeGpu(limit_mw=650_000)], log_path={log!r})
    nv = NvmlPower(backend=fake.as_module())
    nv.set_power_cap_w(300.0)
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:   # wait to be killed
        time.sleep(0.05)
    sys.exit(3)
""")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_restores_original_limits(tmp_path, sig):
    import signal
    log = tmp_path / "writes.log"
    code = CHILD.format(tests_dir=str(HERE.parents[1]), log=str(log))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = log.read_text().split()
    writes = [(int(lines[i + 1]), int(lines[i + 2])) for i in range(0, len(lines), 3)]
    assert writes[:2] == [(0, 300_000), (1, 300_000)]
    assert sorted(writes[2:]) == [(0, 700_000), (1, 650_000)]
    assert proc.returncode != 0 and proc.returncode != 3   # died of the signal, not timed out
    if sig == "SIGTERM":
        assert proc.returncode == -signal.SIGTERM


def test_an_ignored_sigint_stays_ignored_and_the_limits_stay(tmp_path):
    """A process started with SIGINT ignored (a shell's background job, nohup) keeps running on
    SIGINT; the adapter must not restore the limits under it then."""
    import signal
    log = tmp_path / "writes.log"
    code = textwrap.dedent(f"""
        import signal, sys
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.path.insert(0, {str(HERE.parents[1])!r})
        from tests.support.fake_nvml import FakeNvml
        from palsctl.adapters.nvml import NvmlPower
        nv = NvmlPower(backend=FakeNvml(log_path={str(log)!r}).as_module())
        nv.set_power_cap_w(300.0)
        print("ready", flush=True)
        sys.stdin.readline()                 # the SIGINT arrives while this waits
        print(nv.power_cap_w, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate("go\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert float(out.split()[0]) == 300.0                  # still capped: nothing restored
    assert log.read_text().split("\n")[:2] == ["set 0 300000", "set 0 700000"]  # at exit


def test_dropped_adapter_is_still_restored_at_exit(tmp_path):
    log = tmp_path / "writes.log"
    code = textwrap.dedent(f"""
        import gc, sys
        sys.path.insert(0, {str(HERE.parents[1])!r})
        from tests.support.fake_nvml import FakeNvml
        from palsctl.adapters.nvml import NvmlPower
        NvmlPower(backend=FakeNvml(log_path={str(log)!r}).as_module()).set_power_cap_w(250.0)
        gc.collect()          # the adapter was never closed nor kept
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert log.read_text().split("\n")[:2] == ["set 0 250000", "set 0 700000"]


# -- Sensor / Actuator, read-back, drift, truthful restore ------------------------------------
class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_sensor_reads_a_measurement_from_the_energy_counters():
    from palsctl.interfaces import Actuator, Sensor
    from palsctl.types import Measurement

    fake, clock = FakeNvml(gpus=[FakeGpu(), FakeGpu(energy_mj=None, power_mw=300_000)]), Clock()
    with open_fake(fake, clock=clock) as nv:
        assert isinstance(nv, Sensor) and isinstance(nv, Actuator)
        nv.prime()
        clock.now += 2.0
        fake.gpus[0].energy_mj += 900_000           # 900 J in 2 s = 450 W on GPU 0
        m = nv.read()
        # GPU 1 has no counter: the window falls back to the drivers' averaged power
        assert isinstance(m, Measurement) and m.window_s == 2.0
        assert m.power_w == pytest.approx(450.0 + 300.0) and m.energy_j == pytest.approx(1500.0)
        assert m.power_cap_w == 700.0 and m.sm_clock_mhz == 1980 and m.throughput_tok_s == 0
        fake.fail["nvmlDeviceGetPowerUsage"] = fake_nvml.NVML_ERROR_GPU_IS_LOST
        with pytest.raises(SensorError, match="lost"):
            nv.read()


def test_apply_reads_back_and_reports_the_device_not_a_cache():
    fake = FakeNvml(gpus=[FakeGpu(), FakeGpu()])
    with open_fake(fake) as nv:
        assert nv.apply(Action(power_cap_w=333.9)) == Action(power_cap_w=333.0)
        assert nv.apply(Action()) == Action(power_cap_w=333.0)        # read back only
        fake.gpus[1].limit_mw = 500_000        # another tool raised GPU 1's limit
        assert nv.power_cap_w == 500.0 and nv.read().power_cap_w == 500.0
        fake.fail["nvmlDeviceSetPowerManagementLimit"] = fake_nvml.NVML_ERROR_NO_PERMISSION
        with pytest.raises(ActuatorError, match="CAP_SYS_ADMIN"):
            nv.apply(Action(power_cap_w=333.0))
        del fake.fail["nvmlDeviceSetPowerManagementLimit"]


def test_drift_is_repaired_logged_once_per_episode_and_counted(caplog):
    fake = FakeNvml()
    with open_fake(fake) as nv:
        nv.set_power_cap_w(450.0)
        n = len(fake.writes)
        with caplog.at_level("WARNING", logger="palsctl.adapters.state"):
            for _episode in range(2):
                fake.gpus[0].limit_mw = 700_000          # a driver reset puts it back
                for _ in range(3):
                    assert nv.set_power_cap_w(450.0) == 450.0
                assert fake.gpus[0].limit_mw == 450_000
        assert nv.drift.events == 2 and len(fake.writes) == n + 2   # one repair per episode
        assert caplog.text.count("GPU power limit 0: the device holds 700, not the 450") == 2


def test_restore_failure_is_retried_and_reported_never_silent():
    fake = FakeNvml(gpus=[FakeGpu(), FakeGpu(limit_mw=650_000)])
    nv = open_fake(fake, restore_attempts=3, restore_backoff_s=0.0)
    nv.set_power_cap_w(300.0)
    calls = []

    def refuse(h, mw):
        calls.append((h, mw))
        raise fake_nvml.NVMLError(fake_nvml.NVML_ERROR_NO_PERMISSION)

    fake.nvmlDeviceSetPowerManagementLimit = refuse       # as_module() binds at open: rebind
    nv._nv.nvmlDeviceSetPowerManagementLimit = refuse
    with pytest.raises(ActuatorError, match="GPU 0: .*permission denied.*GPU 1:"):
        nv.close()
    assert len(calls) == 6 and fake.shutdowns == 1       # 3 tries x 2 GPUs, NVML shut down
    assert [g.limit_mw for g in fake.gpus] == [300_000, 300_000]


def test_restore_limits_writes_given_originals_back_and_only_where_needed():
    from palsctl.adapters.nvml import restore_limits

    fake = FakeNvml(gpus=[FakeGpu(limit_mw=450_000), FakeGpu(limit_mw=700_000)])
    restore_limits({0: 700.0, 1: 700.0}, backend=fake.as_module())
    assert [g.limit_mw for g in fake.gpus] == [700_000, 700_000]
    assert fake.writes == [(0, 700_000)]


def test_state_targets_name_each_gpu_and_its_original():
    fake = FakeNvml(gpus=[FakeGpu(), FakeGpu(limit_mw=650_000)])
    with open_fake(fake, indices=[1]) as nv:
        nv.set_power_cap_w(300.0)
        assert nv.state_targets() == [{"kind": "nvml", "index": 1,
                                       "name": "NVIDIA H100 80GB HBM3", "power_limit_w": 650.0}]
