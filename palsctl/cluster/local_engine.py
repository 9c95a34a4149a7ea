"""The `local` engine: every agent and the coordinator in this process, stepped in lockstep
(deterministic, no Ray needed; the embedded default)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from palsctl.cluster.runtime import Coordinator, LocalHost, ReplicaResult, ReplicaSpec, TickResult

__all__ = ["LocalEngine"]


class LocalEngine:
    """One `LocalHost` with all agents and one `Coordinator` (see `palsctl.cluster.run_fleet`)."""

    def __init__(self, fleet: Any, specs: Sequence[ReplicaSpec], envelopes: dict, models: dict,
                 budget: Callable[[float], float], *, n_steps: int,
                 keep_records: bool = True) -> None:
        self.fleet, self.specs, self.budget = fleet, list(specs), budget
        self.envelopes, self.models = envelopes, models
        self.host = LocalHost(specs, n_steps=n_steps, keep_record=keep_records, models=models)
        self.coord = self._new_coordinator(epoch=0)
        self._alloc_s: list[float] = []

    def _new_coordinator(self, epoch: int) -> Coordinator:
        return Coordinator(site=self.fleet.site, specs=self.specs, budget=self.budget,
                           envelopes=self.envelopes, models=self.models, epoch=epoch)

    def tick(self, t_s: float, *, dead: set[str]) -> TickResult | None:
        """Run the coordinator's tick at fleet time t_s (s); None when it is down."""
        return self.coord.tick(t_s, self.host, dead=dead)

    def committed_w(self, t_s: float) -> float:
        """Power committed to the replicas' leases at t_s (s), W."""
        return self.coord.committed_w(t_s)

    def push(self, assignments: dict) -> None:
        """Hand each replica the requests routed to it."""
        self.host.push(assignments)

    def run_until(self, k_end: int) -> None:
        """Step every live replica's loop up to step k_end."""
        self.host.run_until(k_end)

    def dead(self) -> set[str]:
        """Names of the replicas the engine has lost (none in-process)."""
        return set()

    def kill(self, name: str) -> None:
        """Stop a replica (fault injection)."""
        self.host.kill(name)

    def restart_coordinator(self) -> None:
        """The coordinator loses its state; the new one rebuilds it from the agents' reports."""
        self._alloc_s.extend(self.coord.alloc_times_s)
        self.coord = self._new_coordinator(epoch=0)

    def allocation_times(self) -> list[float]:
        """Seconds each allocation took."""
        return self._alloc_s + self.coord.alloc_times_s

    def finish(self) -> list[ReplicaResult]:
        """Stop the replicas and collect their results."""
        return self.host.finish()

    def close(self) -> None:
        """Release the engine's resources (nothing in-process)."""
        pass
