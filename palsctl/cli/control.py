"""``palsctl control CONFIG``: the closed loop on the wall clock against a real or emulated
vLLM server (power from NVML or the emulator, metrics from /metrics, batch through the gateway
or the scheduler plugin), behind the same SafetyGuard as in simulation.

Nothing it changes outlives it unknowingly: before the first write the original settings go to
a claim file in the state folder (`palsctl.adapters.state`); a start that finds the claim of a
palsctl that died (SIGKILL, power loss) restores those originals first and says so, and
``palsctl restore`` does it by hand. On SIGINT, SIGTERM, SIGHUP or SIGQUIT it finishes the step,
restores and exits; a second signal skips the rest of the step. Every step is appended to
``steps.csv`` as it happens (flushed, ``fsync``-ed every few steps) and ``summary.json`` is
written on any exit it survives, naming the steps file with its row count and checksum.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from palsctl.loop import StepRecord

HELP = "run a controller against a real (or emulated) vLLM server on the wall clock"

_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
TIMELINE_STEPS = 21_600     # the steps timeline.png shows: the last 6 h at dt_s = 1 s


class _Stop(TypedDict):
    """What the signal handler tells the loop: signals seen, restoring already, the last one."""

    n: int
    closing: bool
    signal: str | None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``palsctl control`` to its parser."""
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
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where the original settings are kept while palsctl runs (default: "
                        "$PALSCTL_STATE_DIR, /run/palsctl for root, else "
                        "~/.local/state/palsctl)")
    p.add_argument("--status-every", type=int, default=10, metavar="N",
                   help="log a status line every N steps (0: never; default 10)")
    p.add_argument("--no-plot", action="store_true",
                   help=f"skip timeline.png (drawn at exit from the last {TIMELINE_STEPS} steps)")
    p.add_argument("--show-example", action="store_true", help="print an example config")
    add_metrics_arguments(p)


class _Totals:
    """Running totals of the steps (the loop keeps no step list on an unbounded run)."""

    def __init__(self) -> None:
        self.steps = self.stale = self.faulty = 0
        self.energy_j = self.tokens = self.duration_s = self.over_budget_s = 0.0
        self._budget: float | None = None
        self.last = None

    def __call__(self, rec) -> None:
        m = rec.measurement
        self.steps += 1
        self.stale += bool(m.stale)
        self.faulty += bool(rec.fault)
        w = m.window_s
        self.duration_s += w
        if m.power_w == m.power_w:          # NaN from a broken sensor counts as nothing
            self.energy_j += m.power_w * w
            b = self._budget                # the budget in force during the window
            if b is not None and m.power_w > b * 1.01:
                self.over_budget_s += w
        if m.throughput_tok_s == m.throughput_tok_s:
            self.tokens += m.throughput_tok_s * w
        self._budget = rec.setpoint.power_budget_w
        self.last = rec


class _Status:
    """Logs a status line every ``every`` steps (an ``on_step`` callback)."""

    def __init__(self, log, every: int, totals: _Totals) -> None:
        self.log, self.every, self.totals, self.n = log, every, totals, 0

    def __call__(self, rec) -> None:
        self.n += 1
        if self.every <= 0 or self.n % self.every:
            return
        m, a, t = rec.measurement, rec.applied, self.totals
        b = rec.setpoint.power_budget_w
        self.log.info("step %d: %.0f W%s, cap %s W, batch %s, %.0f tok/s, %d running, "
                      "%d waiting; %d stale, %d with faults so far", self.n, m.power_w,
                      "" if b is None else f" (budget {b:g} W)",
                      "?" if a.power_cap_w is None else f"{a.power_cap_w:g}",
                      "?" if a.max_batch is None else a.max_batch, m.throughput_tok_s,
                      m.running, m.waiting, t.stale, t.faulty)


def _plot_timeline(steps, plant, cfg, path, log):
    """Draw the kept steps as ``timeline.png``; a failure to draw is logged, never raised (the
    settings are restored and the steps are on disk by then)."""
    from palsctl.loop import RunRecord
    from palsctl.plotting import plot_timeline

    record = RunRecord(steps=list(steps), requests=[], limits=plant.limits, dt_s=cfg.dt_s,
                       plant_info=plant.info, controller=cfg.controller_name)
    try:
        return plot_timeline(record, path, title=f"{cfg.name}: {cfg.controller_name} "
                             f"(last {len(record.steps)} steps)")
    except Exception as exc:    # noqa: BLE001 - a plot must not turn a finished run into an error
        log.warning("could not draw %s: %s", path, exc)
        return None


def main(args: argparse.Namespace) -> int:
    """Run ``palsctl control`` with parsed options; return the exit status."""
    import logging
    import signal
    import sys
    from collections import deque
    from pathlib import Path

    from palsctl.adapters.state import Claim, default_state_dir
    from palsctl.cli.options import start_metrics
    from palsctl.errors import ConfigError
    from palsctl.experiment.build import build_controller, build_schedule
    from palsctl.experiment.results import write_summary
    from palsctl.experiment.serving import (
        CONTROL_EXAMPLE_TOML,
        build_serving_plant,
        load_control,
        recover_settings,
    )
    from palsctl.loop import ClosedLoop, StepsWriter

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
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    out = Path(args.out) if args.out else Path("results") / cfg.name

    for line in recover_settings(serving, state_dir=state_dir, dry_run=args.dry_run,
                                 file=cfg.source):
        log.warning("%s", line)
    plant = build_serving_plant(serving, dt_s=cfg.dt_s, dry_run=args.dry_run, file=cfg.source)
    claim = writer = None
    try:
        if not args.dry_run:   # the originals, before the first write
            claim = Claim.write(state_dir, plant.state_targets(),
                                command=f"palsctl control {args.config}")
        writer = StepsWriter(out / "steps.csv")
    except OSError as exc:
        plant.close()
        if claim is not None and plant.restored:
            claim.release()
        what = ("--state-dir", str(state_dir)) if claim is None and not args.dry_run \
            else ("--out", str(out))
        raise ConfigError(f"cannot write: {exc}", key=what[0], value=what[1]) from None

    totals = _Totals()
    recent: deque = deque(maxlen=0 if args.no_plot else TIMELINE_STEPS)
    loop = None
    stop: _Stop = {"n": 0, "closing": False, "signal": None}

    def on_signal(signum, frame):
        stop["n"] += 1
        stop["signal"] = signal.Signals(signum).name
        if stop["closing"]:
            log.warning("%s: restoring the settings, please wait", stop["signal"])
        elif stop["n"] == 1:
            log.info("%s: stopping after this step and restoring settings", stop["signal"])
        else:   # a second signal: leave the step now (the settings are restored below)
            raise SystemExit(128 + signum)

    previous = {}
    for name in _SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, on_signal)
    outcome = "completed"
    exporter = None
    try:
        exporter = start_metrics(args, model_name=serving["model_name"] or plant.info.model,
                                 gpus=serving["gpus"] or range(plant.limits.num_gpus), log=log)
        on_step: list[Callable[[StepRecord], None]] = [
            writer, totals, recent.append, _Status(log, args.status_every, totals)]
        if exporter:
            on_step.append(exporter)
        loop = ClosedLoop(plant, controller, schedule=schedule,
                          guard=cfg.guard if cfg.guard_enabled else False,
                          on_step=on_step, keep_steps=False)
        log.info("controlling %s (%s power, batch via %s)%s", serving["metrics_url"],
                 serving["power"], serving["batch"], " — DRY RUN" if args.dry_run else "")
        loop.run(duration, should_stop=lambda: stop["n"] > 0)
        if stop["signal"]:
            outcome = f"stopped by {stop['signal']}"
    except BaseException as exc:
        outcome = (f"stopped by {stop['signal']}" if isinstance(exc, SystemExit)
                   and stop["signal"] else f"ended by {type(exc).__name__}: {exc}")
        raise
    finally:
        stop["closing"] = True
        plant.close()
        if exporter is not None:
            exporter.close()
        writer.close()
        kept = None
        if claim is not None:
            if plant.restored:
                claim.release()
            else:
                kept = claim.path
        meta = loop.record.meta if loop is not None else {}
        summary = write_summary(out / "summary.json", {
            "experiment": cfg.name, "controller": cfg.controller_name, "outcome": outcome,
            "dry_run": args.dry_run, "steps": totals.steps, "duration_s": totals.duration_s,
            "energy_j": totals.energy_j, "generated_tokens": totals.tokens,
            "tokens_per_joule": totals.tokens / totals.energy_j if totals.energy_j else None,
            "time_over_budget_s": totals.over_budget_s, "stale_steps": totals.stale,
            "fault_steps": totals.faulty,
            "faults": {k: meta.get(k, 0) for k in ("sensor_faults", "actuator_faults",
                                                   "actuator_alarms", "guard_faults",
                                                   "guard_tightenings", "callback_errors")},
            "drift_events": plant.drift_events(),
            "settings_restored": None if args.dry_run else plant.restored,
            "restore_errors": plant.restore_errors,
            "state_file": None if kept is None else str(kept)}, writer.path)
        for s, h in previous.items():
            signal.signal(s, h)
    plot = _plot_timeline(recent, plant, cfg, out / "timeline.png", log) if recent else None
    tail = ("dry run: nothing was changed" if args.dry_run else "settings restored"
            if plant.restored else "settings NOT restored")
    tpj = f", {totals.tokens / totals.energy_j:.3f} tokens/J" if totals.energy_j > 0 else ""
    print(f"{totals.steps} steps; {totals.tokens:.0f} tokens, {totals.energy_j:.0f} J{tpj}; "
          f"{totals.stale} stale; {totals.faulty} with faults; {tail}; steps in "
          f"{writer.path} ({summary['steps_file']['rows']} rows)"
          f"{f'; timeline in {plot}' if plot else ''}")
    if not args.dry_run and not plant.restored:
        print(f"palsctl control: error: could not restore: {'; '.join(plant.restore_errors)}; "
              f"the originals are kept in {kept}: run `palsctl restore` when the endpoint is "
              f"back", file=sys.stderr)
        return 1
    return 0
