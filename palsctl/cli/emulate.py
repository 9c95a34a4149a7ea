"""``palsctl emulate``: serve the simulated plant in real time behind vLLM's HTTP interface."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["HELP", "add_arguments", "main"]

HELP = "serve the simulated GPU + vLLM plant in real time (OpenAI API, /metrics, power endpoint)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``palsctl emulate`` to its parser."""
    from palsctl.cli.options import deprecated_alias

    p.add_argument("--model", default="llama-3.1-8b", metavar="NAME",
                   help="LLM preset of the simulator (default llama-3.1-8b)")
    p.add_argument("--gpu", default="h100-sxm", metavar="NAME",
                   help="GPU preset (default h100-sxm)")
    p.add_argument("--num-gpus", type=int, default=1, metavar="N", dest="gpus",
                   help="how many GPUs serve the model, tensor parallel (default 1)")
    deprecated_alias(p, "--gpus", "--num-gpus", dest="gpus", metavar="N", type=int)
    p.add_argument("--host", default="127.0.0.1", metavar="HOST",
                   help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, metavar="PORT",
                   help="port to listen on (default 8000; 0 picks a free one and prints it)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="name in /v1/models and the model_name label of /metrics (default: "
                        "the model preset)")
    p.add_argument("--max-num-seqs", type=int, default=256, metavar="N",
                   help="launch batch limit, as vLLM's --max-num-seqs (default 256)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the plant's noise and request lengths (default 0)")
    p.add_argument("--no-noise", action="store_true", help="noise-free power readings")
    p.add_argument("--speedup", type=float, default=1.0, metavar="X",
                   help="plant seconds per wall second (default 1)")
    p.add_argument("--batch-file", default=None, metavar="PATH",
                   help="batch target control file (as read by the vLLM scheduler plugin)")
    p.add_argument("--duration-s", type=float, default=None, metavar="S",
                   help="stop after this many seconds (default: until SIGINT/SIGTERM)")


def main(args: argparse.Namespace) -> int:
    """Run ``palsctl emulate`` with parsed options; return the exit status."""
    import asyncio
    import logging

    from palsctl.adapters.emulator import EmulatorConfig, run_emulator
    from palsctl.errors import ConfigError
    from palsctl.plants.sim import SimPlant

    plant = SimPlant(args.model, args.gpu, args.gpus, max_batch_launch=args.max_num_seqs,
                     seed=args.seed, noise=not args.no_noise)
    cfg = EmulatorConfig(served_model_name=args.served_model_name or plant.model.name,
                         host=args.host, port=args.port, speedup=args.speedup,
                         batch_file=args.batch_file)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def ready(emu) -> None:
        print(f"emulating {plant.model.name} on {args.gpus} x {plant.gpu.name} at {emu.url} "
              f"(model name {cfg.served_model_name!r}; power at {emu.url}/palsctl/power)",
              flush=True)

    try:
        import uvloop  # a faster event loop when installed (Linux/macOS)
        runner: Callable[..., Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(run_emulator(plant, cfg, duration_s=args.duration_s, ready=ready))
    except OSError as exc:
        raise ConfigError(f"cannot listen: {exc}", key="--port", value=args.port) from None
    return 0
