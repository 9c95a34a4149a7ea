"""Trace files are untrusted: every hostile row is one clear error (or, lenient, a counted drop)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from palsctl.cli import main as cli_main
from palsctl.errors import ConfigError
from palsctl.testing.hostile import trace_experiment
from palsctl.workloads.traces import MAX_TRACE_TOKENS, TraceWorkload, load_trace

AZURE_HEAD = b"TIMESTAMP,ContextTokens,GeneratedTokens\n"


def azure_row(sec: int, prompt="374", output="44") -> bytes:
    return f"2023-11-16 18:{sec // 60:02d}:{sec % 60:02d}.5,{prompt},{output}\n".encode()


def mooncake_row(ts_ms, inp=100, out=50) -> bytes:
    return (json.dumps({"timestamp": ts_ms, "input_length": inp, "output_length": out})
            + "\n").encode()


def good_azure(n=5) -> bytes:
    return AZURE_HEAD + b"".join(azure_row(s) for s in range(n))


def good_mooncake(n=5) -> bytes:
    return b"".join(mooncake_row(1000 * s) for s in range(n))


# (name, file suffix, content, words in the error)
HOSTILE = [
    ("invalid utf-8", ".csv", good_azure() + b"2023-11-16 18:15:47.6,3\xff4,44\n", "UTF-8"),
    ("field over 128 kB", ".csv", good_azure() + b"2023-11-16 18:15:47.6,\"" + b"7" * 140_000
     + b"\",44\n", "CSV"),
    ("line over 1 MiB", ".jsonl", good_mooncake() + b"x" * (1024 * 1024 + 10) + b"\n",
     "line over"),
    ("int over int64 (csv)", ".csv", good_azure() + azure_row(9, prompt="9" * 25), "over"),
    ("int over int64 (json)", ".jsonl", good_mooncake() + mooncake_row(5, inp=2 ** 70),
     "input_length over"),
    ("1e400 length", ".jsonl", good_mooncake() + b'{"timestamp": 1, "input_length": 1e400, '
     b'"output_length": 3}\n', "non-finite input_length"),
    ("Infinity length", ".jsonl", good_mooncake() + b'{"timestamp": 1, "input_length": 4, '
     b'"output_length": Infinity}\n', "non-finite output_length"),
    ("NaN timestamp", ".jsonl", good_mooncake() + b'{"timestamp": NaN, "input_length": 4, '
     b'"output_length": 3}\n', "non-finite timestamp"),
    ("1e400 timestamp", ".jsonl", good_mooncake() + b'{"timestamp": 1e400, "input_length": 4, '
     b'"output_length": 3}\n', "non-finite timestamp"),
    ("huge int timestamp", ".jsonl", good_mooncake() + mooncake_row(10 ** 400), "out of range"),
    ("100k-deep JSON", ".jsonl", good_mooncake() + b"[" * 100_000 + b"]" * 100_000 + b"\n",
     "nested too deeply"),
    ("negative length", ".jsonl", good_mooncake() + mooncake_row(1, inp=-5), "below 1"),
    ("zero length", ".csv", good_azure() + azure_row(9, output="0"), "below 1"),
    ("boolean length", ".jsonl", good_mooncake() + mooncake_row(1, out=True), "boolean"),
    ("fractional length", ".jsonl", good_mooncake() + mooncake_row(1, out=2.5), "non-integer"),
    ("string length", ".jsonl", good_mooncake() + mooncake_row(1, out="lots"), "non-integer"),
    ("not an object", ".jsonl", good_mooncake() + b"[1, 2, 3]\n", "not a JSON object"),
    ("missing key", ".jsonl", good_mooncake() + b'{"timestamp": 1}\n', "missing input_length"),
    ("bad azure time", ".csv", good_azure() + b"yesterday,3,4\n", "unparsable timestamp"),
    ("unicode digits", ".csv", good_azure() + "2023-11-16 18:15:47.\u00b2,3,4\n".encode(),
     "unparsable timestamp"),
    ("short row", ".csv", good_azure() + b"2023-11-16 18:15:47.6,3\n", "fewer than 3"),
    ("NUL byte", ".csv", good_azure() + b"2023-11-16 18:15:47.6,3\x00,4\n", "non-integer"),
]


@pytest.mark.parametrize("name,suffix,content,words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_row_is_a_config_error_or_a_counted_drop(tmp_path, name, suffix, content, words):
    path = tmp_path / f"trace{suffix}"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=words) as exc:
        load_trace(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    trace = load_trace(path, lenient=True)
    assert trace.dropped_rows == 1 and trace.rows == 6
    assert len(trace.times_s) == 5 and trace.first_dropped_line == (7 if suffix == ".csv" else 6)
    assert np.all(trace.prompt_tokens >= 1) and np.all(trace.output_tokens >= 1)
    assert np.all(np.isfinite(trace.times_s)) and np.all(np.diff(trace.times_s) >= 0)
    assert "dropped 1 of 6 rows" in trace.drop_summary()


def test_lenient_counts_each_reason_and_logs_once(tmp_path, caplog):
    path = tmp_path / "t.jsonl"
    path.write_bytes(good_mooncake(3) + mooncake_row(1, inp=0) + mooncake_row(2, inp=-1)
                     + b"\xfe\n" + mooncake_row(4, out=True))
    with caplog.at_level("WARNING", logger="palsctl.workloads.traces"):
        trace = load_trace(path, lenient=True)
    assert dict(trace.dropped) == {"input_length below 1": 2, "invalid UTF-8": 1,
                                   "boolean output_length": 1}
    assert trace.rows == 7 and trace.dropped_rows == 4
    assert [r.getMessage() for r in caplog.records] == [trace.drop_summary()]


def test_nothing_valid_left_is_an_error_even_when_lenient(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(mooncake_row(1, inp=0) + mooncake_row(2, out=-4))
    with pytest.raises(ConfigError, match="no valid row among 2"):
        load_trace(path, lenient=True)
    empty = tmp_path / "e.csv"
    empty.write_bytes(AZURE_HEAD)
    with pytest.raises(ConfigError, match="empty"):
        load_trace(empty, lenient=True)
    header_only_bad = tmp_path / "h.csv"
    header_only_bad.write_bytes(b"\xff\xfe,x\n" + azure_row(1))
    with pytest.raises(ConfigError, match="not an Azure"):
        load_trace(header_only_bad, lenient=True)


def test_a_byte_order_mark_and_crlf_line_ends_are_accepted(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"\xef\xbb\xbf" + good_azure(3).replace(b"\n", b"\r\n"))
    assert load_trace(path).prompt_tokens.tolist() == [374, 374, 374]


def test_lengths_at_the_bounds_and_integral_floats(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(mooncake_row(0, inp=1, out=MAX_TRACE_TOKENS) + mooncake_row(5, inp=7.0))
    trace = load_trace(path)
    assert trace.prompt_tokens.tolist() == [1, 7]
    assert trace.output_tokens.tolist() == [MAX_TRACE_TOKENS, 50]
    assert trace.times_s.tolist() == [0.0, 0.005]


def test_all_rows_at_one_instant_needs_a_window(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join(mooncake_row(7000) for _ in range(10)))
    with pytest.raises(ConfigError, match="one instant"):
        TraceWorkload(path)
    w = TraceWorkload(path, duration_s=2.0)
    assert w.rate_req_s == pytest.approx(5.0)
    assert len(w.requests_between(0.0, 2.0)) == 10
    for bad in (dict(duration_s=0.0), dict(duration_s=float("nan")), dict(rate_req_s=-1.0),
                dict(rate_req_s=float("inf")), dict(start_s=float("nan"))):
        with pytest.raises(ConfigError):
            TraceWorkload(path, **{"duration_s": 2.0, **bad})
    single = tmp_path / "one.jsonl"
    single.write_bytes(mooncake_row(3))
    assert TraceWorkload(single).window_s == 1.0




@pytest.mark.parametrize("name,suffix,content,words", HOSTILE[:3] + HOSTILE[5:7] + HOSTILE[10:11],
                         ids=[h[0] for h in HOSTILE[:3] + HOSTILE[5:7] + HOSTILE[10:11]])
def test_palsctl_run_hostile_trace_one_line_exit_2_or_lenient(tmp_path, capsys, name, suffix,
                                                              content, words):
    trace = tmp_path / f"trace{suffix}"
    trace.write_bytes(content)
    cfg = tmp_path / "exp.toml"
    cfg.write_text(trace_experiment(trace.name, window_s=None))
    assert cli_main(["run", str(cfg), "-q", "--no-plot", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("palsctl run: error:") and words in err
    assert "Traceback" not in err
    out = tmp_path / "lenient"
    assert cli_main(["run", str(cfg), "-q", "--no-plot", "--lenient", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workload"]["dropped_rows"] == 1 and summary["workload"]["trace_rows"] == 6
