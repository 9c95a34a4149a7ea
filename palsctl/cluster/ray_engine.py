"""The `ray` engine: agents in Ray actors, the coordinator in a named detached actor that Ray
restarts, the same protocol as the `local` engine (``pip install 'palsctl[cluster]'``).

* **Hosts.** Agents live in host actors (`palsctl.cluster.runtime.LocalHost` as a Ray actor).
  When the cluster offers GPU resources for every replica, each replica gets its own host
  pinned to ``num_gpus`` = its GPU count (on a real cluster: the node that holds its GPUs);
  otherwise (simulated fleets on a CPU machine) replicas are spread over ``hosts`` actors, by
  default one per CPU.
* **Coordinator.** A named, detached actor (``palsctl-fleet-<name>-<id>`` in namespace
  ``palsctl``) with ``max_restarts=-1``: killed, Ray starts it again with the same arguments,
  and the new instance rebuilds its counts from the agents' reports (a new epoch). The driver
  kills it when the run ends.
* **Failures.** A host whose call fails (`ray.exceptions.RayActorError`: the actor or its node
  died) is dead: its replicas stop reporting and the coordinator reuses their watts only once
  their leases end.
* **Networking.** Without ``address`` Ray starts on this machine and binds 127.0.0.1 only
  (`init_ray_loopback`); with ``address`` it joins that cluster (``ray.init(address=...)``).
"""
from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from palsctl.cluster.runtime import (
    Coordinator,
    HeldShare,
    LocalHost,
    ReplicaResult,
    ReplicaSpec,
    TickResult,
    site_schedule,
)
from palsctl.errors import ConfigError

__all__ = ["RayEngine", "init_ray_loopback", "NAMESPACE"]

NAMESPACE = "palsctl"
log = logging.getLogger(__name__)


def _import_ray():
    # Ray picks "this node's" address from the route to the outside unless told otherwise;
    # a loopback-only session must decide before Ray's constants are read.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray engine needs Ray: pip install 'palsctl[cluster]'",
                          key="--engine", value="ray") from None
    return ray


def init_ray_loopback(num_cpus: int | None = None, **kwargs: Any) -> Any:
    """Start a local Ray session bound to 127.0.0.1 only (no dashboard); returns ``ray``."""
    ray = _import_ray()
    from ray._private import ray_constants

    # when ray was imported before the environment variable was set
    ray_constants.ENABLE_RAY_CLUSTER = False
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 _node_ip_address="127.0.0.1", namespace=NAMESPACE,
                 logging_level=logging.WARNING, **kwargs)
    return ray


def _models_of(specs: Sequence[ReplicaSpec], models: dict) -> dict:
    return {s.name: models[s.name] for s in specs if s.name in models}


class _RemoteHosts:
    """The `LocalHost` interface over host actors, for the coordinator: a host that fails is
    dead, and so are its replicas."""

    def __init__(self, handles: Sequence[Any], names: Sequence[Sequence[str]],
                 timeout_s: float = 60.0) -> None:
        self.handles = list(handles)
        self.names = [list(n) for n in names]
        self.timeout_s = timeout_s
        self.dead_hosts: set[int] = set()

    @property
    def dead(self) -> set[str]:
        return {n for i in self.dead_hosts for n in self.names[i]}

    def _call(self, method: str, args_for: Callable[[int], tuple | None]) -> dict[int, Any]:
        import ray

        refs = {}
        for i, h in enumerate(self.handles):
            if i in self.dead_hosts:
                continue
            args = args_for(i)
            if args is None:
                continue
            refs[i] = getattr(h, method).remote(*args)
        out = {}
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref, timeout=self.timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                self.dead_hosts.add(i)
        return out

    def reports(self) -> dict[str, Any]:
        got = self._call("reports", lambda i: ())
        out: dict[str, Any] = {}
        for part in got.values():
            out.update(part)
        return out

    def grant(self, leases: Sequence[Any]) -> dict[str, bool]:
        where = {n: i for i, names in enumerate(self.names) for n in names}
        per: dict[int, list] = {}
        for ls in leases:
            per.setdefault(where[ls.replica], []).append(ls)
        got = self._call("grant", lambda i: (per[i],) if i in per else None)
        out: dict[str, bool] = {}
        for part in got.values():
            out.update(part)
        return out


class _CoordinatorActor:
    """The coordinator as a Ray actor (constructed again, with the same arguments, on
    restart: its state then comes from the agents' reports)."""

    def __init__(self, site: Any, specs: Sequence[ReplicaSpec], envelopes: dict, models: dict,
                 host_handles: Sequence[Any], host_names: Sequence[Sequence[str]]) -> None:
        self.hosts = _RemoteHosts(host_handles, host_names)
        self.coord = Coordinator(site=site, specs=specs, budget=site_schedule(site),
                                 envelopes=envelopes, models=models, epoch=0)

    def tick(self, t_s: float, dead: set[str]) -> tuple[TickResult, dict[str, HeldShare], set[str]]:
        dead = set(dead) | self.hosts.dead
        tr = self.coord.tick(t_s, self.hosts, dead=dead)
        return tr, dict(self.coord.held), self.hosts.dead

    def allocation_times(self) -> list[float]:
        return list(self.coord.alloc_times_s)

    def ping(self) -> int:
        return self.coord.epoch


class RayEngine:
    """Agents in host actors and the coordinator in a detached actor (see the module doc);
    the interface of `palsctl.cluster.local_engine.LocalEngine`."""

    def __init__(self, fleet: Any, specs: Sequence[ReplicaSpec], envelopes: dict, models: dict,
                 budget: Callable[[float], float], *, n_steps: int, keep_records: bool = True,
                 address: str | None = None, hosts: int | None = None) -> None:
        ray = _import_ray()
        self._started = False
        if not ray.is_initialized():
            if address is None:
                init_ray_loopback()
            else:
                ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
            self._started = True
        self.ray = ray
        self.specs = list(specs)
        self.n_steps = n_steps
        self._alloc_prev: list[float] = []
        res = ray.cluster_resources()
        gpus_needed = sum(s.num_gpus for s in specs)
        host_cls = ray.remote(LocalHost)
        groups: list[list[ReplicaSpec]]
        if res.get("GPU", 0) >= gpus_needed:
            # one host per replica, pinned to its GPUs' node
            groups = [[s] for s in specs]
            self.handles = [host_cls.options(num_cpus=0, num_gpus=s.num_gpus, max_restarts=0)
                            .remote([s], n_steps=n_steps, keep_record=keep_records,
                                    models=_models_of([s], models))
                            for s in specs]
        else:
            n = hosts or max(1, int(res.get("CPU", 1)))
            n = max(1, min(n, len(specs)))
            groups = [list(specs[i::n]) for i in range(n)]
            self.handles = [host_cls.options(num_cpus=0, max_restarts=0)
                            .remote(g, n_steps=n_steps, keep_record=keep_records,
                                    models=_models_of(g, models))
                            for g in groups]
        self.names = [[s.name for s in g] for g in groups]
        self.where = {n: i for i, names in enumerate(self.names) for n in names}
        self.remote = _RemoteHosts(self.handles, self.names)
        # wait for the hosts to be built (plants, controllers, models)
        self.remote._call("names", lambda i: ())
        self.coord_name = f"palsctl-fleet-{fleet.name}-{uuid.uuid4().hex[:8]}"
        coord_cls = ray.remote(_CoordinatorActor)
        self.coord = coord_cls.options(name=self.coord_name, namespace=NAMESPACE,
                                       lifetime="detached", max_restarts=-1,
                                       max_task_retries=0, num_cpus=0).remote(
            fleet.site, self.specs, envelopes, models, self.handles, self.names)
        self._held: dict[str, HeldShare] = {}
        self.tick_failures = 0

    def host_nodes(self) -> dict[str, str]:
        """The Ray node id each replica's host runs on."""
        ray = self.ray
        ids = ray.get([h.__ray_call__.remote(
            lambda self: __import__("ray").get_runtime_context().get_node_id())
            for h in self.handles], timeout=60)
        return {n: ids[i] for n, i in self.where.items()}

    # -- the engine interface ------------------------------------------------------------------
    def tick(self, t_s: float, *, dead: set[str]) -> TickResult | None:
        """Run the coordinator actor's tick at fleet time t_s (s); None when it is down."""
        ray = self.ray
        try:
            tr, held, dead_remote = ray.get(self.coord.tick.remote(t_s, set(dead)), timeout=120)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            self.tick_failures += 1
            return None
        self._held = held
        self.remote.dead_hosts |= {self.where[n] for n in dead_remote}
        return tr

    def committed_w(self, t_s: float) -> float:
        """Power committed to the replicas' leases at t_s (s), W."""
        return sum(h.at(t_s) for h in self._held.values())

    def dead(self) -> set[str]:
        """Names of the replicas whose host actor is gone."""
        return self.remote.dead

    def push(self, assignments: dict) -> None:
        """Hand each replica's host actor the requests routed to it."""
        per: dict[int, dict] = {}
        for name, reqs in assignments.items():
            if reqs:
                per.setdefault(self.where[name], {})[name] = reqs
        for i, sub in per.items():
            if i not in self.remote.dead_hosts:
                self.handles[i].push.remote(sub)   # ordered before the next run_until

    def run_until(self, k_end: int) -> None:
        """Step every live replica's loop up to step k_end."""
        self.remote._call("run_until", lambda i: (k_end,))

    def kill(self, name: str) -> None:
        """Kill a replica's host actor (fault injection)."""
        i = self.where[name]
        if i not in self.remote.dead_hosts:
            try:
                self.ray.get(self.handles[i].kill.remote(name), timeout=60)
            except self.ray.exceptions.RayActorError:
                self.remote.dead_hosts.add(i)

    def restart_coordinator(self) -> None:
        """Kill the coordinator actor; Ray restarts it and it rebuilds from the reports."""
        try:
            self._alloc_prev.extend(self.ray.get(self.coord.allocation_times.remote(),
                                                 timeout=60))
        except self.ray.exceptions.RayActorError:
            pass
        self.ray.kill(self.coord, no_restart=False)

    def allocation_times(self) -> list[float]:
        """Seconds each allocation took."""
        try:
            return self._alloc_prev + self.ray.get(self.coord.allocation_times.remote(),
                                                   timeout=60)
        except self.ray.exceptions.RayActorError:
            return self._alloc_prev

    def finish(self) -> list[ReplicaResult]:
        """Stop the replicas and collect their results."""
        got = self.remote._call("finish", lambda i: ())
        by: dict[str, ReplicaResult] = {}
        for part in got.values():
            for r in part:
                by[r.name] = r
        out = []
        import numpy as np

        for s in self.specs:
            r = by.get(s.name)
            if r is None:   # its data died with its host
                nan = np.full(self.n_steps, np.nan)
                r = ReplicaResult(name=s.name, pool=s.pool, summary={}, power_w=nan,
                                  share_w=nan, caps_w=nan, throughput_tok_s=nan, alive=False)
            out.append(r)
        return out

    def close(self) -> None:
        """Kill the actors the engine started."""
        ray = self.ray
        for h in [self.coord, *self.handles]:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self._started:
            ray.shutdown()
