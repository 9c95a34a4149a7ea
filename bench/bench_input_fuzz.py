"""Hostile input, counted: fuzzed traces and experiment configs through the loaders and through
``palsctl run`` (hypothesis strategies of `palsctl.testing.hostile`, derandomized: the same
inputs every run).

For each input the outcome is one of: accepted, refused with a `PalsctlError` (one clear line),
or a traceback (any other exception, a ``palsctl run`` exit status other than 0 or 2, or
"Traceback" on its stderr). The figure is the number of tracebacks: 0.

1. traces (``--traces``, default 500): ``load_trace`` strict and lenient, then a
   ``TraceWorkload`` over the result; every ``--cli-every``-th one also through ``palsctl run``
   in this process.
2. configs (``--configs``, default 500): mutations of the embedded default experiment and of
   ``examples/*.toml``, through ``load_experiment`` and the builders (controller, plant,
   workload, schedule); every ``--cli-every``-th one also through ``palsctl run
   --duration-s 3`` in this process.
3. ``--subprocess`` (default 20) of each kind through a real ``python -m palsctl run`` process.

    python bench/bench_input_fuzz.py [--traces 500] [--configs 500] [--cli-every 5]
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine

ROOT = Path(__file__).resolve().parents[1]


class Tally:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.tracebacks: list[str] = []

    def traceback(self, what: str, detail: str) -> None:
        self.outcomes["traceback"] += 1
        if len(self.tracebacks) < 10:
            self.tracebacks.append(f"{what}: {detail}")


def in_process_cli(argv: list[str], tally: Tally, what: str) -> None:
    from palsctl.cli import main as cli_main
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            rc = cli_main(argv)
    except BaseException:      # noqa: BLE001 - the very thing counted
        tally.traceback(what, traceback.format_exc(limit=3).splitlines()[-1])
        return
    if rc not in (0, 2) or "Traceback" in err.getvalue():
        tally.traceback(what, f"exit {rc}: {err.getvalue()[-300:]}")
    else:
        tally.outcomes[f"palsctl run exit {rc}"] += 1


def subprocess_cli(argv: list[str], tally: Tally, what: str) -> None:
    p = subprocess.run([sys.executable, "-m", "palsctl", *argv], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    if p.returncode not in (0, 2) or "Traceback" in p.stderr:
        tally.traceback(what, f"exit {p.returncode}: {p.stderr[-300:]}")
    else:
        tally.outcomes[f"process exit {p.returncode}"] += 1


def fuzz_traces(n: int, cli_every: int, n_sub: int) -> Tally:
    from hypothesis import HealthCheck, given, settings

    from palsctl.errors import PalsctlError
    from palsctl.testing.hostile import trace_experiment, trace_files
    from palsctl.workloads.traces import TraceWorkload, load_trace

    tally = Tally()
    k = [0]

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(trace_files())
    def one(file):
        suffix, data = file
        k[0] += 1
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"t{suffix}"
            path.write_bytes(data)
            for lenient in (False, True):
                try:
                    trace = load_trace(path, lenient=lenient)
                    TraceWorkload(trace, duration_s=None if k[0] % 2 else 3.0)
                    tally.outcomes[f"accepted ({'lenient' if lenient else 'strict'})"] += 1
                except PalsctlError:
                    tally.outcomes[f"refused ({'lenient' if lenient else 'strict'})"] += 1
                except Exception:  # noqa: BLE001 - counted
                    tally.traceback(f"trace {k[0]}", traceback.format_exc(limit=2)
                                    .splitlines()[-1])
            cfg = Path(d) / "exp.toml"
            cfg.write_text(trace_experiment(path.name))
            argv = ["run", str(cfg), "-q", "--no-plot", "--no-versus", "--out", str(Path(d) / "o")]
            if k[0] % cli_every == 0:
                in_process_cli(argv + (["--lenient"] if k[0] % 2 else []), tally,
                               f"trace {k[0]} run")
            if k[0] <= n_sub:
                subprocess_cli(argv, tally, f"trace {k[0]} process")

    one()
    tally.outcomes["inputs"] = k[0]
    return tally


def fuzz_configs(n: int, cli_every: int, n_sub: int) -> Tally:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from palsctl.errors import PalsctlError
    from palsctl.experiment import DEFAULT_EXPERIMENT_TOML
    from palsctl.testing.hostile import config_texts, load_and_build

    bases = [DEFAULT_EXPERIMENT_TOML] + [p.read_text() for p in sorted(ROOT.glob(
        "examples/*.toml"))]
    tally = Tally()
    k = [0]

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(bases).flatmap(config_texts))
    def one(raw):
        k[0] += 1
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "exp.toml"
            path.write_bytes(raw)
            try:
                load_and_build(path)
                tally.outcomes["accepted"] += 1
            except PalsctlError:
                tally.outcomes["refused"] += 1
            except Exception:  # noqa: BLE001 - counted
                tally.traceback(f"config {k[0]}", traceback.format_exc(limit=2).splitlines()[-1])
            argv = ["run", str(path), "-q", "--no-plot", "--no-versus", "--duration-s", "3",
                    "--out", str(Path(d) / "o")]
            if k[0] % cli_every == 0:
                in_process_cli(argv, tally, f"config {k[0]} run")
            if k[0] <= n_sub:
                subprocess_cli(argv, tally, f"config {k[0]} process")

    one()
    tally.outcomes["inputs"] = k[0]
    return tally


def main() -> None:
    import warnings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=int, default=500)
    ap.add_argument("--configs", type=int, default=500)
    ap.add_argument("--cli-every", type=int, default=5)
    ap.add_argument("--subprocess", type=int, default=20)
    args = ap.parse_args()
    warnings.simplefilter("ignore")          # short-trace warnings and the like: not counted
    import logging
    logging.disable(logging.WARNING)         # the lenient loads' drop reports
    print(machine() + f", load average {os.getloadavg()[0]:.1f} at start")
    total = 0
    for name, fn, n in (("traces", fuzz_traces, args.traces),
                        ("configs", fuzz_configs, args.configs)):
        t0 = time.monotonic()
        tally = fn(n, args.cli_every, args.subprocess)
        total += tally.outcomes["traceback"]
        print(f"\n{name}: {tally.outcomes['inputs']} inputs in {time.monotonic() - t0:.0f} s")
        for key, v in sorted(tally.outcomes.items()):
            if key != "inputs":
                print(f"  {key:32s} {v}")
        for line in tally.tracebacks:
            print(f"  TRACEBACK {line}")
    print(f"\ntracebacks in all: {total}")


if __name__ == "__main__":
    main()
