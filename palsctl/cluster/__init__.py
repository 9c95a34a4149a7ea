"""The fleet layer: one site power budget split among many replicas.

`allocate` (pure) splits a budget; `run_fleet` runs a fleet file (`load_fleet`) on the
``local`` engine (in-process, deterministic) or the ``ray`` engine (``palsctl[cluster]``);
`summarize_fleet` scores it. See docs/fleet.md.

>>> from palsctl.cluster import load_fleet, run_fleet, summarize_fleet   # doctest: +SKIP
>>> summary = summarize_fleet(run_fleet(load_fleet("examples/fleet_hetero.toml")))  # doctest: +SKIP
"""
from palsctl.cluster.allocate import (
                                      POLICIES,
                                      Allocation,
                                      Envelope,
                                      Replica,
                                      allocate,
                                      envelope_from_model,
                                      served_tok_s,
)
from palsctl.cluster.report import plot_site_timeline, summarize_fleet, write_fleet_outputs
from palsctl.cluster.runtime import ENGINES, FaultPlan, FleetResult, Lease, Router, run_fleet
from palsctl.cluster.schema import FleetConfig, fleet_from_dict, load_fleet

__all__ = ["POLICIES", "ENGINES", "Allocation", "Envelope", "Replica", "allocate",
           "envelope_from_model", "served_tok_s", "FleetConfig", "fleet_from_dict", "load_fleet",
           "run_fleet", "FleetResult", "FaultPlan", "Lease", "Router", "summarize_fleet",
           "plot_site_timeline", "write_fleet_outputs"]
