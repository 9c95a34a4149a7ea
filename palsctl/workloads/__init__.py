"""Workloads (request sources) and setpoint schedules.

* `palsctl.workloads.traces`: replay of the Azure 2023 and Mooncake traces.
* `palsctl.workloads.synthetic`: Poisson and MMPP arrivals with log-normal lengths; the
  Azure-conv-fitted default workload.
* `palsctl.workloads.budgets`: constant / steps / ramp / grid-signal schedules.
"""
from palsctl.workloads.base import Workload
from palsctl.workloads.budgets import Constant, GridSignal, Ramp, SetpointSchedule, Steps
from palsctl.workloads.synthetic import (
    AZURE_CONV_FIT,
    LogNormalLengths,
    MMPPWorkload,
    PoissonWorkload,
    azure_conv_workload,
)
from palsctl.workloads.traces import TraceWorkload, load_trace

__all__ = ["AZURE_CONV_FIT", "Constant", "GridSignal", "LogNormalLengths", "MMPPWorkload",
           "PoissonWorkload", "Ramp", "SetpointSchedule", "Steps", "TraceWorkload", "Workload",
           "azure_conv_workload", "load_trace"]
