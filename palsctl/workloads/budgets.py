"""Setpoint schedules: a value as a function of time since the start of the run.

Scalar schedules (``t_s -> float``): `Constant`, `Steps` (piecewise constant), `Ramp`
(piecewise linear) and `GridSignal` (a grid signal — WattTime marginal emissions or solar
output from the vessim datasets — mapped linearly onto ``[min_w, max_w]``).
`SetpointSchedule` combines one optional scalar schedule per `Setpoint` field into the
``t_s -> Setpoint`` callable the loop asks once per control step.

>>> b = Steps([(0, 1400.0), (480, 900.0), (840, 1400.0)])
>>> b(0), b(479.9), b(480), b(900)
(1400.0, 1400.0, 900.0, 1400.0)
>>> Ramp([(0, 100.0), (10, 200.0)])(5)
150.0
"""
from __future__ import annotations

import bisect
import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from palsctl.errors import ConfigError
from palsctl.types import SETPOINT_FIELDS, Setpoint

ScalarSchedule = Callable[[float], float]


@dataclass(frozen=True)
class Constant:
    """A value that never changes.

    Parameters
    ----------
    value : float
        The value (in the unit of the setpoint field it drives).
    """

    value: float

    def __call__(self, t_s: float) -> float:
        """The value at time t_s (seconds since the start): the constant."""
        return self.value


def _points(points: Sequence[Sequence[float]], what: str) -> tuple[list[float], list[float]]:
    if not points:
        raise ConfigError(f"{what} needs at least one [t_s, value] point")
    ts, vs = [], []
    for p in points:
        if len(p) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                  and math.isfinite(x) for x in p):
            raise ConfigError(f"{what} points must be [t_s, value] pairs of numbers, got {p!r}")
        ts.append(float(p[0]))
        vs.append(float(p[1]))
    if ts[0] != 0.0:
        raise ConfigError(f"{what} must start at t_s = 0, got {ts[0]:g}")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise ConfigError(f"{what} times must increase strictly, got {ts}")
    return ts, vs


class Steps:
    """Piecewise constant: the value of the last point at or before ``t_s``.

    Parameters
    ----------
    points : sequence of (float, float)
        ``(t_s, value)`` pairs, times (s since the start) increasing strictly from 0: the value
        from each time on.
    """

    def __init__(self, points: Sequence[Sequence[float]]) -> None:
        self.times_s, self.values = _points(points, "steps")

    def __call__(self, t_s: float) -> float:
        """The value in force at time t_s (seconds since the start)."""
        return self.values[max(bisect.bisect_right(self.times_s, t_s) - 1, 0)]


class Ramp:
    """Piecewise linear through the points; constant after the last one.

    Parameters
    ----------
    points : sequence of (float, float)
        ``(t_s, value)`` pairs, times (s since the start) increasing strictly from 0.
    """

    def __init__(self, points: Sequence[Sequence[float]]) -> None:
        self.times_s, self.values = _points(points, "ramp")

    def __call__(self, t_s: float) -> float:
        """The value at time t_s (seconds since the start), linearly interpolated."""
        return float(np.interp(t_s, self.times_s, self.values))


def _read_signal(path: Path, column: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    if not path.is_file():
        raise ConfigError(f"grid signal file not found: {path}")
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise ConfigError(f"{path}: expected a time column and at least one signal column")
        names = [h.strip() for h in header[1:]]
        if column is None:
            col = 1
        elif column in names:
            col = names.index(column) + 1
        else:
            raise ConfigError(f"{path}: no column {column!r}; columns: {', '.join(names)}")
        times: list[float] = []
        values: list[float] = []
        row_t = ""
        for row in reader:
            if not row:
                continue
            where = f"{path}:{reader.line_num}"
            t = row[0].strip()
            try:
                times.append(float(t))
            except ValueError:
                try:
                    times.append(datetime.fromisoformat(t).replace(tzinfo=timezone.utc).timestamp())
                except ValueError:
                    raise ConfigError(f"{where}: cannot parse time {t!r}") from None
            if not math.isfinite(times[-1]):
                raise ConfigError(f"{where}: time must be a finite number, got {t!r}")
            if len(times) > 1 and times[-1] < times[-2]:
                raise ConfigError(f"{where}: times must not decrease, got {t!r} after "
                                  f"{row_t!r}")
            row_t = t
            try:
                values.append(float(row[col]))
            except (ValueError, IndexError):
                raise ConfigError(f"{where}: cannot parse value in row {row!r}") from None
            if not math.isfinite(values[-1]):
                raise ConfigError(f"{where}: the signal must be a finite number, got "
                                  f"{row[col].strip()!r}")
    if len(times) < 2:
        raise ConfigError(f"{path}: signal needs at least two rows")
    t_s = np.asarray(times) - times[0]
    return t_s, np.asarray(values), names[col - 1]


class GridSignal:
    """A grid signal (carbon intensity, price) mapped linearly onto a power range.

    The signal's minimum and maximum over the whole file map to ``min_w`` and ``max_w``.
    Zero-order hold between samples; the last value holds after the end.

    Parameters
    ----------
    path : str or Path
        A vessim-style CSV: first column seconds or ISO date-time (the WattTime file's header
        spells it ``oootime``), then one column per signal.
    min_w, max_w : float
        The power range the signal maps onto, W.
    column : str or None
        The signal column (None: the first).
    start_s : float, default 0.0
        Skip into the signal (signal seconds, s).
    speedup : float, default 1.0
        Signal seconds per run second (e.g. 300: one 5-minute grid sample per run second).
    invert : bool, default False
        Map the signal's maximum to ``min_w`` (for emissions: a dirtier grid, a lower budget).
    """

    def __init__(self, path: str | Path, *, min_w: float, max_w: float, column: str | None = None,
                 start_s: float = 0.0, speedup: float = 1.0, invert: bool = False) -> None:
        if not (0 <= min_w <= max_w) or not math.isfinite(max_w):
            raise ConfigError(f"grid budget needs 0 <= min_w <= max_w, got {min_w}, {max_w}")
        if not (speedup > 0 and math.isfinite(speedup)):
            raise ConfigError(f"speedup must be > 0, got {speedup}")
        self.path = Path(path)
        self.times_s, self.signal, self.column = _read_signal(self.path, column)
        lo, hi = float(self.signal.min()), float(self.signal.max())
        frac = (self.signal - lo) / (hi - lo) if hi > lo else np.zeros_like(self.signal)
        if invert:
            frac = 1.0 - frac
        self.values_w = min_w + frac * (max_w - min_w)
        self.start_s, self.speedup = float(start_s), float(speedup)

    def __call__(self, t_s: float) -> float:
        """The signal's value at time t_s (seconds since the start), watts."""
        ts = self.start_s + t_s * self.speedup
        i = int(np.searchsorted(self.times_s, ts, side="right")) - 1
        return float(self.values_w[min(max(i, 0), len(self.values_w) - 1)])


class SetpointSchedule:
    """``t_s -> Setpoint`` from one optional scalar schedule (or number) per field.

    Parameters
    ----------
    **fields : callable, float or None
        One per `Setpoint` field (``power_budget_w=Steps(...)``, ``throughput_tok_s=2000.0``):
        a schedule ``t_s -> value`` (`Constant`, `Steps`, `Ramp`, `GridSignal`), a constant, or
        None (no constraint). Units as in the field names.
    """

    def __init__(self, **fields: ScalarSchedule | float | None) -> None:
        unknown = set(fields) - set(SETPOINT_FIELDS)
        if unknown:
            raise ConfigError(f"unknown setpoint field(s) {sorted(unknown)}; known: "
                              f"{', '.join(SETPOINT_FIELDS)}")
        self.fields: dict[str, ScalarSchedule] = {}
        for name, sched in fields.items():
            if sched is None:
                continue
            if isinstance(sched, (int, float)) and not isinstance(sched, bool):
                sched = Constant(float(sched))
            if not callable(sched):
                raise ConfigError(f"setpoint {name} must be a number or a schedule, got {sched!r}")
            self.fields[name] = sched
        self._items = tuple(self.fields.items())

    def __call__(self, t_s: float) -> Setpoint:
        """The setpoint in force at time t_s (seconds since the start)."""
        return Setpoint(**{name: s(t_s) for name, s in self._items})
