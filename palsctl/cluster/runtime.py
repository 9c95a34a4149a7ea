"""The fleet runtime: agents (one closed loop per replica), the coordinator (site budget →
leases), the routers (one arrival stream per pool), and the driver that steps them together.

Engine-independent: the `local` engine calls these objects directly in one process; the `ray`
engine (`palsctl.cluster.ray_engine`) hosts agents in actors and the coordinator in a named
detached actor, and calls the very same methods.

**Time.** Agents step their `palsctl.loop.ClosedLoop` in lockstep, one control period
``dt_s`` per step; step ``k`` ends at ``t = (k+1)·dt_s`` and its controller decides with the
setpoint for ``t``. The coordinator *ticks* before the step whose decision is the first under
the new allocation: every ``period_s``, and at once when the site budget falls below the
watts committed (so a budget cut is in force from the very next decision).

**The lease protocol** (never over the site budget). A share is a `Lease`: watts, an expiry
time, the coordinator's epoch and a sequence number. The coordinator counts, for every
replica, the watts it may be using: its last acknowledged lease until that lease expires —
then the safe share an agent falls back to, or nothing for a replica known dead. A tick
(1) gathers the agents' reports (a restarted coordinator rebuilds its counts from the leases
they report, in a new epoch), (2) allocates the budget minus the watts held by replicas it
cannot reach, (3) sends the *cuts* and waits for their acknowledgements — an unacknowledged cut
keeps counting at the old share —, then (4) sends the *raises*, scaled down so that the count
stays within the budget; a raise counts in full even when its acknowledgement is lost. An agent
that hears from no coordinator keeps its share until the lease ends, then falls back to
``min(share, safe_w)``; it accepts a lease only from an epoch at least its own, with a newer
sequence number.
"""
from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from palsctl.cluster.allocate import Envelope, Replica, allocate
from palsctl.cluster.schema import replica_names
from palsctl.errors import ConfigError
from palsctl.types import Action, Request, Setpoint

__all__ = ["Lease", "AgentReport", "ReplicaSpec", "Agent", "LocalHost", "Coordinator",
           "Router", "RoutedWorkload", "ReplicaResult", "FleetResult", "FaultPlan",
           "build_replica_specs", "build_agent", "run_fleet", "ENGINES"]

ENGINES = ("local", "ray")
_EPS_W = 1e-6


# ---- messages --------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class Lease:
    """A share of the site budget granted to a replica.

    Parameters
    ----------
    replica : str
        The replica's name.
    share_w : float
        Its share, W (all its GPUs).
    expires_s : float
        Fleet time the lease is valid until, s.
    epoch : int
        The coordinator's epoch that granted it.
    seq : int
        Sequence number within the epoch.
    """

    replica: str
    share_w: float
    expires_s: float
    epoch: int
    seq: int


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentReport:
    """What an agent tells the coordinator at a tick (means over the steps since its last
    report). ``share_w`` is the share in force now (after any lease expiry fallback);
    ``lease_*`` describe its last accepted lease; ``saturated`` is True when requests waited
    in every step of the window (then throughput measures capacity)."""

    replica: str
    t_s: float
    share_w: float
    lease_share_w: float
    lease_expires_s: float
    lease_epoch: int
    lease_seq: int
    power_w: float
    throughput_tok_s: float
    demand_tok_s: float
    running: int
    waiting: int
    power_cap_w: float | None
    max_batch: int | None
    saturated: bool
    steps: int


# ---- replicas --------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ReplicaSpec:
    """One replica of a pool, as built from the fleet config (picklable, sent to hosts)."""

    name: str
    pool: str
    pool_index: int
    index: int           # within the pool
    seed: int
    experiment: Any      # the pool's ExperimentConfig (setpoint resolved for this replica)
    num_gpus: int
    min_w: float
    max_w: float
    safe_w: float
    target_tok_s: float | None
    rate_req_s: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    tracking: bool


class RoutedWorkload:
    """A replica's share of its pool's arrival stream: the router pushes requests in, the
    replica's loop takes those arriving in each window (in time order)."""

    def __init__(self, rate_req_s: float, mean_prompt_tokens: float,
                 mean_output_tokens: float) -> None:
        self.rate_req_s = float(rate_req_s)
        self.mean_prompt_tokens = float(mean_prompt_tokens)
        self.mean_output_tokens = float(mean_output_tokens)
        self._q: deque[Request] = deque()

    @property
    def demand_tok_s(self) -> float:
        """Mean offered load in generated tokens per second (tok/s)."""
        return self.rate_req_s * self.mean_output_tokens

    def push(self, requests: Sequence[Request]) -> None:
        """Queue requests routed to this replica."""
        self._q.extend(requests)

    def requests_between(self, t0_s: float, t1_s: float) -> list[Request]:
        """Pop the queued requests arriving before t1_s (seconds since the start)."""
        q, out = self._q, []
        while q and q[0].arrival_s < t1_s:
            out.append(q.popleft())
        return out


class Agent:
    """One replica: its closed loop, its lease, its fallback. ``loop`` is a
    `palsctl.loop.ClosedLoop` whose schedule is this agent's `setpoint`."""

    def __init__(self, spec: ReplicaSpec, *, n_steps: int, build_loop: Callable[["Agent"], Any],
                 keep_record: bool = True) -> None:
        self.spec = spec
        self.name = spec.name
        self.alive = True
        self.lease = Lease(replica=spec.name, share_w=spec.safe_w, expires_s=0.0, epoch=-1,
                           seq=-1)
        self._base: Callable[[float], Setpoint] | None = None
        self.workload = RoutedWorkload(spec.rate_req_s, spec.mean_prompt_tokens,
                                       spec.mean_output_tokens)
        self.keep_record = keep_record
        self.power_w = np.full(n_steps, np.nan)
        self.throughput_tok_s = np.full(n_steps, np.nan)
        self.share_w = np.full(n_steps, np.nan)
        self.caps_w = np.full(n_steps, np.nan)
        self.loop = build_loop(self)
        self.dt_s = self.loop.dt_s
        self._n = 0        # steps since the last report
        self._acc = np.zeros(4)  # power, throughput, demand (tok·s), saturated steps
        self._last_m = None

    # the schedule the closed loop asks (fleet time = loop time)
    def set_base_schedule(self, base: Callable[[float], Setpoint]) -> None:
        """Set the replica's own setpoint schedule (its share caps the budget)."""
        self._base = base

    def share_at(self, t_s: float) -> float:
        """The share in force at ``t_s``: the lease's, or after it expired
        ``min(share, safe_w)``."""
        lease = self.lease
        if t_s < lease.expires_s:
            return lease.share_w
        return min(lease.share_w, self.spec.safe_w)

    def setpoint(self, t_s: float) -> Setpoint:
        """The setpoint at t_s (s): the schedule's, its budget (or target) the share."""
        sp = self._base(t_s) if self._base is not None else Setpoint()
        share = self.share_at(t_s)
        if self.spec.tracking:
            return replace(sp, power_target_w=share)
        return replace(sp, power_budget_w=share)

    def grant(self, lease: Lease) -> bool:
        """Accept ``lease`` when it is from this agent's epoch or a newer one with a newer
        sequence number; return whether it was accepted (the acknowledgement)."""
        if not self.alive:
            return False
        cur = self.lease
        if lease.epoch < cur.epoch or (lease.epoch == cur.epoch and lease.seq <= cur.seq):
            return False
        first = cur.epoch < 0
        self.lease = lease
        if first and self.loop.k == 0 and self.loop.simulated and not self.spec.tracking:
            # join capped at the share: the plant's launch cap may exceed it
            lim = self.loop.plant.limits
            cap = lim.clamp_cap_w(max(lim.per_gpu_w(lease.share_w), lim.power_cap_min_w))
            if cap < lim.power_cap_max_w:
                self.loop.plant.apply(Action(power_cap_w=cap))
        return True

    def run_until(self, k_end: int) -> None:
        """Step the loop until it has taken ``k_end`` steps."""
        if not self.alive:
            return
        loop, acc = self.loop, self._acc
        power, share, caps = self.power_w, self.share_w, self.caps_w
        thr = self.throughput_tok_s
        n_gpus = self.spec.num_gpus
        n = power.size
        field_ = "power_target_w" if self.spec.tracking else "power_budget_w"
        while loop.k < k_end:
            k = loop.k
            if k == 0:
                share[0] = self.share_at(0.0)
            rec = loop.step()
            m = rec.measurement
            power[k] = m.power_w
            thr[k] = m.throughput_tok_s
            # the share handed to the decision at the end of this step governs the next window
            if k + 1 < n:
                share[k + 1] = getattr(rec.setpoint, field_)
            c = m.power_cap_w   # the cap in force during this window
            caps[k] = c * n_gpus if c is not None else np.nan
            acc[0] += m.power_w
            acc[1] += m.throughput_tok_s
            acc[2] += m.demand_tok_s or 0.0
            acc[3] += m.waiting > 0
            self._n += 1
            self._last_m = m

    def report(self) -> AgentReport | None:
        """Means since the last report (None when dead)."""
        if not self.alive:
            return None
        n = max(self._n, 1)
        m = self._last_m
        t = self.loop.k * self.dt_s
        lease = self.lease
        rep = AgentReport(
            replica=self.name, t_s=t, share_w=self.share_at(t), lease_share_w=lease.share_w,
            lease_expires_s=lease.expires_s, lease_epoch=lease.epoch, lease_seq=lease.seq,
            power_w=float(self._acc[0] / n), throughput_tok_s=float(self._acc[1] / n),
            demand_tok_s=float(self._acc[2] / n),
            running=m.running if m is not None else 0, waiting=m.waiting if m is not None else 0,
            power_cap_w=m.power_cap_w if m is not None else None,
            max_batch=m.max_batch if m is not None else None,
            saturated=bool(self._n and self._acc[3] >= self._n), steps=self._n)
        self._n = 0
        self._acc[:] = 0.0
        return rep

    def kill(self) -> None:
        """The replica dies: it stops stepping, reporting and acknowledging."""
        self.alive = False

    def finish(self) -> "ReplicaResult":
        """Close the replica's plant and score its run."""
        from palsctl.metrics import summarize

        rec = self.loop.record
        summary = summarize(rec) if rec.steps else {}
        try:
            self.loop.plant.close()
        except Exception:  # noqa: BLE001 - a plant that fails to close must not lose results
            pass
        return ReplicaResult(name=self.name, pool=self.spec.pool, summary=summary,
                             power_w=self.power_w, share_w=self.share_w, caps_w=self.caps_w,
                             throughput_tok_s=self.throughput_tok_s,
                             record=rec if self.keep_record else None, alive=self.alive)


@dataclass(kw_only=True)
class ReplicaResult:
    """One replica's outcome: its summary (`palsctl.metrics.summarize`), per-step arrays
    (power, share in force, sum of caps, generated tokens/s; NaN after it died) and its record
    (when kept)."""

    name: str
    pool: str
    summary: dict[str, Any]
    power_w: np.ndarray
    share_w: np.ndarray
    caps_w: np.ndarray
    throughput_tok_s: np.ndarray | None = None
    record: Any = None
    alive: bool = True
    held_until: int | None = None   # dead: the step its last lease ended


def build_agent(spec: ReplicaSpec, *, n_steps: int, keep_record: bool = True,
                model: Any = None) -> Agent:
    """Build a replica's plant, controller and closed loop (runs where the agent lives).
    ``model``: the offline power-performance model already profiled for this replica (the
    one `palsctl.controllers.model_source.model_for` gives), handed to a model-based controller
    that names no model file, so that a host process does not profile it again."""
    from palsctl.experiment.build import build_controller, build_plant, build_schedule
    from palsctl.loop import ClosedLoop

    cfg = spec.experiment

    def build_loop(agent: Agent):
        plant = build_plant(cfg, seed=spec.seed)
        ctl = build_controller(cfg)
        if model is not None and ctl.needs_model and getattr(ctl, "model", None) is None \
                and not getattr(ctl.config, "model_path", None):
            ctl.model = model
        unguarded = not ctl.guarded and plant.info.simulated
        guard = cfg.guard if cfg.guard_enabled and not unguarded else False
        agent.set_base_schedule(build_schedule(cfg, agent.workload))
        return ClosedLoop(plant, ctl, schedule=agent.setpoint, workload=agent.workload,
                          guard=guard)

    return Agent(spec, n_steps=n_steps, build_loop=build_loop, keep_record=keep_record)


class LocalHost:
    """Agents in this process (the `local` engine; a `ray` host actor wraps one)."""

    def __init__(self, specs: Sequence[ReplicaSpec], *, n_steps: int, keep_record: bool = True,
                 models: dict[str, Any] | None = None):
        models = models or {}
        self.agents = {s.name: build_agent(s, n_steps=n_steps, keep_record=keep_record,
                                           model=models.get(s.name)) for s in specs}

    def names(self) -> list[str]:
        """Names of the replicas on this host."""
        return list(self.agents)

    def reports(self) -> dict[str, AgentReport | None]:
        """Each replica's report of the means since the last one (None when it is dead)."""
        return {n: a.report() for n, a in self.agents.items()}

    def grant(self, leases: Sequence[Lease]) -> dict[str, bool]:
        """Offer leases to their replicas; whether each was accepted, by name."""
        return {ls.replica: self.agents[ls.replica].grant(ls) for ls in leases
                if ls.replica in self.agents}

    def push(self, assignments: dict[str, list[Request]]) -> None:
        """Hand each replica the requests routed to it."""
        for name, reqs in assignments.items():
            a = self.agents.get(name)
            if a is not None and reqs:
                a.workload.push(reqs)

    def run_until(self, k_end: int) -> None:
        """Step every live replica's loop up to step k_end."""
        for a in self.agents.values():
            a.run_until(k_end)

    def kill(self, name: str) -> None:
        """Stop a replica (fault injection)."""
        self.agents[name].kill()

    def finish(self) -> list[ReplicaResult]:
        """Stop the replicas and collect their results."""
        return [a.finish() for a in self.agents.values()]


# ---- the coordinator ---------------------------------------------------------------------------
@dataclass
class HeldShare:
    share_w: float
    expires_s: float
    safe_w: float
    dead: bool = False

    def at(self, t_s: float) -> float:
        if t_s < self.expires_s:
            return self.share_w
        return 0.0 if self.dead else min(self.share_w, self.safe_w)


@dataclass
class _Model:
    """A replica's envelope with online corrections refitted from its measurements."""

    base: Envelope | None
    ppm: Any = None              # the PowerPerfModel behind the envelope (for corrections)
    thr_factor: float = 1.0
    pow_factor: float = 1.0
    envelope: Envelope | None = None
    demand_tok_s: float | None = None

    def __post_init__(self) -> None:
        self.envelope = self.base

    def update(self, rep: AgentReport, thr_pred: float | None, pow_pred: float | None, *,
               alpha: float = 0.3) -> None:
        """EWMA of measured ÷ predicted tokens/s (saturated windows) and power at the
        replica's operating point; the envelope is rescaled when a factor moves by > 1 %."""
        changed = False
        if thr_pred is not None and thr_pred > 0:
            r = min(max(rep.throughput_tok_s / thr_pred, 0.3), 3.0)
            new = (1 - alpha) * self.thr_factor + alpha * r
            changed |= abs(new - self.thr_factor) > 0.01 * self.thr_factor
            self.thr_factor = new
        if pow_pred is not None and pow_pred > 0:
            r = min(max(rep.power_w / pow_pred, 0.5), 2.0)
            new = (1 - alpha) * self.pow_factor + alpha * r
            changed |= abs(new - self.pow_factor) > 0.01 * self.pow_factor
            self.pow_factor = new
        if changed and self.base is not None:
            self.envelope = self.base.scaled(self.thr_factor, self.pow_factor)


def _refit(models: dict[str, _Model], reports: dict[str, AgentReport]) -> None:
    """Online corrections of every reporting replica's envelope: one vectorised prediction per
    distinct offline model."""
    import warnings

    groups: dict[int, list[str]] = {}
    for n, rep in reports.items():
        m = models[n]
        if m.base is None or m.ppm is None or rep.steps == 0 or rep.power_cap_w is None \
                or rep.max_batch is None:
            continue
        groups.setdefault(id(m.ppm), []).append(n)
    for names in groups.values():
        ppm = models[names[0]].ppm
        reps = [reports[n] for n in names]
        cap = np.array([r.power_cap_w for r in reps], dtype=float)
        batch = np.array([r.max_batch for r in reps], dtype=float)
        running = np.clip([r.running for r in reps], 1, batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            thr = ppm.predict(power_cap_w=cap, max_batch=batch).throughput_tok_s
            pw = ppm.predict(power_cap_w=cap, max_batch=running).power_w
        for i, (n, r) in enumerate(zip(names, reps)):
            models[n].update(
                r, float(thr[i]) if r.saturated and r.throughput_tok_s > 0 else None,
                float(pw[i]) if r.running > 0 and r.power_w > 0 else None)


@dataclass(kw_only=True)
class TickResult:
    """What a tick did: the reports it gathered, the shares granted, the allocation time."""

    t_s: float
    reports: dict[str, AgentReport]
    shares_w: dict[str, float]
    committed_w: float
    budget_w: float
    allocation_s: float
    epoch: int


class Coordinator:
    """Splits the site budget (or power target) among replicas with the lease protocol (see
    the module doc). ``hosts``: objects with ``reports()``, ``grant(leases)`` (the `LocalHost`
    interface); ``envelopes``/``models``: per replica, for ``marginal`` and the router."""

    def __init__(self, *, site: Any, specs: Sequence[ReplicaSpec], budget: Callable[[float], float],
                 envelopes: dict[str, Envelope | None] | None = None,
                 models: dict[str, Any] | None = None, epoch: int = 0) -> None:
        self.site = site
        self.specs = {s.name: s for s in specs}
        self.budget = budget
        envelopes = envelopes or {}
        models = models or {}
        self.models = {s.name: _Model(envelopes.get(s.name), models.get(s.name)) for s in specs}
        self.epoch = epoch
        self.seq = 0
        self.held: dict[str, HeldShare] = {}
        self.rebuilt = False
        self.alloc_times_s: list[float] = []

    # -- accounting ----------------------------------------------------------------------------
    def committed_w(self, t_s: float) -> float:
        """Watts the replicas may be using at ``t_s`` by the coordinator's count."""
        return sum(h.at(t_s) for h in self.held.values())

    def _rebuild(self, t_s: float, reports: dict[str, AgentReport]) -> None:
        """A (re)started coordinator: the counts from the leases the agents report; a replica
        that does not answer may hold up to its maximum for one lease from now."""
        for name, rep in reports.items():
            self.epoch = max(self.epoch, rep.lease_epoch + 1)
            self.held[name] = HeldShare(rep.lease_share_w, rep.lease_expires_s,
                                    self.specs[name].safe_w)
        for name, spec in self.specs.items():
            self.held.setdefault(name, HeldShare(spec.max_w, t_s + self.site.lease_s, spec.safe_w))
        self.rebuilt = True

    # -- one tick ------------------------------------------------------------------------------
    def tick(self, t_s: float, hosts: Any, *,
             dead: set[str] | frozenset[str] = frozenset()) -> TickResult:
        """Collect reports, allocate the site budget and grant leases at t_s (s)."""
        reports: dict[str, AgentReport] = {}
        for name, rep in hosts.reports().items():
            if rep is not None:
                reports[name] = rep
        if not self.rebuilt:
            self._rebuild(t_s, reports)
        for name in dead:
            if name in self.held:
                self.held[name].dead = True
        alive = [n for n in self.specs if n in reports]
        _refit(self.models, reports)
        for n in alive:
            self.held[n].dead = False

        site = self.site
        budget = float(self.budget(t_s))
        away = sum(self.held[n].at(t_s) for n in self.specs if n not in reports)
        reps = []
        for n in alive:
            spec, mod, rep = self.specs[n], self.models[n], reports[n]
            demand = _demand(spec, rep)
            reps.append(Replica(name=n, min_w=spec.min_w, max_w=spec.max_w,
                                envelope=mod.envelope, demand_tok_s=demand))
        c0 = time.perf_counter()
        policy = site.policy
        if policy == "marginal" and any(r.envelope is None for r in reps):
            policy = "proportional"
        alloc = allocate(reps, max(0.0, budget - away), policy=policy,
                         reserve_w=site.reserve_w)
        dt_alloc = time.perf_counter() - c0
        self.alloc_times_s.append(dt_alloc)
        new = dict(zip(alive, alloc.shares_w))
        expires = t_s + site.lease_s

        # phase 1: cuts, acknowledged before any raise
        cuts = [n for n in alive if new[n] < self.held[n].at(t_s) - _EPS_W]
        if cuts:
            leases = [self._lease(n, new[n], expires) for n in cuts]
            acks = hosts.grant(leases)
            for ls in leases:
                if acks.get(ls.replica):
                    self.held[ls.replica] = HeldShare(ls.share_w, ls.expires_s,
                                                  self.specs[ls.replica].safe_w)
        # phase 2: raises (and renewals) within what the budget leaves
        raises = [n for n in alive if n not in cuts]
        if raises:
            held_now = {n: self.held[n].at(t_s) for n in self.specs}
            room = budget - sum(held_now.values())
            deltas = {n: max(0.0, new[n] - held_now[n]) for n in raises}
            want = sum(deltas.values())
            scale = 1.0 if want <= max(room, 0.0) + _EPS_W else max(room, 0.0) / want
            leases = [self._lease(n, held_now[n] + deltas[n] * scale if deltas[n] > 0
                                  else new[n], expires) for n in raises]
            for ls in leases:   # counted before sending: a lost acknowledgement is no excuse
                prev = self.held[ls.replica].at(t_s)
                self.held[ls.replica] = HeldShare(max(ls.share_w, prev), ls.expires_s,
                                              self.specs[ls.replica].safe_w)
            acks = hosts.grant(leases)
            for ls in leases:
                if acks.get(ls.replica):
                    self.held[ls.replica] = HeldShare(ls.share_w, ls.expires_s,
                                                  self.specs[ls.replica].safe_w)
            new.update({ls.replica: ls.share_w for ls in leases})
        return TickResult(t_s=t_s, reports=reports, shares_w=new,
                          committed_w=self.committed_w(t_s), budget_w=budget,
                          allocation_s=dt_alloc, epoch=self.epoch)

    def _lease(self, name: str, share_w: float, expires_s: float) -> Lease:
        self.seq += 1
        return Lease(replica=name, share_w=float(share_w), expires_s=float(expires_s),
                     epoch=self.epoch, seq=self.seq)

    def envelope(self, name: str) -> Envelope | None:
        """The replica's envelope with the online corrections (None: no model)."""
        return self.models[name].envelope


def _demand(spec: ReplicaSpec, rep: AgentReport) -> float | None:
    """Demand = max(target, measured arrivals, backlog to drain within a period)."""
    vals = [rep.demand_tok_s]
    if spec.target_tok_s is not None:
        vals.append(spec.target_tok_s)
    if rep.waiting > 0:
        vals.append(rep.throughput_tok_s + rep.waiting * spec.mean_output_tokens / 30.0)
    return max(vals)


# ---- routing -----------------------------------------------------------------------------------
class Router:
    """Spreads one pool's arrivals over its replicas.

    Parameters
    ----------
    policy : {"round-robin", "jsq", "power-aware"}
        ``round-robin``; ``jsq`` (join the shortest queue: running + waiting at the last report
        plus what was sent since); ``power-aware`` (the same queue divided by the tokens/s the
        replica's share buys on its envelope: replicas with headroom and better tokens/J get more
        when the budget binds).
    names : sequence of str
        The pool's replicas.
    """

    def __init__(self, policy: str, names: Sequence[str]) -> None:
        if policy not in ("round-robin", "jsq", "power-aware"):
            raise ConfigError(f"unknown router {policy!r}", key="router", value=policy)
        self.policy = policy
        self.names = list(names)
        self._rr = 0

    def route(self, requests: Sequence[Request], *, alive: Sequence[bool],
              queues: Sequence[float], capacity_tok_s: Sequence[float] | None = None
              ) -> dict[str, list[Request]]:
        """Assign requests to live replicas (by the router's policy)."""
        out: dict[str, list[Request]] = {n: [] for n in self.names}
        idx = [i for i, a in enumerate(alive) if a]
        if not idx or not requests:
            return out
        if self.policy == "round-robin":
            m = len(idx)
            for r in requests:
                out[self.names[idx[self._rr % m]]].append(r)
                self._rr += 1
            return out
        if self.policy == "power-aware" and capacity_tok_s is not None:
            w = [max(float(capacity_tok_s[i]), 1e-6) for i in idx]
            top = max(w)
            w = [x / top for x in w]
        else:
            w = [1.0] * len(idx)
        # rotate tie-breaking so that equal replicas share evenly across calls
        m = len(idx)
        heap = [((queues[i] + 1.0) / w[j], (j - self._rr) % m, j) for j, i in enumerate(idx)]
        heapq.heapify(heap)
        q = [float(queues[i]) for i in idx]
        for r in requests:
            _, tie, j = heapq.heappop(heap)
            out[self.names[idx[j]]].append(r)
            q[j] += 1.0
            heapq.heappush(heap, ((q[j] + 1.0) / w[j], tie, j))
        self._rr += 1
        return out


# ---- faults (tests and what-if runs) -----------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class FaultPlan:
    """Faults injected at fleet times.

    Parameters
    ----------
    kill_replicas : dict of str to float
        Replica name -> when it dies, s.
    restart_coordinator_s : tuple of float
        When the coordinator loses its state, s.
    coordinator_down : tuple of (float, float)
        ``(t0_s, t1_s)`` intervals when no tick reaches the agents, s.
    on_segment : callable, optional
        ``on_segment(t_s, engine)`` before each stretch of steps (outside faults: a node removed
        from a Ray cluster, ...).
    """

    kill_replicas: dict[str, float] = field(default_factory=dict)
    restart_coordinator_s: tuple[float, ...] = ()
    coordinator_down: tuple[tuple[float, float], ...] = ()
    on_segment: Callable[[float, Any], None] | None = None

    def down(self, t_s: float) -> bool:
        """Whether the coordinator is down at t_s (s) in the fault plan."""
        return any(a <= t_s < b for a, b in self.coordinator_down)


# ---- building the fleet ------------------------------------------------------------------------
def _replica_capacity_tok_s(cfg: Any, prompt: float, output: float) -> float:
    from palsctl.experiment import full_power_capacity_req_s

    return full_power_capacity_req_s(cfg, prompt, output) * output


def build_pool_workload(fleet: Any, pool: Any, pool_index: int):
    """The pool's arrival stream (``load`` relative to the pool's full-power capacity)."""
    from palsctl.experiment import build_workload

    cfg = pool.experiment
    w = dict(cfg.workload)
    if w.get("load") is not None:
        w["load"] = w["load"] * pool.replicas
    return build_workload(cfg.with_overrides(workload=w),
                          seed=fleet.seed * 1000 + pool_index)


def build_replica_specs(fleet: Any) -> tuple[list[ReplicaSpec], list[Any]]:
    """Every replica's spec and every pool's workload."""
    from palsctl.plants.sim import get_gpu

    specs: list[ReplicaSpec] = []
    workloads = []
    for pi, pool in enumerate(fleet.pools):
        cfg = pool.experiment
        wl = build_pool_workload(fleet, pool, pi)
        workloads.append(wl)
        prompt = wl.mean_prompt_tokens if wl is not None else 512.0
        output = wl.mean_output_tokens if wl is not None else 256.0
        setpoint = dict(cfg.setpoint)
        target = None
        if pool.throughput_frac is not None:
            target = pool.throughput_frac * _replica_capacity_tok_s(cfg, prompt, output)
            setpoint["throughput_tok_s"] = target
        elif isinstance(setpoint.get("throughput_tok_s"), float):
            target = setpoint["throughput_tok_s"]
        rcfg = cfg.with_overrides(setpoint=setpoint)
        n_gpus = int(cfg.plant.get("num_gpus", 1))
        if cfg.plant.get("kind", "sim") == "sim":
            g = get_gpu(cfg.plant["gpu"])
            cap_min, cap_max = g.min_cap_w, g.tdp_w
        else:  # pragma: no cover - other simulated plants: their limits once built
            from palsctl.experiment import build_plant

            p = build_plant(cfg)
            cap_min, cap_max = p.limits.power_cap_min_w, p.limits.power_cap_max_w
            p.close()
        rate = (wl.rate_req_s / pool.replicas) if wl is not None else 0.0
        for i, name in enumerate(replica_names(pool.name, pool.replicas)):
            specs.append(ReplicaSpec(
                name=name, pool=pool.name, pool_index=pi, index=i,
                seed=fleet.seed * 100_003 + len(specs), experiment=rcfg, num_gpus=n_gpus,
                min_w=cap_min * n_gpus, max_w=cap_max * n_gpus, safe_w=cap_min * n_gpus,
                target_tok_s=target, rate_req_s=rate, mean_prompt_tokens=prompt,
                mean_output_tokens=output, tracking=fleet.site.tracking))
    return specs, workloads


def build_models(specs: Sequence[ReplicaSpec]) -> tuple[dict[str, Envelope], dict[str, Any]]:
    """Per replica: the offline power-performance model of its plant (profiled on the
    simulator's presets, memoised per plant and lengths) and its concave envelope."""
    from palsctl.cluster.allocate import envelope_from_model
    from palsctl.controllers.model_source import model_for
    from palsctl.plants.sim import get_gpu
    from palsctl.types import PlantInfo

    envs: dict[str, Envelope] = {}
    models: dict[str, Any] = {}
    cache: dict[tuple, tuple] = {}
    for s in specs:
        p = s.experiment.plant
        key = (p["model"], p["gpu"], s.num_gpus, round(s.mean_prompt_tokens),
               round(s.mean_output_tokens), p["max_batch_launch"],
               s.experiment.setpoint.get("tpot_slo_s"))
        if key not in cache:
            info = PlantInfo(model=p["model"], gpu=p["gpu"], num_gpus=s.num_gpus, simulated=True,
                             prompt_tokens_mean=s.mean_prompt_tokens,
                             output_tokens_mean=s.mean_output_tokens)
            ppm = model_for(info)
            g = get_gpu(p["gpu"])
            slo = s.experiment.setpoint.get("tpot_slo_s")
            env = envelope_from_model(ppm, num_gpus=s.num_gpus, power_cap_min_w=g.min_cap_w,
                                      power_cap_max_w=g.tdp_w, max_batch=p["max_batch_launch"],
                                      tpot_slo_s=slo if isinstance(slo, float) else None)
            cache[key] = (env, ppm)
        envs[s.name], models[s.name] = cache[key]
    return envs, models


def site_schedule(site: Any) -> Callable[[float], float]:
    """The site budget (or target) as ``t_s -> watts``."""
    from palsctl.workloads.budgets import Constant

    spec = site.power_target_w if site.tracking else site.power_budget_w
    # a validated schedule spec holds the schedule it built (palsctl.experiment.schema)
    return Constant(spec) if isinstance(spec, float) else spec.schedule


# ---- results -----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class FleetResult:
    """A fleet run: per-replica results, the site timeline and the tick log.

    Parameters
    ----------
    name, policy, engine : str
        The fleet, its allocation policy and the engine it ran on.
    dt_s : float
        Control period, s.
    tracking : bool
        The site tracks a power target (else it holds a budget).
    t_s : numpy.ndarray
        End of each step, s.
    budget_w : numpy.ndarray
        Site budget (or target) in force during each step, W.
    power_w : numpy.ndarray
        Site power per step, W.
    shares_w : numpy.ndarray
        Sum of the granted shares per step, W.
    caps_w : numpy.ndarray
        Sum of the caps in force (cap × GPUs over the replicas) per step, W.
    throughput_tok_s : numpy.ndarray
        Site generated tokens/s per step, tok/s.
    replicas : list of ReplicaResult
        Each replica's result.
    pools : dict of str to list of str
        Pool -> its replicas' names.
    ticks : list of dict
        The coordinator's tick log.
    allocation_s : list of float
        Time each allocation took, s.
    wall_s : float
        Wall-clock time of the run, s.
    meta : dict
        Settings and counts of the run.
    """

    name: str
    policy: str
    engine: str
    dt_s: float
    tracking: bool
    t_s: np.ndarray
    budget_w: np.ndarray
    power_w: np.ndarray
    shares_w: np.ndarray
    caps_w: np.ndarray
    throughput_tok_s: np.ndarray
    replicas: list[ReplicaResult]
    pools: dict[str, list[str]]
    ticks: list[dict[str, Any]]
    allocation_s: list[float]
    wall_s: float
    meta: dict[str, Any] = field(default_factory=dict)

    def pool_power_w(self) -> dict[str, np.ndarray]:
        """Each pool's measured power per step, W (a dead replica's last value holds until its
        lease ends)."""
        out = {}
        by = {r.name: r for r in self.replicas}
        for pool, names in self.pools.items():
            out[pool] = np.sum([_ffill(by[n].power_w, by[n].held_until)
                                for n in names], axis=0)
        return out


def _ffill(a: np.ndarray, until: int | None = None) -> np.ndarray:
    """A dead replica's series (NaN after it died): its last value holds until step ``until``
    (the end of its last lease: its GPUs keep their cap, its watts stay reserved), then 0
    (its watts are reused; nothing measures it any more)."""
    a = np.array(a, dtype=float)
    ok = np.isfinite(a)
    if ok.all() or not ok.any():
        return np.nan_to_num(a)
    idx = np.where(ok, np.arange(a.size), 0)
    np.maximum.accumulate(idx, out=idx)
    out = a[idx]
    out[: int(np.argmax(ok))] = 0.0
    if until is not None:
        last = int(np.flatnonzero(ok)[-1])
        out[max(until, last + 1):] = 0.0
    return out


# ---- the driver --------------------------------------------------------------------------------
def run_fleet(fleet: Any, *, engine: str = "local", faults: FaultPlan | None = None,
              keep_records: bool = True, progress: Callable[[int, int], None] | None = None,
              ray_address: str | None = None, hosts: int | None = None) -> FleetResult:
    """Run a validated fleet to its end.

    Score the result with `palsctl.cluster.summarize_fleet`.

    Parameters
    ----------
    fleet : FleetConfig
        The fleet (`palsctl.cluster.load_fleet`).
    engine : {"local", "ray"}
        In-process and deterministic, or Ray actors.
    faults : FaultPlan or None
        Failures to inject.
    keep_records : bool, default True
        Keep every replica's `RunRecord` (for its steps.csv).
    progress : callable, optional
        ``progress(done_steps, total_steps)``.
    ray_address : str or None
        Join an existing Ray cluster (None: a local Ray bound to 127.0.0.1).
    hosts : int or None
        Agent host actors of the ``ray`` engine (default: one per CPU Ray sees, at most one per
        replica).

    Returns
    -------
    FleetResult
        The replicas' results and the site timeline.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine; known: {', '.join(ENGINES)}", key="--engine",
                          value=engine)
    faults = faults or FaultPlan()
    wall0 = time.perf_counter()
    specs, workloads = build_replica_specs(fleet)
    names = [s.name for s in specs]
    for n in faults.kill_replicas:
        if n not in names:
            raise ConfigError(f"unknown replica; known: {', '.join(names)}", key="faults",
                              value=n)
    envs, models = build_models(specs) if _needs_models(fleet) else ({}, {})
    dt = fleet.dt_s
    n_steps = max(1, round(fleet.duration_s / dt))
    steps_per_period = max(1, round(fleet.site.period_s / dt))
    budget = site_schedule(fleet.site)
    if engine == "local":
        from palsctl.cluster.local_engine import LocalEngine

        eng: LocalEngine | RayEngine = LocalEngine(fleet, specs, envs, models, budget,
                                                   n_steps=n_steps, keep_records=keep_records)
    else:
        from palsctl.cluster.ray_engine import RayEngine

        eng = RayEngine(fleet, specs, envs, models, budget, n_steps=n_steps,
                        keep_records=keep_records, address=ray_address, hosts=hosts)
    try:
        pools: dict[str, list[str]] = {}
        for s in specs:
            pools.setdefault(s.pool, []).append(s.name)
        routers = [Router(p.router, pools[p.name]) for p in fleet.pools]
        last_reports: dict[str, AgentReport] = {}
        last_shares: dict[str, float] = {s.name: s.safe_w for s in specs}
        dead: set[str] = set()
        ticks: list[dict[str, Any]] = []
        restarts = sorted(faults.restart_coordinator_s)
        kills = sorted(faults.kill_replicas.items(), key=lambda kv: kv[1])
        k = 0
        next_tick = 0
        while k < n_steps:
            t_dec = (k + 1) * dt          # the next decision time
            t_now = k * dt
            while kills and kills[0][1] <= t_now:
                name, _ = kills.pop(0)
                eng.kill(name)
                dead.add(name)
            while restarts and restarts[0] <= t_now:
                restarts.pop(0)
                eng.restart_coordinator()
            if faults.on_segment is not None:
                faults.on_segment(t_now, eng)
            committed = eng.committed_w(t_dec)
            drop = not fleet.site.tracking and budget(t_dec) < committed - _EPS_W
            if (k >= next_tick or drop) and not faults.down(t_now):
                tr = eng.tick(t_dec, dead=dead)
                dead |= eng.dead()
                if tr is not None:
                    last_reports.update(tr.reports)
                    last_shares.update(tr.shares_w)
                    ticks.append({"t_s": t_dec, "budget_w": tr.budget_w,
                                  "committed_w": tr.committed_w, "epoch": tr.epoch,
                                  "allocation_s": tr.allocation_s,
                                  "shares_w": dict(tr.shares_w)})
                    next_tick = k + steps_per_period
            elif k >= next_tick:
                next_tick = k + steps_per_period
            # run to the next tick, a kill, a restart, or a budget drop below what is committed
            k_end = min(next_tick, n_steps)
            for _, tk in kills[:1]:
                k_end = min(k_end, max(k + 1, math.ceil(tk / dt - 1e-9)))
            for tr_s in restarts[:1]:
                k_end = min(k_end, max(k + 1, math.ceil(tr_s / dt - 1e-9)))
            if not fleet.site.tracking:
                committed = eng.committed_w(t_dec)
                for kk in range(k + 1, k_end):
                    if budget((kk + 1) * dt) < committed - _EPS_W:
                        k_end = kk
                        break
            t0, t1 = k * dt, k_end * dt
            for router, wl in zip(routers, workloads):
                if wl is None:
                    continue
                reqs = wl.requests_between(t0, t1)
                if not reqs:
                    continue
                pn = router.names
                alive = [n not in dead for n in pn]
                queues = [(last_reports[n].running + last_reports[n].waiting)
                          if n in last_reports else 0 for n in pn]
                cap = None
                if router.policy == "power-aware":
                    cap = [float(envs[n](last_shares[n])) if envs.get(n) is not None
                           else last_shares[n] for n in pn]
                eng.push(router.route(reqs, alive=alive, queues=queues, capacity_tok_s=cap))
            eng.run_until(k_end)
            k = k_end
            if progress is not None:
                progress(k, n_steps)
        results = eng.finish()
        alloc_s = eng.allocation_times()
    finally:
        eng.close()
    return _assemble(fleet, engine, results, pools, ticks, alloc_s, budget, n_steps,
                     time.perf_counter() - wall0)


def _needs_models(fleet: Any) -> bool:
    return fleet.site.policy == "marginal" or any(p.router == "power-aware" for p in fleet.pools)


def _assemble(fleet, engine, results, pools, ticks, alloc_s, budget, n_steps, wall_s
              ) -> FleetResult:
    dt = fleet.dt_s
    t = (np.arange(n_steps) + 1) * dt
    # the budget in force during window i (ending at t_i): the one handed out at t_{i-1}
    b = np.array([budget(max(0.0, x - dt)) if i else budget(dt) for i, x in enumerate(t)])
    lease_s = fleet.site.lease_s
    for r in results:
        if not r.alive:
            last = [tk["t_s"] for tk in ticks if r.name in tk["shares_w"]]
            r.held_until = int(round(((max(last) if last else 0.0) + lease_s) / dt))
    power = np.sum([_ffill(r.power_w, r.held_until) for r in results], axis=0)
    shares = np.sum([_ffill(r.share_w, r.held_until) for r in results], axis=0)
    caps = np.sum([_ffill(r.caps_w, r.held_until) for r in results], axis=0)
    thr = np.sum([np.nan_to_num(r.throughput_tok_s) if r.throughput_tok_s is not None
                  else np.zeros(n_steps) for r in results], axis=0)
    return FleetResult(name=fleet.name, policy=fleet.site.policy, engine=engine, dt_s=dt,
                       tracking=fleet.site.tracking, t_s=t, budget_w=b, power_w=power,
                       shares_w=shares, caps_w=caps, throughput_tok_s=thr, replicas=results,
                       pools=pools, ticks=ticks,
                       allocation_s=list(alloc_s), wall_s=wall_s,
                       meta={"period_s": fleet.site.period_s, "lease_s": fleet.site.lease_s,
                             "replicas": len(results), "seed": fleet.seed})
