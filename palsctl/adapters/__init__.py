"""Real hardware and serving-engine adapters: NVML power limits (`NvmlPower`, a `PowerDevice`),
vLLM's ``/metrics`` (`VllmMetricsSensor`), batch actuation through the admission gateway
(`Gateway`, `GatewayControl`, `GatewayBatch`) or the scheduler plugin's batch file
(`BatchFileActuator`; both `BatchLimit`s that read back), the emulated server (`Emulator`,
`EmulatorPower`), the claims of original settings that survive a kill (`Claim`, `recover`) and
the Prometheus exporter of a running loop (`LoopExporter`).

Each name is imported from its module on first use (they pull in nvidia-ml-py, aiohttp,
prometheus_client, ...).
"""
from palsctl.lazy import lazy_exports

_LAZY = {
    "NvmlPower": "palsctl.adapters.nvml:NvmlPower",
    "GpuConstraints": "palsctl.adapters.nvml:GpuConstraints",
    "GpuReading": "palsctl.adapters.nvml:GpuReading",
    "restore_all": "palsctl.adapters.nvml:restore_all",
    "PowerDevice": "palsctl.adapters.nvml:PowerDevice",
    "BatchLimit": "palsctl.adapters.batch:BatchLimit",
    "GatewayBatch": "palsctl.adapters.batch:GatewayBatch",
    "Claim": "palsctl.adapters.state:Claim",
    "recover": "palsctl.adapters.state:recover",
    "VllmMetricsSensor": "palsctl.adapters.vllm_metrics:VllmMetricsSensor",
    "MetricsSnapshot": "palsctl.adapters.vllm_metrics:MetricsSnapshot",
    "parse_metrics": "palsctl.adapters.vllm_metrics:parse_metrics",
    "Gateway": "palsctl.adapters.gateway:Gateway",
    "GatewayConfig": "palsctl.adapters.gateway:GatewayConfig",
    "GatewayControl": "palsctl.adapters.gateway:GatewayControl",
    "GatewayBatchActuator": "palsctl.adapters.gateway:GatewayBatchActuator",
    "BatchFileActuator": "palsctl.adapters.vllm_scheduler:BatchFileActuator",
    "Emulator": "palsctl.adapters.emulator:Emulator",
    "EmulatorConfig": "palsctl.adapters.emulator:EmulatorConfig",
    "EmulatorPower": "palsctl.adapters.emulator:EmulatorPower",
    "LoopExporter": "palsctl.adapters.exporter:LoopExporter",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = sorted(_LAZY)
