"""The ray engine on a fake multi-node cluster (`ray.cluster_utils.Cluster`, logical GPUs), all
bound to 127.0.0.1: the same results as the local engine, a node removed, the coordinator
killed, a lease left to expire — never over the site budget."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytest.importorskip("ray")

from palsctl.cluster import FaultPlan, run_fleet, summarize_fleet
from palsctl.cluster.schema import parse_fleet_text

pytestmark = [pytest.mark.ray, pytest.mark.timeout(60)]

BUDGET_W = 3 * 4 * 400.0 * 0.8


def fleet(duration_s: float = 60.0, lease_s: float = 10.0, policy: str = "proportional"):
    """Three one-replica pools (a, b, c) of Llama-3.1-8B on 4 x A100 at different loads."""
    pools = "".join(f"""
[[pool]]
name = "{name}"
plant = {{ model = "llama-3.1-8b", gpu = "a100-sxm4-80gb", num_gpus = 4, max_batch_launch = 64 }}
workload = {{ kind = "poisson", load = {load}, prompt_tokens_mean = 256, output_tokens_mean = 128 }}
setpoint = {{ throughput_tok_s = "demand", tpot_slo_s = 0.1 }}
controller = {{ name = "pi" }}
""" for name, load in (("a", 0.7), ("b", 0.4), ("c", 0.5)))
    return parse_fleet_text(f"""
name = "raytest"
duration_s = {duration_s}
seed = 5
[site]
power_budget_w = {BUDGET_W}
period_s = 5.0
lease_s = {lease_s}
policy = "{policy}"
{pools}""")


def _listening_inodes() -> dict[str, str]:
    """The local address of every listening TCP socket on this machine, by inode."""
    out = {}
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(f).read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            parts = ln.split()
            if parts[3] == "0A":
                out[parts[9]] = parts[1].split(":")[0]
    return out


def _ray_socket_addresses() -> set[str]:
    """Local addresses of the listening sockets held by Ray's processes."""
    listening = _listening_inodes()
    addrs = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            if "ray" not in cmd.lower():
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    ino = link[8:-1]
                    if ino in listening:
                        addrs.add(listening[ino])
        except OSError:
            continue
    return addrs


@pytest.fixture(scope="module")
def cluster():
    from palsctl.cluster.ray_engine import _import_ray

    ray = _import_ray()
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False   # loopback only (see palsctl.cluster.ray_engine)
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 4, "include_dashboard": False,
        "node_ip_address": "127.0.0.1"})
    nodes = [c.head_node] + [c.add_node(num_cpus=0, num_gpus=4, node_ip_address="127.0.0.1")
                             for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, _node_ip_address="127.0.0.1", namespace="palsctl",
             logging_level="WARNING")
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def local_result():
    return run_fleet(fleet(duration_s=40.0), keep_records=False)


def test_ray_engine_pins_hosts_and_matches_local(cluster, local_result):
    c, nodes = cluster
    seen = {}

    def where(t_s, eng):
        if not seen:
            seen.update(eng.host_nodes())

    r = run_fleet(fleet(duration_s=40.0), engine="ray", keep_records=False,
                  faults=FaultPlan(on_segment=where))
    # one host per replica, each on its own 4-GPU node (pinned by its logical GPUs)
    worker_ids = {n.node_id for n in nodes}
    assert set(seen) == {"a", "b", "c"} and set(seen.values()) == worker_ids
    # same seed, same results
    assert np.allclose(r.power_w, local_result.power_w)
    assert np.allclose(r.shares_w, local_result.shares_w)
    a, b = summarize_fleet(r), summarize_fleet(local_result)
    assert a["generated_tokens"] == pytest.approx(b["generated_tokens"], rel=1e-9)
    # every socket Ray listens on is on the loopback interface
    addrs = _ray_socket_addresses()
    assert addrs and all(x in ("0100007F", "0000000000000000FFFF00000100007F") for x in addrs), \
        addrs


def test_killed_coordinator_restarts_and_rebuilds_from_reports(cluster):
    r = run_fleet(fleet(duration_s=45.0), engine="ray", keep_records=False,
                  faults=FaultPlan(restart_coordinator_s=(20.0,)))
    epochs = [t["epoch"] for t in r.ticks]
    assert epochs[0] == 0 and max(epochs) >= 1
    for t in r.ticks:
        assert t["committed_w"] <= BUDGET_W + 1e-6
    assert (r.shares_w <= r.budget_w + 1e-6).all()


def test_lease_expires_agents_fall_back_then_coordinator_returns(cluster):
    t0 = time.monotonic()
    r = run_fleet(fleet(duration_s=60.0), engine="ray", keep_records=False,
                  faults=FaultPlan(coordinator_down=((21.0, 45.0),)))
    last = max((t for t in r.ticks if t["t_s"] <= 21.0), key=lambda t: t["t_s"])
    t_exp = int(last["t_s"] + 10.0)
    for rep in r.replicas:
        granted = last["shares_w"][rep.name]
        assert rep.share_w[t_exp - 1] == pytest.approx(granted)
        assert rep.share_w[t_exp + 2] == pytest.approx(min(granted, 400.0))
    assert (r.shares_w <= r.budget_w + 1e-6).all()
    assert r.shares_w[-1] > 3 * 400.0
    assert time.monotonic() - t0 < 30.0


@pytest.fixture
def emulators(tmp_path):
    """Three `palsctl emulate` servers (Llama-3.1-8B on one H100 each) on 127.0.0.1."""
    import socket
    import subprocess
    import sys

    procs, urls, files = [], [], []
    try:
        for i in range(3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            bf = tmp_path / f"batch{i}"
            log = tmp_path / f"emulator{i}.log"
            p = subprocess.Popen(
                [sys.executable, "-m", "palsctl", "emulate", "--host", "127.0.0.1", "--port",
                 str(port), "--seed", str(i), "--no-noise", "--batch-file", str(bf),
                 "--duration-s", "120"],
                stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
            procs.append((p, log))
            urls.append(f"http://127.0.0.1:{port}")
            files.append(str(bf))
        for p, log in procs:   # the ready line
            deadline = time.monotonic() + 30.0
            while "emulating" not in log.read_text() and time.monotonic() < deadline:
                assert p.poll() is None, log.read_text()
                time.sleep(0.1)
            assert "emulating" in log.read_text(), log.read_text()
        yield urls, files
    finally:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_real_path_three_emulators_three_agents_ray_coordinator(cluster, emulators):
    """Three agents drive three emulated servers (emulator power endpoint, vLLM /metrics, the
    scheduler plugin's batch file) on the wall clock; a Ray coordinator splits a site budget
    that drops from 1800 W to 900 W: the caps follow, never over, and are restored at the
    end."""
    from palsctl.adapters.emulator import EmulatorPower
    from palsctl.cluster.real import run_real_fleet
    from palsctl.cluster.schema import SiteConfig
    from palsctl.experiment.schema import setpoint_value
    from palsctl.experiment.serving import parse_serving

    urls, files = emulators
    servings = {f"r{i}": parse_serving({
        "metrics_url": u + "/metrics", "power": "emulator", "emulator_url": u,
        "batch": "scheduler", "batch_file": f, "max_batch_launch": 256}, file=None)
        for i, (u, f) in enumerate(zip(urls, files))}
    site = SiteConfig(power_budget_w=setpoint_value({"steps": [[0.0, 1800.0], [6.0, 900.0]]},
                                                    key="site.power_budget_w"),
                      power_target_w=None, period_s=3.0, policy="equal", reserve_w=0.0,
                      lease_s=6.0)
    t0 = time.monotonic()
    out = run_real_fleet(site, servings, duration_s=12.0, controller="cap-to-budget",
                         controller_params={"max_batch": 32})
    assert time.monotonic() - t0 < 30.0
    for t in out["ticks"]:
        assert t["committed_w"] <= t["budget_w"] + 1e-6
        assert sum(t["shares_w"].values()) <= t["budget_w"] + 1e-6
    assert any(t["t_s"] == 6.0 and t["budget_w"] == 900.0 for t in out["ticks"])
    caps = np.zeros(12)
    for name, res in out["replicas"].items():
        assert res["error"] is None and res["steps"] >= 11
        assert res["summary"]["steps"] >= 11
        share = np.array(res["share_w"], dtype=float)
        cap = np.array(res["caps_w"], dtype=float)
        ok = np.isfinite(cap) & np.isfinite(share)
        assert (cap[ok][1:] <= share[ok][1:] + 1e-6).all(), (name, cap, share)
        caps += np.nan_to_num(cap)
        # the last window measured (a loaded machine may skip the last wall-clock step):
        # 900 W / 3, read back from the server
        assert cap[np.isfinite(cap)][-1] == pytest.approx(300.0), (name, cap, share)
    assert caps[np.isfinite(caps)][-1] <= 900.0 + 1e-6 and caps[2] == pytest.approx(1800.0)
    # every agent restored its server's cap on stop
    for u in urls:
        assert EmulatorPower(u).read_gpus()[0].power_limit_w == 700.0


def test_node_removed_watts_reassigned_after_the_lease_never_over(cluster):
    """Last in the module: the cluster loses a node for good."""
    c, nodes = cluster
    state = {"removed_at": None, "victim": None}

    def remove(t_s, eng):
        if state["removed_at"] is None and t_s >= 20.0:
            # a replica whose host is on a worker node (Ray places the hosts by their logical
            # GPUs: one of the three lands on the head node, which cannot be removed)
            node_of = eng.host_nodes()
            name = min(n for n, nid in node_of.items() if nid != c.head_node.node_id)
            victim = next(n for n in nodes if n.node_id == node_of[name])
            c.remove_node(victim, allow_graceful=False)
            state["removed_at"], state["victim"] = t_s, name
            # the node is gone once its actor's worker is: it may answer for a moment after
            # its raylet was killed
            import ray

            h = eng.handles[eng.where[name]]
            deadline = time.monotonic() + 20.0
            while time.monotonic() < deadline:
                try:
                    ray.get(h.names.remote(), timeout=2.0)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    break
                time.sleep(0.2)

    r = run_fleet(fleet(duration_s=60.0), engine="ray", keep_records=False,
                  faults=FaultPlan(on_segment=remove))
    t_rm, dead = state["removed_at"], state["victim"]
    assert t_rm is not None
    s = summarize_fleet(r)
    assert dead in s["dead_replicas"]
    last = max((t for t in r.ticks if dead in t["shares_w"]), key=lambda t: t["t_s"])
    held, expiry = last["shares_w"][dead], last["t_s"] + 10.0
    for t in r.ticks:
        assert t["committed_w"] <= BUDGET_W + 1e-6
        others = sum(v for k, v in t["shares_w"].items() if k != dead)
        if last["t_s"] < t["t_s"] < expiry:
            assert others <= BUDGET_W - held + 1e-6      # its watts held until its lease ends
    after = [t for t in r.ticks if expiry <= t["t_s"] <= expiry + 5.0]
    assert after and sum(after[-1]["shares_w"].values()) > BUDGET_W - held + 1.0
    # the survivors' own records show their shares rising once the dead one's lease ended
    both = sum(x.share_w for x in r.replicas if x.name != dead)
    assert np.nanmin(both[int(expiry) + 6:]) > np.nanmax(both[int(last["t_s"]) + 1:
                                                              int(expiry)])
