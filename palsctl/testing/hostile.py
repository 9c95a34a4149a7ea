"""Hypothesis strategies for hostile inputs: corrupted trace files and mutated experiment configs.

Each draws what an operator's mistake or an attacker might feed palsctl: rows with invalid
UTF-8, fields over 128 kB, integers over int64, ``Infinity``/``1e400``/``NaN`` numbers, negative,
zero and boolean lengths, JSON nested 100,000 deep, all rows at one timestamp, truncated and
spliced bytes; configs with keys deleted, renamed, added, their values swapped for extremes
and wrong types, tables turned into scalars, and raw TOML text corrupted. The loaders must
answer each with a result that satisfies their invariants or a `palsctl.errors.PalsctlError` —
never another exception.

>>> from palsctl.testing.hostile import trace_files, config_texts     # doctest: +SKIP
>>> @given(trace_files())                                              # doctest: +SKIP
... def test_trace(file): suffix, data = file; ...
"""
from __future__ import annotations

import tomllib
from typing import Any

from hypothesis import strategies as st

__all__ = ["HOSTILE_NUMBERS", "HOSTILE_VALUES", "config_texts", "load_and_build",
           "trace_experiment", "trace_files"]

# number literals as they appear in a file (JSON accepts NaN/Infinity; Python's parser does)
HOSTILE_NUMBERS = ("-5", "0", "-0", "1.5", "true", "false", "null", '"12"', '"x"', "1e400",
                   "-1e400", "Infinity", "-Infinity", "NaN", str(2 ** 63), str(2 ** 64 + 7),
                   "9" * 25, "1" * 400, "[]", "{}", "1e-400", "100000001")
# TOML values for config mutations
HOSTILE_VALUES: tuple[Any, ...] = (
    float("nan"), float("inf"), float("-inf"), -1, 0, -0.0, 1e-300, 1e308, 2 ** 63 - 1,
    -(2 ** 63), "", "x", "🙂" * 3, "demand", "../../etc/passwd", True, False, [], {}, [1, 2],
    [[0, 1], [0, 1]], {"steps": []}, {"steps": [[0, "a"]]}, {"steps": [[5, 1.0]]},
    {"ramp": [[0, 1], [0, 2]]}, {"grid": "no-such.csv"}, {"constant": -3},
    {"constant": 1, "steps": [[0, 1]]}, {"nested": {"deeper": [1, 2]}},
)


def _azure_time(draw) -> str:
    return draw(st.sampled_from([
        "2023-11-16 18:15:46.6805900", "2023-11-16 18:15:46", "2023-13-45 99:99:99.1", "",
        "yesterday", "2023-11-16 18:15:46.\u00b2", "2023-11-16T18:15:46Z", "x" * 5000,
        "2023-11-16 18:15:46." + "9" * 500, "0001-01-01 00:00:00.0", "9999-12-31 23:59:59.9"]))


def _long_field() -> str:
    return "7" * 140_000


@st.composite
def _azure_row(draw, t_s: int, hostile: bool) -> bytes:
    sec = t_s % 86400
    ts = f"2023-11-16 {sec // 3600:02d}:{sec % 3600 // 60:02d}:{sec % 60:02d}.{t_s % 1000:03d}"
    fields = [ts, str(draw(st.integers(1, 8000))), str(draw(st.integers(1, 2000)))]
    if hostile:
        what = draw(st.integers(0, 6))
        if what == 0:
            fields[0] = _azure_time(draw)
        elif what in (1, 2):
            fields[what] = draw(st.sampled_from(
                ["-5", "0", "", "1e400", "inf", "nan", "9" * 25, "True", "1.5", " 12 ",
                 '"1,2"', _long_field(), "1" * 5000]))
        elif what == 3:
            fields = fields[:draw(st.integers(0, 2))]
        elif what == 4:
            fields.append("extra")
        elif what == 5:
            return fields[0].encode() + b"," + draw(st.binary(min_size=1, max_size=8)) + b"\n"
        else:
            return b'"' + ",".join(fields).encode() + b"\n"
    return (",".join(fields) + "\n").encode()


@st.composite
def _mooncake_row(draw, t_ms: int, hostile: bool) -> bytes:
    vals = [str(t_ms), str(draw(st.integers(1, 200_000))), str(draw(st.integers(1, 4000)))]
    if hostile:
        what = draw(st.integers(0, 8))
        if what <= 2:
            vals[what] = draw(st.sampled_from(HOSTILE_NUMBERS))
        elif what == 3:
            depth = draw(st.sampled_from([10, 1000, 100_000]))
            return b"[" * depth + b"]" * depth + b"\n"
        elif what == 4:
            return b'{"timestamp": 1, "input_length": "' + _long_field().encode() + b'"}\n'
        elif what == 5:
            return draw(st.sampled_from([b"{", b"[1, 2]", b'"text"', b"{}", b"\xff\xfe{}",
                                         b'{"timestamp": 1}', b"null", b"  "])) + b"\n"
        elif what == 6:
            return (b'{"timestamp": %s, "input_length": %s, "output_length": %s, '
                    b'"input_length": -1}\n' % tuple(v.encode() for v in vals))
        elif what == 7:
            return b'{"timestamp": 1, "input_length": 5, "output_length": 5, "hash_ids": "' \
                + b"\x80\x81" + b'"}\n'
        else:
            return b'{"timestamp": 1, "input_length": 5, "output_length": 5}' \
                + draw(st.binary(max_size=6)) + b"\n"
    return b'{"timestamp": %s, "input_length": %s, "output_length": %s, "hash_ids": [1, 2]}\n' \
        % tuple(v.encode() for v in vals)


@st.composite
def trace_files(draw, *, max_rows: int = 40) -> tuple[str, bytes]:
    """(file suffix, file bytes) of a trace: mostly valid rows of an Azure CSV or a Mooncake
    JSONL, some of them hostile, sometimes all at one instant, sometimes with the bytes
    corrupted afterwards (flipped, truncated, spliced)."""
    kind = draw(st.sampled_from(["azure", "mooncake"]))
    n = draw(st.integers(0, max_rows))
    p_bad = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    same_instant = draw(st.booleans()) and draw(st.booleans())
    t = draw(st.integers(0, 10 ** 6))
    rows = []
    for _ in range(n):
        hostile = draw(st.floats(0, 1)) < p_bad
        if not same_instant:
            t += draw(st.integers(0, 5000))
        rows.append(draw((_azure_row if kind == "azure" else _mooncake_row)(t, hostile)))
    if kind == "azure":
        head = draw(st.sampled_from([b"TIMESTAMP,ContextTokens,GeneratedTokens\n"] * 6 + [
            b"", b"TIMESTAMP,ContextTokens\n", b"\xef\xbb\xbfTIMESTAMP,ContextTokens,"
            b"GeneratedTokens\n", b"a,b,c\n", b"\xff\n"]))
        rows.insert(0, head)
    data = b"".join(rows)
    if data and draw(st.integers(0, 4)) == 0:
        i = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["flip", "truncate", "splice", "nul", "crlf"]))
        if how == "flip":
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
        elif how == "truncate":
            data = data[:i]
        elif how == "splice":
            data = data[:i] + draw(st.binary(min_size=1, max_size=64)) + data[i:]
        elif how == "nul":
            data = data[:i] + b"\x00" + data[i:]
        else:
            data = data.replace(b"\n", b"\r\n")
    return (".csv" if kind == "azure" else ".jsonl"), data


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.extend(_paths(v, prefix + (i,)))
    return out


def _at(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def config_texts(draw, base_toml: str, *, max_mutations: int = 4) -> bytes:
    """The bytes of a TOML file: ``base_toml`` after 1..``max_mutations`` random mutations of its
    parsed document (delete, replace with a hostile value — which may turn a table into a
    scalar —, add an unknown key, rename a key), or, now and then, with its bytes corrupted."""
    import copy

    import tomli_w

    doc = copy.deepcopy(tomllib.loads(base_toml))
    for _ in range(draw(st.integers(1, max_mutations)) if draw(st.booleans()) else 1):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _at(doc, path[:-1]), path[-1]
        op = draw(st.sampled_from(["perturb", "perturb", "delete", "replace", "replace", "add",
                                   "rename"]))
        if op == "perturb":                  # a plausible value of the right type, or an extreme
            parent[key] = _perturb(draw, parent[key])
        elif op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = copy.deepcopy(draw(st.sampled_from(HOSTILE_VALUES)))
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "Name", "dt", "power_cap", "kind "]))] = \
                copy.deepcopy(draw(st.sampled_from(HOSTILE_VALUES)))
        elif op == "rename" and isinstance(parent, dict):
            parent[str(key).upper() + "_"] = parent.pop(key)
    raw = tomli_w.dumps(_tomlable(doc)).encode()
    if draw(st.integers(0, 9)) == 0:
        i = draw(st.integers(0, max(len(raw) - 1, 0)))
        raw = raw[:i] + draw(st.binary(min_size=1, max_size=16)) + raw[i + 1:]
    return raw


_NAMES = ("pi", "mpc", "search", "static", "cap-to-budget", "zeus", "batch-only", "cap-only",
          "hindsight", "sim", "llama-3.1-8b", "mixtral-8x7b", "h100-sxm", "b200", "poisson",
          "mmpp", "trace", "none", "azure-conv")


def _perturb(draw, x: Any) -> Any:
    if isinstance(x, bool):
        return not x
    if isinstance(x, int):
        return draw(st.sampled_from([0, 1, 2, 3, x + 1, x * 2, x * 1000, -x, 65536, 2 ** 31]))
    if isinstance(x, float):
        return x * draw(st.sampled_from([0.0, 1e-6, 0.01, 0.5, 0.99, 1.01, 2.0, 100.0, 1e6,
                                         -1.0]))
    if isinstance(x, str):
        return draw(st.sampled_from(_NAMES))
    if isinstance(x, list):
        return x[:draw(st.integers(0, len(x)))] if x else [0]
    return x


def _tomlable(x: Any) -> Any:
    """TOML has no null and no arrays of mixed tables: keep what tomli_w can write."""
    if isinstance(x, dict):
        return {str(k): _tomlable(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_tomlable(v) for v in x if v is not None]
    return x


def trace_experiment(trace_name: str, *, window_s: float | None = 3.0) -> str:
    """A small experiment (TOML) that replays the trace file ``trace_name`` (beside it) for 3 s
    with the `pi` controller: the way to put a fuzzed trace through ``palsctl run``."""
    window = "" if window_s is None else f"window_s = {window_s!r}\n"
    return (f'name = "fuzz"\nduration_s = 3.0\ndt_s = 1.0\n[plant]\nmodel = "llama-3.1-8b"\n'
            f'gpu = "h100-sxm"\n[workload]\nkind = "trace"\npath = "{trace_name}"\n{window}'
            f'[setpoint]\nthroughput_tok_s = "demand"\npower_budget_w = 600.0\n'
            f'[controller]\nname = "pi"\n')


def load_and_build(path: Any) -> None:
    """What ``palsctl run`` does with a config before its loop: load and validate it, then build
    its controller, plant, workload and schedule (each may refuse it with a `PalsctlError`)."""
    from palsctl.experiment import (
        build_controller,
        build_plant,
        build_schedule,
        build_workload,
        load_experiment,
    )

    cfg = load_experiment(path)
    build_controller(cfg)
    build_plant(cfg, seed=0)
    build_schedule(cfg, build_workload(cfg, seed=0))
