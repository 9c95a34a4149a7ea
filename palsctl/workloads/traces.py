"""Replay of public request traces: the Azure LLM inference trace 2023 (code / conv CSV) and the
Mooncake FAST'25 traces (JSONL), read from where they lie (never copied into the project).

A replay takes a time window of the trace (``start_s``, ``duration_s``, trace seconds), moves it to
start at 0 s and optionally rescales time so that the mean arrival rate equals ``rate_req_s``
(lengths are kept). ``repeat=True`` loops the window so a run longer than it keeps its load.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from palsctl.errors import ConfigError
from palsctl.types import Request
from palsctl.workloads.base import Workload, requests_from_arrays


@dataclass(frozen=True, kw_only=True)
class Trace:
    """Arrival times (s, from the first request), prompt and output lengths (tokens)."""

    times_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    source: str = ""


def _parse_azure_time(text: str) -> float:
    base, _, frac = text.strip().partition(".")
    t = datetime.strptime(base, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return t + (float("0." + frac) if frac else 0.0)


def load_azure_csv(path: str | Path) -> Trace:
    """Read ``AzureLLMInferenceTrace_{code,conv}.csv`` (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"trace file not found: {path}")
    times, prompt, output = [], [], []
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != \
                ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise ConfigError(f"{path}: not an Azure LLM trace (header {header!r})")
        for line_no, row in enumerate(reader, start=2):
            try:
                times.append(_parse_azure_time(row[0]))
                prompt.append(int(row[1]))
                output.append(int(row[2]))
            except (ValueError, IndexError):
                raise ConfigError(f"{path}:{line_no}: cannot parse row {row!r}") from None
    return _finish(times, prompt, output, str(path))


def load_mooncake_jsonl(path: str | Path) -> Trace:
    """Read a Mooncake trace (JSONL: ``timestamp`` ms, ``input_length``, ``output_length``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"trace file not found: {path}")
    times, prompt, output = [], [], []
    with path.open() as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                times.append(float(d["timestamp"]) / 1000.0)
                prompt.append(int(d["input_length"]))
                output.append(int(d["output_length"]))
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{path}:{line_no}: not a Mooncake trace line") from None
    return _finish(times, prompt, output, str(path))


def _finish(times, prompt, output, source: str) -> Trace:
    if not times:
        raise ConfigError(f"{source}: trace is empty")
    t = np.asarray(times, dtype=float)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    p = np.maximum(np.asarray(prompt, dtype=np.int64)[order], 1)
    o = np.maximum(np.asarray(output, dtype=np.int64)[order], 1)
    return Trace(times_s=t, prompt_tokens=p, output_tokens=o, source=source)


def load_trace(path: str | Path, kind: str = "auto") -> Trace:
    """Load an Azure CSV (``kind="azure"``) or a Mooncake JSONL (``"mooncake"``); ``"auto"``
    picks by the file suffix."""
    path = Path(path)
    if kind == "auto":
        kind = "mooncake" if path.suffix in (".jsonl", ".json") else "azure"
    if kind == "azure":
        return load_azure_csv(path)
    if kind == "mooncake":
        return load_mooncake_jsonl(path)
    raise ConfigError(f"unknown trace kind {kind!r}; known: auto, azure, mooncake")


class TraceWorkload(Workload):
    """Replay a window of a trace, optionally time-scaled to a target mean arrival rate.

    ``start_s``/``duration_s``: the window in trace seconds (None: to the end).
    ``rate_req_s``: rescale time so the window's mean rate becomes this (None: as recorded).
    ``repeat``: loop the window (arrivals of copy ``k`` shifted by ``k`` × window length).
    """

    def __init__(self, trace: Trace | str | Path, *, kind: str = "auto", start_s: float = 0.0,
                 duration_s: float | None = None, rate_req_s: float | None = None,
                 repeat: bool = False) -> None:
        if not isinstance(trace, Trace):
            trace = load_trace(trace, kind)
        t = trace.times_s
        end = math.inf if duration_s is None else start_s + duration_s
        sel = (t >= start_s) & (t < end)
        if not sel.any():
            raise ConfigError(f"{trace.source}: no request in the window [{start_s:g}, {end:g}) s")
        self.trace = trace
        times = t[sel] - start_s
        window_s = duration_s if duration_s is not None else float(times[-1]) + \
            (float(times[-1]) / max(len(times) - 1, 1) if len(times) > 1 else 1.0)
        natural_rate = len(times) / window_s
        self.time_scale = 1.0 if rate_req_s is None else natural_rate / rate_req_s
        self._times = times * self.time_scale
        self._period_s = window_s * self.time_scale
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
