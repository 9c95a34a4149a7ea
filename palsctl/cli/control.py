"""``palsctl control CONFIG``: the closed loop on the wall clock against a real or emulated
vLLM server (power from NVML or the emulator, metrics from /metrics, batch through the gateway
or the scheduler plugin), behind the same SafetyGuard as in simulation."""
from __future__ import annotations

import argparse

HELP = "run a controller against a real (or emulated) vLLM server on the wall clock"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from palsctl.cli.options import add_metrics_arguments

    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="control TOML file ([serving], [setpoint], [controller], [guard]); see "
                        "--show-example")
    p.add_argument("--dry-run", action="store_true", help="compute and log actions without "
                   "changing the GPU power limit or the batch limit")
    p.add_argument("--duration-s", type=float, default=None, metavar="S",
                   help="how long to run, seconds (default: the config's duration_s, else until "
                        "SIGINT/SIGTERM)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: results/<name>)")
    p.add_argument("--show-example", action="store_true", help="print an example config")
    add_metrics_arguments(p)


def main(args: argparse.Namespace) -> int:
    import logging
    import signal
    from pathlib import Path

    from palsctl.cli.options import start_metrics
    from palsctl.experiment.build import build_controller, build_schedule
    from palsctl.errors import ConfigError
    from palsctl.loop import run_loop
    from palsctl.experiment.serving import (CONTROL_EXAMPLE_TOML, build_serving_plant,
                                            load_control)

    if args.show_example:
        print(CONTROL_EXAMPLE_TOML, end="")
        return 0
    if not args.config:
        raise ConfigError("give a CONFIG file (see --show-example)")
    cfg, serving = load_control(args.config)
    duration = args.duration_s if args.duration_s is not None else cfg.duration_s
    if duration is not None and not duration > 0:
        raise ConfigError("must be > 0", key="--duration-s", value=duration)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("palsctl.control")
    controller = build_controller(cfg)
    schedule = build_schedule(cfg)
    stop = {"n": 0}
    plant = build_serving_plant(serving, dt_s=cfg.dt_s, dry_run=args.dry_run, file=cfg.source)

    def on_signal(signum, frame):
        stop["n"] += 1
        if stop["n"] == 1:
            log.info("signal %d: stopping after this step and restoring settings", signum)
        else:   # second signal: restore now and leave
            plant.close()
            raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    exporter = None
    try:
        exporter = start_metrics(args, model_name=serving["model_name"] or plant.info.model,
                                 gpus=serving["gpus"] or range(plant.limits.num_gpus), log=log)
        log.info("controlling %s (%s power, batch via %s)%s", serving["metrics_url"],
                 serving["power"], serving["batch"], " — DRY RUN" if args.dry_run else "")
        record = run_loop(plant, controller, duration_s=duration, schedule=schedule,
                          guard=cfg.guard if cfg.guard_enabled else False,
                          should_stop=lambda: stop["n"] > 0, on_step=[exporter] if exporter else [])
    finally:
        plant.close()
        if exporter is not None:
            exporter.close()
        for s, h in previous.items():
            signal.signal(s, h)
    out = Path(args.out) if args.out else Path("results") / cfg.name
    path = record.write_csv(out / "steps.csv")
    steps = record.steps
    energy = sum(s.measurement.power_w * s.measurement.window_s for s in steps)
    tokens = sum(s.measurement.throughput_tok_s * s.measurement.window_s for s in steps)
    stale = sum(s.measurement.stale for s in steps)
    print(f"{len(steps)} steps; {tokens:.0f} tokens, {energy:.0f} J"
          f"{f', {tokens / energy:.3f} tokens/J' if energy > 0 else ''}; {stale} stale; "
          f"settings restored; steps in {path}")
    return 0
