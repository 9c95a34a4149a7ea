"""Real replicas under a site budget, on the wall clock: one agent per serving deployment
(power from NVML or the emulator, metrics from vLLM's ``/metrics``, batch through the gateway or
the scheduler plugin — the ``[serving]`` table of ``palsctl control``), each in a Ray actor, and
the coordinator in a named detached Ray actor with the same lease protocol as in simulation.

>>> from palsctl.cluster.real import run_real_fleet   # doctest: +SKIP
>>> out = run_real_fleet(site, {"a": serving_a, "b": serving_b}, duration_s=600.0)  # doctest: +SKIP

Fleet time is wall time since the start; leases expire in it. Every agent restores its GPUs'
settings (cap and batch limit) when it stops.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from palsctl.cluster.runtime import Agent, ReplicaSpec, site_schedule

__all__ = ["ServingAgentHost", "run_real_fleet"]


class ServingAgentHost:
    """One real replica's agent (a Ray actor in `run_real_fleet`): builds the serving plant
    from a validated ``[serving]`` table (`palsctl.experiment.serving.parse_serving`), runs its
    closed loop every ``dt_s`` on the wall clock in a thread, and answers the coordinator
    (``reports``/``grant``) meanwhile."""

    def __init__(self, name: str, serving: dict[str, Any], *, controller: str = "search",
                 controller_params: dict[str, Any] | None = None, dt_s: float = 1.0,
                 duration_s: float = 60.0, tracking: bool = False,
                 base: Callable[[float], Any] | None = None) -> None:
        from palsctl.experiment.serving import build_serving_plant
        from palsctl.loop import ClosedLoop
        from palsctl.registry import make_controller

        self.plant = build_serving_plant(serving, dt_s=dt_s)
        lim = self.plant.limits
        n = lim.num_gpus
        self.spec = ReplicaSpec(
            name=name, pool=name, pool_index=0, index=0, seed=0, experiment=None, num_gpus=n,
            min_w=lim.power_cap_min_w * n, max_w=lim.power_cap_max_w * n,
            safe_w=lim.power_cap_min_w * n, target_tok_s=None, rate_req_s=0.0,
            mean_prompt_tokens=float(serving.get("prompt_tokens_mean") or 512.0),
            mean_output_tokens=float(serving.get("output_tokens_mean") or 256.0),
            tracking=tracking)
        ctl = make_controller(controller, **(controller_params or {}))
        self.n_steps = max(1, math.ceil(duration_s / dt_s))
        self.dt_s = float(dt_s)

        def build_loop(agent: Agent):
            if base is not None:
                agent.set_base_schedule(base)
            return ClosedLoop(self.plant, ctl, schedule=agent.setpoint)

        self.agent = Agent(self.spec, n_steps=self.n_steps, build_loop=build_loop)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: str | None = None

    def replica_spec(self) -> ReplicaSpec:
        """The replica this host serves."""
        return self.spec

    def start(self, t0_wall: float) -> None:
        """Step the loop at ``t0_wall + k·dt_s`` (``time.time()`` clock) until the end."""
        def run() -> None:
            try:
                for k in range(self.n_steps):
                    wait = t0_wall + (k + 1) * self.dt_s - time.time()
                    if wait > 0 and self._stop.wait(wait):
                        return
                    if self._stop.is_set():
                        return
                    self.agent.run_until(k + 1)
            except Exception as exc:  # noqa: BLE001 - reported by stop()
                self.error = f"{type(exc).__name__}: {exc}"

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def reports(self) -> dict[str, Any]:
        """The replica's latest report, by name."""
        return {self.spec.name: self.agent.report()}

    def grant(self, leases) -> dict[str, bool]:
        """Offer the leases for this replica; whether each was accepted, by name."""
        return {ls.replica: self.agent.grant(ls) for ls in leases if ls.replica == self.spec.name}

    def cap_w(self) -> float | None:
        """The cap per GPU the device enforces now."""
        m = self.agent._last_m
        return None if m is None else m.power_cap_w

    def stop(self) -> dict[str, Any]:
        """Stop the loop, restore the device's settings, return the replica's summary and
        its per-step shares and sums of caps."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        res = self.agent.finish()   # closes the plant: restores cap and batch limit
        return {"summary": res.summary, "share_w": res.share_w.tolist(),
                "caps_w": res.caps_w.tolist(), "power_w": res.power_w.tolist(),
                "steps": int(self.agent.loop.k), "error": self.error}


def run_real_fleet(site: Any, servings: dict[str, dict[str, Any]], *, duration_s: float,
                   dt_s: float = 1.0, controller: str = "search",
                   controller_params: dict[str, Any] | None = None,
                   address: str | None = None,
                   on_tick: Callable[[float, Any], None] | None = None) -> dict[str, Any]:
    """Run real replicas (``servings``: name → validated ``[serving]`` table) under ``site``
    (a `palsctl.cluster.schema.SiteConfig`) for ``duration_s`` wall seconds: agents in Ray
    actors, the coordinator a named detached Ray actor; ticks every ``site.period_s`` and at
    once when the budget drops below what is committed. Returns the ticks and each replica's
    results. ``on_tick(t_s, handles)`` is called after each tick (tests)."""
    from palsctl.cluster.ray_engine import (
        NAMESPACE,
        _CoordinatorActor,
        _import_ray,
        init_ray_loopback,
    )

    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        if address is None:
            init_ray_loopback()
        else:
            ray.init(address=address, namespace=NAMESPACE)
        started = True
    host_cls = ray.remote(ServingAgentHost)
    names = list(servings)
    hosts = [host_cls.options(num_cpus=0, max_concurrency=4).remote(
        n, servings[n], controller=controller, controller_params=controller_params,
        dt_s=dt_s, duration_s=duration_s, tracking=site.tracking) for n in names]
    coord = None
    try:
        specs = ray.get([h.replica_spec.remote() for h in hosts], timeout=120)
        budget = site_schedule(site)
        coord = ray.remote(_CoordinatorActor).options(
            name=f"palsctl-fleet-real-{int(time.time() * 1e3) % 10**9}", namespace=NAMESPACE,
            lifetime="detached", max_restarts=-1, max_task_retries=0, num_cpus=0).remote(
            site, specs, {}, {}, hosts, [[n] for n in names])
        t0 = time.time() + 0.5
        committed: dict[str, Any] = {}
        ticks: list[dict[str, Any]] = []

        def tick(t_s: float) -> None:
            nonlocal committed
            tr, held, _dead = ray.get(coord.tick.remote(t_s, set()), timeout=60)
            committed = held
            ticks.append({"t_s": t_s, "budget_w": tr.budget_w, "committed_w": tr.committed_w,
                          "shares_w": dict(tr.shares_w), "epoch": tr.epoch})
            if on_tick is not None:
                on_tick(t_s, hosts)

        tick(0.0)   # first leases before the first decision
        ray.get([h.start.remote(t0) for h in hosts], timeout=60)
        n = max(1, math.ceil(duration_s / dt_s))
        next_tick = site.period_s
        for k in range(1, n):
            t = k * dt_s
            wait = t0 + t - 0.25 * dt_s - time.time()   # tick before the decision at t
            if wait > 0:
                time.sleep(wait)
            held_now = sum(h.at(t) for h in committed.values())
            if t >= next_tick - 1e-9 or (not site.tracking and budget(t) < held_now - 1e-6):
                tick(t)
                next_tick = t + site.period_s
        wait = t0 + n * dt_s - time.time()
        if wait > 0:
            time.sleep(wait)
        results = dict(zip(names, ray.get([h.stop.remote() for h in hosts], timeout=120)))
        return {"ticks": ticks, "replicas": results, "specs": {s.name: s for s in specs}}
    except BaseException:
        for h in hosts:   # restore the devices' settings before the actors go
            try:
                ray.get(h.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - the actor may be gone already
                pass
        raise
    finally:
        for h in [*hosts, *([coord] if coord is not None else [])]:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if started:
            ray.shutdown()
