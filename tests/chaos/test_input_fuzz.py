"""Fuzzed traces and configs (hypothesis, `palsctl.testing.hostile`): the loaders return a result
that satisfies their invariants or raise a `PalsctlError`; ``palsctl run`` exits 0, or 2 with one
error line — never a traceback."""
from __future__ import annotations

import io
import math
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from palsctl.cli import main as cli_main
from palsctl.errors import ConfigError, PalsctlError
from palsctl.experiment import DEFAULT_EXPERIMENT_TOML
from palsctl.testing.hostile import config_texts, load_and_build, trace_experiment, trace_files
from palsctl.workloads.traces import MAX_TRACE_TOKENS, Trace, TraceWorkload, load_trace

pytestmark = pytest.mark.timeout(300)


def fuzz(n: int) -> settings:
    """Seeded (derandomized), no example database, no deadline: the same examples every run."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"



def check_trace(trace: Trace, lenient: bool) -> None:
    t, p, o = trace.times_s, trace.prompt_tokens, trace.output_tokens
    assert len(t) == len(p) == len(o) >= 1
    assert np.all(np.isfinite(t)) and t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert p.dtype == o.dtype == np.int64
    assert p.min() >= 1 and o.min() >= 1 and max(p.max(), o.max()) <= MAX_TRACE_TOKENS
    assert trace.rows == len(t) + trace.dropped_rows
    assert lenient or not trace.dropped


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``palsctl`` in this process; an exception escaping it fails the test (a traceback)."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        rc = cli_main(argv)
    return rc, err.getvalue()


def assert_clean_exit(rc: int, err: str, command: str) -> None:
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err
    if rc == 2:      # one line per error (a config may hold several), each saying so
        errors = [line for line in err.splitlines() if line.startswith(f"palsctl {command}: ")]
        assert errors and all(line.startswith(f"palsctl {command}: error: ")
                              for line in errors), err


@fuzz(200)
@given(trace_files(), st.booleans())
def test_fuzzed_trace_loads_or_is_a_config_error(file, lenient):
    suffix, data = file
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"t{suffix}"
        path.write_bytes(data)
        try:
            trace = load_trace(path, lenient=lenient)
        except ConfigError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            event("refused")
            return
    event("loaded, rows dropped" if trace.dropped else "loaded")
    check_trace(trace, lenient)


@fuzz(100)
@given(trace_files(max_rows=15),
       st.sampled_from([None] * 4 + [1.0, 3.5, 1e6, 0.0, float("nan"), float("inf"), -2.0]),
       st.sampled_from([0.0] * 6 + [2.0, 1e9, float("nan"), -1.0]),
       st.sampled_from([None] * 4 + [0.5, 100.0, 1e-9, 1e12, float("nan"), 0.0]),
       st.booleans())
def test_fuzzed_trace_workload_is_well_formed_or_a_config_error(file, window, start, rate,
                                                                  repeat):
    suffix, data = file
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"t{suffix}"
        path.write_bytes(data)
        try:
            w = TraceWorkload(path, start_s=start, duration_s=window, rate_req_s=rate,
                              repeat=repeat, lenient=True)
        except ConfigError:
            event("refused")
            return
    event("built")
    assert math.isfinite(w.window_s) and w.window_s > 0
    assert math.isfinite(w.rate_req_s) and w.rate_req_s > 0
    reqs = w.requests_between(0.0, min(w.window_s, 1e6))
    assert all(math.isfinite(r.arrival_s) and r.prompt_tokens >= 1 and r.output_tokens >= 1
               for r in reqs)


@fuzz(12)
@given(trace_files(max_rows=20), st.sampled_from([3.0, 1e-3, None]), st.booleans())
def test_palsctl_run_on_a_fuzzed_trace_exits_0_or_2(file, window, lenient):
    suffix, data = file
    with tempfile.TemporaryDirectory() as d:
        trace = Path(d) / f"t{suffix}"
        trace.write_bytes(data)
        cfg = Path(d) / "exp.toml"
        cfg.write_text(trace_experiment(trace.name, window_s=window))
        argv = ["run", str(cfg), "-q", "--no-plot", "--no-versus", "--out", str(Path(d) / "o")]
        rc, err = run_cli(argv + (["--lenient"] if lenient else []))
    event(f"exit {rc}")
    assert_clean_exit(rc, err, "run")


BASES = [DEFAULT_EXPERIMENT_TOML, (EXAMPLES / "dense_h100.toml").read_text()]


@fuzz(150)
@given(st.sampled_from(BASES).flatmap(config_texts))
def test_fuzzed_config_loads_or_is_a_palsctl_error(raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "exp.toml"
        path.write_bytes(raw)
        try:
            load_and_build(path)
            event("built")
        except PalsctlError as exc:
            event("refused")
            lines = str(exc).splitlines()    # one line per error, each naming the file
            assert lines and all(line.strip() for line in lines)
            if getattr(exc, "file", None):
                assert all(line.startswith(str(path)) for line in lines), lines


@fuzz(20)
@given(st.sampled_from(BASES).flatmap(config_texts))
def test_palsctl_run_on_a_fuzzed_config_exits_0_or_2(raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "exp.toml"
        path.write_bytes(raw)
        rc, err = run_cli(["run", str(path), "-q", "--no-plot", "--no-versus", "--duration-s",
                           "3", "--out", str(Path(d) / "o")])
    event(f"exit {rc}")
    assert_clean_exit(rc, err, "run")
