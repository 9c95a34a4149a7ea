"""The ray engine on a fake multi-node cluster (`ray.cluster_utils.Cluster`, logical GPUs), all
bound to 127.0.0.1: the same results as the local engine, a node removed, the coordinator
killed, a lease left to expire — never over the site budget."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytest.importorskip("ray")

from palsctl.cluster import FaultPlan, run_fleet, summarize_fleet  # noqa: E402
from palsctl.cluster.schema import parse_fleet_text  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(60)]

BUDGET_W = 3 * 4 * 400.0 * 0.8


def fleet(duration_s: float = 60.0, lease_s: float = 10.0, policy: str = "proportional"):
    return parse_fleet_text(f"""
name = "raytest"
duration_s = {duration_s}
seed = 5
[site]
power_budget_w = {BUDGET_W}
period_s = 5.0
lease_s = {lease_s}
policy = "{policy}"
[[pool]]
name = "a"
plant = {{ model = "llama-3.1-8b", gpu = "a100-sxm4-80gb", num_gpus = 4, max_batch_launch = 64 }}
workload = {{ kind = "poisson", load = 0.7, prompt_tokens_mean = 256, output_tokens_mean = 128 }}
setpoint = {{ throughput_tok_s = "demand", tpot_slo_s = 0.1 }}
controller = {{ name = "pi" }}
[[pool]]
name = "b"
plant = {{ model = "llama-3.1-8b", gpu = "a100-sxm4-80gb", num_gpus = 4, max_batch_launch = 64 }}
workload = {{ kind = "poisson", load = 0.4, prompt_tokens_mean = 256, output_tokens_mean = 128 }}
setpoint = {{ throughput_tok_s = "demand", tpot_slo_s = 0.1 }}
controller = {{ name = "pi" }}
[[pool]]
name = "c"
plant = {{ model = "llama-3.1-8b", gpu = "a100-sxm4-80gb", num_gpus = 4, max_batch_launch = 64 }}
workload = {{ kind = "poisson", load = 0.5, prompt_tokens_mean = 256, output_tokens_mean = 128 }}
setpoint = {{ throughput_tok_s = "demand", tpot_slo_s = 0.1 }}
controller = {{ name = "pi" }}
""")


def _listening_inodes() -> dict[str, str]:
    """inode -> local address of every listening TCP socket on this machine."""
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


def test_node_removed_watts_reassigned_after_the_lease_never_over(cluster):
    """Last in the module: the cluster loses a node for good."""
    c, nodes = cluster
    state = {"removed_at": None}

    def remove(t_s, eng):
        if state["removed_at"] is None and t_s >= 20.0:
            node_of = eng.host_nodes()
            victim = next(n for n in nodes if n.node_id == node_of["b"])
            assert victim is not c.head_node, "b's host must be on a worker node"
            c.remove_node(victim, allow_graceful=False)
            state["removed_at"] = t_s

    r = run_fleet(fleet(duration_s=60.0), engine="ray", keep_records=False,
                  faults=FaultPlan(on_segment=remove))
    t_rm = state["removed_at"]
    assert t_rm is not None
    s = summarize_fleet(r)
    assert "b" in s["dead_replicas"]
    last = max((t for t in r.ticks if "b" in t["shares_w"]), key=lambda t: t["t_s"])
    held, expiry = last["shares_w"]["b"], last["t_s"] + 10.0
    for t in r.ticks:
        assert t["committed_w"] <= BUDGET_W + 1e-6
        others = sum(v for k, v in t["shares_w"].items() if k != "b")
        if last["t_s"] < t["t_s"] < expiry:
            assert others <= BUDGET_W - held + 1e-6      # b's watts held until its lease ends
    after = [t for t in r.ticks if expiry <= t["t_s"] <= expiry + 5.0]
    assert after and sum(after[-1]["shares_w"].values()) > BUDGET_W - held + 1.0
    # the survivors' own records show their shares rising once b's lease ended
    both = sum(x.share_w for x in r.replicas if x.name != "b")
    assert np.nanmin(both[int(expiry) + 6:]) > np.nanmax(both[int(last["t_s"]) + 1:
                                                              int(expiry)])
