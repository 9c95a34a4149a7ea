"""Replay of public request traces: the Azure LLM inference trace 2023 (code / conv CSV) and the
Mooncake FAST'25 traces (JSONL), read from where they lie (never copied into the project).

A replay takes a time window of the trace (``start_s``, ``duration_s``, trace seconds), moves it to
start at 0 s and optionally rescales time so that the mean arrival rate equals ``rate_req_s``
(lengths are kept). ``repeat=True`` loops the window so a run longer than it keeps its load.

Trace files are untrusted input. Every row is checked: a timestamp must be a finite number
within ±`MAX_TRACE_TIME_S` of the epoch, a length an integer in 1..`MAX_TRACE_TOKENS` (not a
boolean, not ``NaN``/``Infinity``), a line valid UTF-8 and at most `MAX_TRACE_LINE_B` bytes.
A bad row is a `ConfigError` naming the file, the line and the reason; with ``lenient=True`` bad
rows are dropped instead, counted per reason in `Trace.dropped`, and logged as a warning —
never silently.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from palsctl.errors import ConfigError
from palsctl.types import Request
from palsctl.workloads.base import Workload, requests_from_arrays

__all__ = ["MAX_TRACE_LINE_B", "MAX_TRACE_TIME_S", "MAX_TRACE_TOKENS", "Trace", "TraceWorkload",
           "load_azure_csv", "load_mooncake_jsonl", "load_trace"]

log = logging.getLogger(__name__)

MAX_TRACE_LINE_B = 1024 * 1024        # a longer line is a bad row (real rows: 40 B – 3 kB)
MAX_TRACE_TOKENS = 100_000_000        # prompt / output length bound (tokens)
MAX_TRACE_TIME_S = 1e11               # |timestamp| bound (s): ~3,000 years from the epoch


@dataclass(frozen=True, kw_only=True)
class Trace:
    """Arrival times (s, from the first request), prompt and output lengths (tokens).

    ``rows``: data rows read from the file (kept + dropped); ``dropped``: (reason, count) pairs of
    the rows a lenient load left out (empty for a strict load); ``first_dropped_line``: the line
    number of the first of them (0 if none).
    """

    times_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    source: str = ""
    rows: int = 0
    dropped: tuple[tuple[str, int], ...] = ()
    first_dropped_line: int = 0

    @property
    def dropped_rows(self) -> int:
        """Number of rows a lenient load dropped."""
        return sum(n for _, n in self.dropped)

    def drop_summary(self) -> str:
        """One line: how many rows were dropped, why, and where the first one was ("" if none)."""
        if not self.dropped:
            return ""
        why = ", ".join(f"{n} × {reason}" for reason, n in self.dropped)
        return (f"{self.source}: dropped {self.dropped_rows} of {self.rows} rows ({why}; "
                f"first at line {self.first_dropped_line})")


class _BadRow(ValueError):
    """One row of a trace is invalid; ``reason`` is short and the same for rows alike."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class _Rows:
    """Collects the valid rows of a trace; a bad one raises (strict) or is counted (lenient)."""

    def __init__(self, source: str, lenient: bool) -> None:
        self.source, self.lenient = source, lenient
        self.times: list[float] = []
        self.prompt: list[int] = []
        self.output: list[int] = []
        self.rows = 0
        self.dropped: Counter[str] = Counter()
        self.first_dropped_line = 0

    def bad(self, line_no: int, exc: _BadRow) -> None:
        self.rows += 1
        if not self.lenient:
            detail = f": {exc.detail}" if exc.detail else ""
            raise ConfigError(f"{self.source}:{line_no}: {exc.reason}{detail}") from None
        self.dropped[exc.reason] += 1
        if not self.first_dropped_line:
            self.first_dropped_line = line_no

    def add(self, t_s: float, prompt: int, output: int) -> None:
        self.rows += 1
        self.times.append(t_s)
        self.prompt.append(prompt)
        self.output.append(output)

    def finish(self) -> Trace:
        if not self.times:
            if self.rows:
                raise ConfigError(f"{self.source}: no valid row among {self.rows} "
                                  f"({', '.join(f'{n} × {r}' for r, n in self.dropped.items())})")
            raise ConfigError(f"{self.source}: trace is empty")
        t = np.asarray(self.times, dtype=float)
        order = np.argsort(t, kind="stable")
        t = t[order] - t[order][0]
        trace = Trace(times_s=t, prompt_tokens=np.asarray(self.prompt, dtype=np.int64)[order],
                      output_tokens=np.asarray(self.output, dtype=np.int64)[order],
                      source=self.source, rows=self.rows,
                      dropped=tuple(sorted(self.dropped.items(), key=lambda kv: -kv[1])),
                      first_dropped_line=self.first_dropped_line)
        if trace.dropped:
            log.warning("%s", trace.drop_summary())
        return trace


def _lines(path: Path) -> Iterator[tuple[int, str | _BadRow]]:
    """(line number, text without the line break) per non-blank line; a line that is not UTF-8
    or longer than `MAX_TRACE_LINE_B` comes as a `_BadRow` instead (and is skipped whole)."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ConfigError(f"cannot read trace file {path}: {exc.strerror or exc}") from None
    with fh:
        line_no = 0
        while True:
            try:
                raw = fh.readline(MAX_TRACE_LINE_B + 1)
            except OSError as exc:
                raise ConfigError(f"cannot read trace file {path}: {exc.strerror or exc}"
                                  ) from None
            if not raw:
                return
            line_no += 1
            if len(raw) > MAX_TRACE_LINE_B:
                while raw and not raw.endswith(b"\n"):      # skip the rest of the line
                    raw = fh.readline(MAX_TRACE_LINE_B)
                yield line_no, _BadRow(f"line over {MAX_TRACE_LINE_B} bytes")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, _BadRow("invalid UTF-8", f"byte {exc.start}")
                continue
            text = text.rstrip("\r\n")
            if line_no == 1:
                text = text.removeprefix("\ufeff")     # a byte-order mark (spreadsheet export)
            if text.strip():
                yield line_no, text


def _length(value: object, name: str) -> int:
    """A token count: an integer (or an integral float) in 1..MAX_TRACE_TOKENS."""
    if isinstance(value, bool):
        raise _BadRow(f"boolean {name}", repr(value))
    if isinstance(value, str):
        text = value
        try:
            value = int(text.strip())
        except ValueError:
            raise _BadRow(f"non-integer {name}", repr(text[:40])) from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _BadRow(f"non-finite {name}", repr(value))
        if value != int(value):
            raise _BadRow(f"non-integer {name}", repr(value))
        value = int(value)
    elif not isinstance(value, int):
        raise _BadRow(f"non-integer {name}", type(value).__name__)
    if value < 1:
        raise _BadRow(f"{name} below 1", str(value))
    if value > MAX_TRACE_TOKENS:
        raise _BadRow(f"{name} over {MAX_TRACE_TOKENS}", f"about 2**{value.bit_length()}")
    return value


def _time(value_s: float) -> float:
    if not math.isfinite(value_s):
        raise _BadRow("non-finite timestamp", repr(value_s))
    if abs(value_s) > MAX_TRACE_TIME_S:
        raise _BadRow("timestamp out of range", f"{value_s:.3g} s")
    return value_s


def _parse_azure_time(text: str) -> float:
    base, _, frac = text.strip().partition(".")
    if len(base) != 19 or (frac and not (frac.isascii() and frac.isdigit())):
        raise _BadRow("unparsable timestamp", repr(text[:40]))
    try:
        t = datetime.strptime(base, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        raise _BadRow("unparsable timestamp", repr(text[:40])) from None
    return t.timestamp() + (float("0." + frac) if frac else 0.0)


def load_azure_csv(path: str | Path, *, lenient: bool = False) -> Trace:
    """Read ``AzureLLMInferenceTrace_{code,conv}.csv`` (TIMESTAMP, ContextTokens, GeneratedTokens).

    ``lenient``: drop invalid rows (counted in `Trace.dropped`) instead of failing on the first.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"trace file not found: {path}")
    rows = _Rows(str(path), lenient)
    header = None
    for line_no, text in _lines(path):
        try:
            if isinstance(text, _BadRow):
                raise text
            try:
                row = next(csv.reader([text]))
            except csv.Error as exc:
                raise _BadRow("unparsable CSV row", str(exc)) from None
            if header is None:
                header = row
                if [h.strip() for h in header[:3]] != \
                        ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
                    raise ConfigError(f"{path}: not an Azure LLM trace (header "
                                      f"{text[:80]!r})")
                continue
            if len(row) < 3:
                raise _BadRow("fewer than 3 fields", repr(text[:80]))
            rows.add(_time(_parse_azure_time(row[0])), _length(row[1], "ContextTokens"),
                     _length(row[2], "GeneratedTokens"))
        except _BadRow as exc:
            if header is None:
                raise ConfigError(f"{path}: not an Azure LLM trace (line {line_no}: "
                                  f"{exc.reason})") from None
            rows.bad(line_no, exc)
    if header is None:
        raise ConfigError(f"{path}: trace is empty")
    return rows.finish()


def load_mooncake_jsonl(path: str | Path, *, lenient: bool = False) -> Trace:
    """Read a Mooncake trace (JSONL: ``timestamp`` ms, ``input_length``, ``output_length``).

    ``lenient``: drop invalid rows (counted in `Trace.dropped`) instead of failing on the first.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"trace file not found: {path}")
    rows = _Rows(str(path), lenient)
    for line_no, text in _lines(path):
        try:
            if isinstance(text, _BadRow):
                raise text
            try:
                d = json.loads(text)
            except RecursionError:
                raise _BadRow("JSON nested too deeply") from None
            except ValueError as exc:
                raise _BadRow("not JSON", str(exc)[:80]) from None
            if not isinstance(d, dict):
                raise _BadRow("not a JSON object", type(d).__name__)
            missing = [k for k in ("timestamp", "input_length", "output_length") if k not in d]
            if missing:
                raise _BadRow(f"missing {missing[0]}")
            ts = d["timestamp"]
            if isinstance(ts, bool) or not isinstance(ts, (int, float)):
                raise _BadRow("non-numeric timestamp", repr(ts)[:40])
            try:
                t_s = float(ts) / 1000.0
            except OverflowError:
                raise _BadRow("timestamp out of range", f"{len(str(ts))} digits") from None
            rows.add(_time(t_s), _length(d["input_length"], "input_length"),
                     _length(d["output_length"], "output_length"))
        except _BadRow as exc:
            rows.bad(line_no, exc)
    return rows.finish()


def load_trace(path: str | Path, kind: str = "auto", *, lenient: bool = False) -> Trace:
    """Load an Azure CSV or a Mooncake JSONL trace.

    Parameters
    ----------
    path : str or Path
        The trace file.
    kind : {"auto", "azure", "mooncake"}
        Its format (``"auto"``: by the file suffix).
    lenient : bool, default False
        Drop and count invalid rows instead of failing on the first.

    Returns
    -------
    Trace
        Arrival times (s from the first arrival) with prompt and output lengths (tokens).
    """
    path = Path(path)
    if kind == "auto":
        kind = "mooncake" if path.suffix in (".jsonl", ".json") else "azure"
    if kind == "azure":
        return load_azure_csv(path, lenient=lenient)
    if kind == "mooncake":
        return load_mooncake_jsonl(path, lenient=lenient)
    raise ConfigError(f"unknown trace kind {kind!r}; known: auto, azure, mooncake")


def _positive(value: float | None, name: str, source: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{source}: {name} must be a finite number > 0 (got {value!r})")


class TraceWorkload(Workload):
    """Replay a window of a trace, optionally time-scaled to a target mean arrival rate.

    Parameters
    ----------
    trace : Trace, str or Path
        A loaded trace (`load_trace`) or its file.
    kind : {"auto", "azure", "mooncake"}
        The file's format when ``trace`` is a path (``"auto"``: by its suffix).
    start_s : float, default 0.0
        Start of the window, trace seconds (s).
    duration_s : float or None
        Length of the window, trace seconds (s; None: to the end).
    rate_req_s : float or None
        Rescale time so the window's mean rate becomes this, req/s (None: as recorded).
    repeat : bool, default False
        Loop the window (arrivals of copy ``k`` shifted by ``k`` × window length).
    lenient : bool, default False
        When ``trace`` is a path, drop and count invalid rows instead of failing.
    """

    def __init__(self, trace: Trace | str | Path, *, kind: str = "auto", start_s: float = 0.0,
                 duration_s: float | None = None, rate_req_s: float | None = None,
                 repeat: bool = False, lenient: bool = False) -> None:
        if not isinstance(trace, Trace):
            trace = load_trace(trace, kind, lenient=lenient)
        _positive(duration_s, "duration_s", trace.source)
        _positive(rate_req_s, "rate_req_s", trace.source)
        if isinstance(start_s, bool) or not isinstance(start_s, (int, float)) \
                or not math.isfinite(start_s):
            raise ConfigError(f"{trace.source}: start_s must be a finite number "
                              f"(got {start_s!r})")
        t = trace.times_s
        end = math.inf if duration_s is None else start_s + duration_s
        sel = (t >= start_s) & (t < end)
        if not sel.any():
            raise ConfigError(f"{trace.source}: no request in the window [{start_s:g}, {end:g}) s")
        self.trace = trace
        times = t[sel] - start_s
        if duration_s is not None:
            window_s = float(duration_s)
        elif len(times) == 1:
            window_s = 1.0
        elif times[-1] > 0:     # the span plus one mean gap, so a repeat keeps the mean rate
            window_s = float(times[-1]) + float(times[-1]) / (len(times) - 1)
        else:
            raise ConfigError(f"{trace.source}: all {len(times)} requests of the window arrive "
                              f"at one instant, so its length (and arrival rate) is undefined; "
                              f"give the window length (workload.window_s)")
        natural_rate = len(times) / window_s
        self.time_scale = 1.0 if rate_req_s is None else natural_rate / rate_req_s
        self._times = times * self.time_scale
        self._period_s = window_s * self.time_scale
        if not (math.isfinite(self._period_s) and self._period_s > 0):
            raise ConfigError(f"{trace.source}: the window is {self._period_s:g} s long after "
                              f"scaling to rate_req_s = {rate_req_s!r}")
        self._prompt = trace.prompt_tokens[sel]
        self._output = trace.output_tokens[sel]
        self.repeat = repeat
        self.rate_req_s = len(times) / self._period_s
        self.mean_prompt_tokens = float(self._prompt.mean())
        self.mean_output_tokens = float(self._output.mean())

    @property
    def window_s(self) -> float:
        """Length of the replayed window after time scaling (s)."""
        return self._period_s

    def requests_between(self, t0_s: float, t1_s: float) -> list[Request]:
        """List the requests arriving in [t0_s, t1_s) (seconds since the start)."""
        if t1_s <= t0_s:
            return []
        n = len(self._times)
        out: list[Request] = []
        k_first = int(t0_s // self._period_s) if self.repeat else 0
        k_last = int(t1_s // self._period_s) if self.repeat else 0
        for k in range(max(k_first, 0), k_last + 1):
            off = k * self._period_s
            i0 = int(np.searchsorted(self._times, t0_s - off, side="left"))
            i1 = int(np.searchsorted(self._times, t1_s - off, side="left"))
            if i1 > i0:
                out.extend(requests_from_arrays(self._times[i0:i1] + off, self._prompt[i0:i1],
                                                self._output[i0:i1], first_id=k * n + i0))
        return out
