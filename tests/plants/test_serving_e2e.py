"""End to end over loopback, on the wall clock: emulator (simulated plant in real time) +
admission gateway + vLLM metrics sensor + emulated NVML + a controller in the closed loop,
driven by closed-loop streaming clients."""
from __future__ import annotations

import time

import pytest

from palsctl.adapters.batch import GatewayBatch
from palsctl.adapters.emulator import EmulatorPower
from palsctl.adapters.gateway import GatewayControl
from palsctl.adapters.vllm_metrics import VllmMetricsSensor
from palsctl.errors import ActuatorError
from palsctl.interfaces import Actuator, Sensor
from palsctl.loop import ClosedLoop, run_loop
from palsctl.plants.serving import ServingPlant
from palsctl.plants.sim import SimPlant
from palsctl.registry import make_controller
from palsctl.safety import GuardConfig
from palsctl.types import Action, Setpoint
from tests.support.harness import TOKEN, Harness

pytestmark = pytest.mark.timeout(120)


def test_closed_loop_gateway_shrink_exactly_once_and_sensor_matches_clients():
    plant = SimPlant("llama-3.1-8b", "h100-sxm", 1, max_batch_launch=32, seed=1)
    with Harness(plant, clients=12, max_tokens=48, limit=32) as h:
        power = EmulatorPower(h.emu.url)
        sensor = VllmMetricsSensor(h.emu.url + "/metrics", model_name="m")
        batch = GatewayBatch(GatewayControl(h.gw.control_url, TOKEN), launch_max=32)
        assert isinstance(power, Sensor) and isinstance(power, Actuator)
        assert isinstance(sensor, Sensor) and isinstance(batch, Actuator)
        sp = ServingPlant(metrics=sensor, power=power, batch=batch, max_batch_launch=32,
                          dt_s=0.5)
        assert sp.limits.power_cap_max_w == 700 and sp.limits.num_gpus == 1
        ctl = make_controller("cap-to-budget", max_batch=4)
        t_shrink = time.monotonic()
        record = run_loop(sp, ctl, duration_s=3.0, schedule=lambda t: Setpoint(
            power_budget_w=350.0))
        # the sensor against the clients' own count, over a steady 1.5 s window
        check = VllmMetricsSensor(h.emu.url + "/metrics", model_name="m")
        check.prime()
        a = time.monotonic()
        time.sleep(1.5)   # wall-clock plant: the window must elapse
        w = check.read_window()
        b = time.monotonic()
        client_tok = h.tokens_between(a, b)
        t_close = time.monotonic()
        sp.close()
        cap_after = power.power_cap_w              # read from the (still running) emulator
        h.stop()

    steps = record.steps
    assert len(steps) == 6
    assert all(s.applied.max_batch == 4 for s in steps)
    assert all(s.applied.power_cap_w == 350.0 for s in steps)
    assert not any(s.measurement.stale for s in steps)
    later = steps[2:]
    assert all(s.measurement.throughput_tok_s > 0 for s in later)
    assert all(0 < s.measurement.power_w < 350 * 1.05 for s in later)   # capped (+ noise)
    assert all(s.measurement.running <= 4 for s in later)
    assert all(s.measurement.tpot_p90_s is not None for s in later)
    # the measurement reports what the devices hold (read back, step 2 on: the caps applied)
    assert all(s.measurement.power_cap_w == 350.0 and s.measurement.max_batch == 4
               for s in later)
    assert all(s.fault == "" for s in steps) and sp.drift_events() == {"power": 0, "batch": 0}
    # restored on close
    assert sp.restored and cap_after == 700.0 and h.final_gate["max_concurrency"] == 32

    # concurrency never exceeds the new limit once the in-flight requests drained
    samples = [s for s in h.log.samples if t_shrink <= s[0] < t_close]
    drained_at = next(i for i, s in enumerate(samples) if s[3] == 4 and s[2] <= 4)
    after = samples[drained_at:]
    assert len(after) > 50
    assert max(s[1] for s in after) <= 4 and max(s[2] for s in after) <= 4
    assert max(s[1] for s in h.log.samples) > 4      # it was above before the shrink

    # every request completed exactly once
    assert h.log.bad == []
    assert h.log.ok == h.log.sent == h.final_served == h.final_ids > 12

    # sensor throughput vs client-side count within 5 %
    sensor_tok = w.throughput_tok_s * w.window_s
    assert client_tok > 300
    assert abs(sensor_tok - client_tok) / client_tok < 0.05, (sensor_tok, client_tok)


def test_stale_measurement_when_server_goes_away():
    plant = SimPlant("llama-3.1-8b", "h100-sxm", 1, max_batch_launch=8, seed=2)
    h = Harness(plant, clients=0, max_tokens=4, limit=8)
    with h:
        power = EmulatorPower(h.emu.url, timeout_s=1.0, restore_attempts=3,
                              restore_backoff_s=0.01)
        sensor = VllmMetricsSensor(h.emu.url + "/metrics", timeout_s=1.0)
        sp = ServingPlant(metrics=sensor, power=power, batch=None, max_batch_launch=8)
        m1 = sp.read()
        assert not m1.stale and m1.power_w > 0 and m1.power_cap_w == 700.0
        assert sp.apply(Action(power_cap_w=300.0)) == Action(power_cap_w=300.0, max_batch=8)
    # emulator stopped: the next read is stale and repeats the last good values (the cap read
    # back last, not the value written since: that was never confirmed by a read)
    m2 = sp.read()
    assert m2.stale and m2.power_w == m1.power_w and m2.power_cap_w == 700.0
    assert sp.failures == 1
    with pytest.raises(ActuatorError) as err:          # the write cannot happen either
        sp.apply(Action(power_cap_w=250.0, max_batch=4))
    assert err.value.applied == Action(power_cap_w=None, max_batch=8)
    sp.close()   # the restore fails after 3 tries and says so (never a quiet success)
    assert sp.restored is False and "emulated power limit" in sp.restore_errors[0]


def test_controller_crash_restores_cap_and_batch():
    from palsctl.interfaces import Controller, ControllerConfig

    class Crashing(Controller):
        Config = ControllerConfig

        def __init__(self):
            super().__init__()
            self.n = 0

        def step(self, m, sp):
            self.n += 1
            if self.n == 2:
                self.seen = (m.power_cap_w, m.max_batch)   # what step 1 set
                raise RuntimeError("controller bug")
            return Action(power_cap_w=250.0, max_batch=2)

    plant = SimPlant("llama-3.1-8b", "h100-sxm", 1, max_batch_launch=16, seed=4)
    with Harness(plant, clients=2, max_tokens=8, limit=16) as h:
        power = EmulatorPower(h.emu.url)
        batch = GatewayBatch(GatewayControl(h.gw.control_url, TOKEN), launch_max=16)
        ctl = Crashing()
        with pytest.raises(RuntimeError, match="controller bug"):
            with ServingPlant(metrics=VllmMetricsSensor(h.emu.url + "/metrics"), power=power,
                              batch=batch, max_batch_launch=16, dt_s=0.2) as sp:
                run_loop(sp, ctl, duration_s=2.0, schedule=lambda t: Setpoint(),
                         guard=False)
        assert ctl.seen == (250.0, 2)
        assert batch.control.state()["max_concurrency"] == 16
        assert EmulatorPower(h.emu.url).read_gpus()[0].power_limit_w == 700.0
        assert plant.engine.cap_set_w == 700.0


def test_drift_is_read_back_repaired_once_per_episode_and_counted(caplog):
    """Another tool resets the limits behind palsctl's back: the next measurement reports the
    devices' values (never a cache), the next step writes the commanded ones again, and each
    episode is logged once and counted."""
    plant = SimPlant("llama-3.1-8b", "h100-sxm", 1, max_batch_launch=16, seed=5)
    with Harness(plant, clients=2, max_tokens=8, limit=16) as h:
        ctl_api = GatewayControl(h.gw.control_url, TOKEN)
        sp = ServingPlant(metrics=VllmMetricsSensor(h.emu.url + "/metrics"),
                          power=EmulatorPower(h.emu.url), batch=GatewayBatch(ctl_api,
                                                                             launch_max=16),
                          max_batch_launch=16, dt_s=0.2)
        # (a drift window is over the budget for real; with the guard's measured-power
        # enforcement on, a second window over it would tighten the cap: tested elsewhere)
        loop = ClosedLoop(sp, make_controller("cap-to-budget", max_batch=4),
                          schedule=lambda t: Setpoint(power_budget_w=450.0),
                          guard=GuardConfig(enforce_measured_power=False))
        first = loop.step()
        assert first.applied == Action(power_cap_w=450.0, max_batch=4)
        with caplog.at_level("WARNING"):
            for _ in range(2):          # two episodes of drift
                other = EmulatorPower(h.emu.url)
                other._call("POST", "/palsctl/power/cap", {"power_cap_w": 700.0})
                ctl_api.set_max_concurrency(16)
                drifted = loop.step()
                assert (drifted.measurement.power_cap_w, drifted.measurement.max_batch) == \
                    (700.0, 16)                              # what the devices said
                assert drifted.applied == Action(power_cap_w=450.0, max_batch=4)  # repaired
                healed = loop.step()
                assert (healed.measurement.power_cap_w, healed.measurement.max_batch) == \
                    (450.0, 4)
        assert sp.drift_events() == {"power": 2, "batch": 2}
        assert caplog.text.count("holds 700, not the 450 palsctl set") == 2
        assert caplog.text.count("holds 16, not the 4 palsctl set") == 2
        sp.close()
        assert sp.restored and ctl_api.state()["max_concurrency"] == 16
        assert EmulatorPower(h.emu.url).read_gpus()[0].power_limit_w == 700.0
