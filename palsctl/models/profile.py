"""Profiling sweeps: measure a plant's saturated steady state over (power cap x batch) points.

`profile_plant` is generic over the `palsctl.interfaces.Plant` interface: for each point it
builds a plant (``make_plant(seed)``), applies ``Action(power_cap_w, max_batch)``, keeps the plant
saturated with a backlog of requests of the configured prompt/output lengths (``plant.submit``;
a plant whose load comes from outside — a real server behind a load generator — may refuse
``submit``), lets a warm-up window pass, then measures a steady window: throughput, power and
energy from the energy counter, ITL/TPOT/TTFT percentiles, SM clock. Simulated plants are
advanced with ``plant.advance(dt_s)``; others run on the wall clock.

Sweeps are resumable: each row is appended to the CSV as soon as its point finishes; a rerun
skips the points already there. Each point's plant is seeded from ``(seed, cap, batch)``, so the
order of points and interruptions do not change the result.
"""
from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from palsctl.errors import PalsctlError
from palsctl.types import Action, Request

__all__ = ["profile_plant", "sample_points", "frontier_points", "grid_points", "parse_caps",
           "parse_batches", "point_seed", "build_model_for", "COLUMNS"]

#: CSV columns, in order. Settings first (they identify a point), then measurements.
COLUMNS = (
    "power_cap_w", "max_batch", "prompt_tokens", "output_tokens", "seed", "warmup_s", "window_s",
    "model", "gpu", "num_gpus", "simulated",
    "applied_power_cap_w", "applied_max_batch",
    "throughput_tok_s", "prompt_tok_s", "power_w", "energy_j", "tokens_per_joule",
    "itl_p90_s", "tpot_p50_s", "tpot_p90_s", "ttft_p50_s", "ttft_p90_s",
    "sm_clock_mhz", "running_mean", "waiting_mean", "requests_completed", "measured_s",
)
_TEXT_COLUMNS = {"model", "gpu", "simulated"}
_INT_COLUMNS = {"max_batch", "prompt_tokens", "output_tokens", "seed", "num_gpus",
                "applied_max_batch", "requests_completed"}
# settings that must match between an existing CSV and a resumed sweep
_SETTINGS = ("prompt_tokens", "output_tokens", "seed", "warmup_s", "window_s", "model", "gpu",
             "num_gpus")


# --------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------

def parse_caps(text: str) -> list[float]:
    """``"100:400:50"`` (start:stop:step, stop included) or ``"100,150,200"`` → caps in W."""
    try:
        if ":" in text:
            parts = [float(x) for x in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
                raise ValueError
            start, stop, step = parts
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            caps = [start + i * step for i in range(n)]
        else:
            caps = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PalsctlError(f"--caps: expected START:STOP:STEP or a comma list of watts, "
                           f"got {text!r}") from None
    if not caps or any(c <= 0 or not math.isfinite(c) for c in caps):
        raise PalsctlError(f"--caps: caps must be positive watts, got {text!r}")
    return caps


def parse_batches(text: str) -> list[int]:
    """``"1,2,4,8"`` → batch sizes."""
    try:
        batches = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PalsctlError(f"--batches: expected a comma list of integers, got {text!r}") from None
    if not batches or any(b < 1 for b in batches):
        raise PalsctlError(f"--batches: batch sizes must be >= 1, got {text!r}")
    return batches


def grid_points(caps: Sequence[float], batches: Sequence[int]) -> list[tuple[float, int]]:
    """The full grid, caps outer, batches inner."""
    return [(float(c), int(b)) for c in caps for b in batches]


def sample_points(caps: Sequence[float], batches: Sequence[int], n: int, *,
                  seed: int = 0) -> list[tuple[float, int]]:
    """A space-filling subset of ``n`` grid points: the four corners, the centre, then points
    added greedily so that every cap and every batch level gets covered (Latin-hypercube-like
    projections) and, among those, the one farthest from the points already chosen (maximin);
    coordinates are grid indices scaled to [0, 1] (so a 1, 2, 4, ... batch list is spaced in
    log scale). Deterministic for a seed (the seed only breaks ties)."""
    caps = sorted(set(float(c) for c in caps))
    batches = sorted(set(int(b) for b in batches))
    nc, nb = len(caps), len(batches)
    total = nc * nb
    if n >= total:
        return grid_points(caps, batches)
    if n < 1:
        raise PalsctlError(f"--sample must be >= 1, got {n}")
    uc = np.linspace(0.0, 1.0, nc) if nc > 1 else np.zeros(1)
    ub = np.linspace(0.0, 1.0, nb) if nb > 1 else np.zeros(1)
    chosen: list[tuple[int, int]] = []
    first = [(0, 0), (nc - 1, nb - 1), (0, nb - 1), (nc - 1, 0), (nc // 2, nb // 2)]
    for p in first:
        if p not in chosen and len(chosen) < n:
            chosen.append(p)
    rng = np.random.default_rng(seed)
    tie = rng.random((nc, nb)) * 1e-9
    while len(chosen) < n:
        used_c = {i for i, _ in chosen}
        used_b = {j for _, j in chosen}
        best: tuple[int, int] | None = None
        best_key: tuple[int, float] | None = None
        for i in range(nc):
            for j in range(nb):
                if (i, j) in chosen:
                    continue
                d = min(math.hypot(uc[i] - uc[a], ub[j] - ub[c]) for a, c in chosen)
                key = ((i not in used_c) + (j not in used_b), d + tie[i, j])
                if best_key is None or key > best_key:
                    best, best_key = (i, j), key
        assert best is not None  # fewer points asked than the grid has
        chosen.append(best)
    return [(caps[i], batches[j]) for i, j in chosen]


def frontier_points(model, caps: Sequence[float], batches: Sequence[int], n: int, *,
                    exclude: Iterable[tuple[float, int]] = (),
                    fractions: Sequence[float] = (0.3, 0.5, 0.7, 0.85, 0.95, 0.6, 0.4, 0.8)
                    ) -> list[tuple[float, int]]:
    """Up to ``n`` grid points where a fitted model says the decisions are: for throughput
    targets at ``fractions`` of the model's top predicted throughput, the configuration it
    ranks best by tokens/J among those predicted to meet the target (skipping points in
    ``exclude`` and points already picked). Measuring them next (then refitting) puts the
    profile where a PALS-style search will choose."""
    import warnings

    grid = [p for p in grid_points(caps, batches)]
    taken = {_key(c, b) for c, b in exclude}
    cand = [p for p in grid if _key(*p) not in taken]
    if not cand or n <= 0:
        return []
    C = np.array([c for c, _ in cand])
    B = np.array([b for _, b in cand], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = model.predict(power_cap_w=C, max_batch=B)
        top = float(np.max(model.predict(power_cap_w=np.array([c for c, _ in grid]),
                                         max_batch=np.array([b for _, b in grid], float))
                           .throughput_tok_s))
    thr, tpj = np.asarray(pred.throughput_tok_s), np.asarray(pred.tokens_per_joule)
    picked: list[int] = []
    for f in fractions:
        if len(picked) >= n:
            break
        score = np.where(thr >= f * top, tpj, -np.inf)
        score[picked] = -np.inf
        i = int(np.argmax(score))
        if np.isfinite(score[i]):
            picked.append(i)
    return [cand[i] for i in picked]


def point_seed(seed: int, power_cap_w: float, max_batch: int) -> int:
    """The seed of one point's plant: a function of (seed, cap, batch) only."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(round(power_cap_w * 1000)),
                                 int(max_batch)])
    return int(ss.generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------

def _typed(row: dict[str, str]) -> dict[str, Any] | None:
    """Convert a CSV row; None when incomplete (a row cut short by an interruption)."""
    out: dict[str, Any] = {}
    for col in COLUMNS:
        v = row.get(col)
        if v is None:
            return None
        if col in _TEXT_COLUMNS:
            out[col] = v
        elif v == "":
            out[col] = math.nan
        else:
            try:
                out[col] = int(v) if col in _INT_COLUMNS else float(v)
            except ValueError:
                return None
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else repr(float(v))  # repr: exact round trip
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)).lower()
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return str(v)


def read_profile(path: str | Path) -> list[dict[str, Any]]:
    """Complete rows of a profile CSV (typed). A partial last row is ignored."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise PalsctlError(f"{path}: not a profile written by this palsctl "
                               f"(missing column {missing[0]!r})")
        rows = []
        for r in reader:
            t = _typed(r)
            if t is not None:
                rows.append(t)
    return rows


def _rewrite(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        f.write(",".join(COLUMNS) + "\n")
        for r in rows:
            f.write(",".join(_fmt(r[c]) for c in COLUMNS) + "\n")
    os.replace(tmp, path)


def _append(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        if new:
            f.write(",".join(COLUMNS) + "\n")
        f.write(",".join(_fmt(row[c]) for c in COLUMNS) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _key(power_cap_w: float, max_batch: int) -> tuple[int, int]:
    return (int(round(float(power_cap_w) * 1000)), int(max_batch))


# --------------------------------------------------------------------------------------------
# Measuring one point
# --------------------------------------------------------------------------------------------

def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def _output_len(i: int, max_batch: int, output_tokens: int) -> int:
    """Output length of the ``i``-th request of a point. The first cohort (``max_batch``
    requests) gets lengths spread evenly over ``1..output_tokens`` so that completions — and
    the prefills of their successors — are spread uniformly in time, as in a long-running
    server, instead of marching in lock step; later requests have the configured length."""
    if i < max_batch:
        return max(1, int(round(output_tokens * (i + 1) / max_batch)))
    return int(output_tokens)


def _measure_point(plant, power_cap_w: float, max_batch: int, *, warmup_s: float,
                   window_s: float, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    applied = plant.apply(Action(power_cap_w=float(power_cap_w), max_batch=int(max_batch)))
    dt_s = float(plant.dt_s)
    simulated = bool(getattr(plant, "simulated", False)) and hasattr(plant, "advance")
    can_submit = True
    next_id = 0
    outstanding = 0
    last_done = 0
    elapsed = 0.0
    plant.read()  # start a fresh window
    plant.completed()
    win: dict[str, Any] = dict(tokens=0.0, prompt=0.0, seconds=0.0, energy=0.0, clock_w=0.0,
                               clock_s=0.0, running=0.0, waiting=0.0, itl=[], energy_s=0.0)
    energy_prev = None
    stale_s = 0.0
    tpots: list[float] = []
    ttfts: list[float] = []
    completed_n = 0
    while elapsed < warmup_s + window_s - 1e-9:
        if can_submit:
            target = int(max_batch) + max(8, 2 * last_done)
            if outstanding < target:
                now = plant.now_s if simulated else 0.0
                reqs = [Request(request_id=next_id + i, arrival_s=now,
                                prompt_tokens=int(prompt_tokens),
                                output_tokens=_output_len(next_id + i, max_batch, output_tokens))
                        for i in range(target - outstanding)]
                try:
                    plant.submit(reqs)
                    next_id += len(reqs)
                    outstanding += len(reqs)
                except NotImplementedError:
                    can_submit = False  # load comes from outside (a load generator)
        if simulated:
            plant.advance(dt_s)
        else:  # pragma: no cover - real plants run on the wall clock
            time.sleep(dt_s)
        m = plant.read()
        done = plant.completed()
        outstanding -= len(done)
        last_done = len(done)
        step_s = float(m.window_s) if m.window_s > 0 else dt_s
        elapsed += step_s
        in_window = elapsed > warmup_s + 1e-9
        if m.stale:  # the sensor could not read: the next energy delta spans this period too
            stale_s += step_s
            continue
        if not in_window:
            energy_prev = m.energy_j
            stale_s = 0.0
            continue
        w = win
        w["tokens"] += m.throughput_tok_s * step_s
        w["prompt"] += m.prompt_tok_s * step_s
        w["seconds"] += step_s
        if energy_prev is not None and m.energy_j >= energy_prev:
            w["energy"] += m.energy_j - energy_prev
            w["energy_s"] += step_s + stale_s
        else:  # counter reset or first read: fall back on the mean power
            w["energy"] += m.power_w * step_s
            w["energy_s"] += step_s
        stale_s = 0.0
        energy_prev = m.energy_j
        if m.sm_clock_mhz is not None and math.isfinite(m.sm_clock_mhz):
            w["clock_w"] += m.sm_clock_mhz * step_s
            w["clock_s"] += step_s
        w["running"] += m.running * step_s
        w["waiting"] += m.waiting * step_s
        if m.tpot_p90_s is not None and math.isfinite(m.tpot_p90_s):
            w["itl"].append(m.tpot_p90_s)
        for r in done:
            completed_n += 1
            if r.output_tokens > 1:
                tpots.append(r.tpot_s)
            ttfts.append(r.ttft_s)
    secs = max(win["seconds"], 1e-12)
    thr = win["tokens"] / secs
    power = win["energy"] / max(win["energy_s"], 1e-12)
    return dict(
        applied_power_cap_w=float(applied.power_cap_w) if applied.power_cap_w is not None
        else math.nan,
        applied_max_batch=int(applied.max_batch) if applied.max_batch is not None
        else int(max_batch),
        throughput_tok_s=thr, prompt_tok_s=win["prompt"] / secs, power_w=power,
        energy_j=win["energy"], tokens_per_joule=thr / power if power > 0 else math.nan,
        itl_p90_s=float(np.median(win["itl"])) if win["itl"] else math.nan,
        tpot_p50_s=_pct(tpots, 50), tpot_p90_s=_pct(tpots, 90),
        ttft_p50_s=_pct(ttfts, 50), ttft_p90_s=_pct(ttfts, 90),
        sm_clock_mhz=win["clock_w"] / win["clock_s"] if win["clock_s"] > 0 else math.nan,
        running_mean=win["running"] / secs, waiting_mean=win["waiting"] / secs,
        requests_completed=completed_n, measured_s=win["seconds"])


def profile_plant(make_plant: Callable[[int], Any], points: Iterable[tuple[float, int]], *,
                  warmup_s: float, window_s: float, prompt_tokens: int, output_tokens: int,
                  out_csv: str | Path | None,
                  progress: Callable[[int, int, dict[str, Any]], None] | None = None,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Measure each ``(power_cap_w, max_batch)`` point of a plant.

    An interrupted sweep resumes: with ``out_csv``, rows are appended as points finish and points
    already in the file (same settings) are not measured again; rows measured with other settings
    (seed, windows, workload, plant) are refused.

    Parameters
    ----------
    make_plant : callable
        ``make_plant(point_seed)`` returns a fresh `Plant` (a real plant ignores the seed).
    points : iterable of (float, int)
        The configurations: per-GPU cap (W) and batch limit.
    warmup_s, window_s : float
        Settling time discarded and measuring window per point, s.
    prompt_tokens, output_tokens : int
        Prompt and output lengths of the requests offered, tokens.
    out_csv : str, Path or None
        The profile file (None: rows are only returned).
    progress : callable, optional
        ``progress(done, total, row)`` after every point (resumed ones included).
    seed : int, default 0
        Base seed of the points' plants.

    Returns
    -------
    list of dict
        One row (columns `COLUMNS`) per point, in the order of ``points``.
    """
    if warmup_s < 0 or window_s <= 0:
        raise PalsctlError(f"need warmup_s >= 0 and window_s > 0, got {warmup_s}, {window_s}")
    if prompt_tokens < 1 or output_tokens < 1:
        raise PalsctlError(f"need prompt_tokens and output_tokens >= 1, got "
                           f"{prompt_tokens}, {output_tokens}")
    points = [(float(c), int(b)) for c, b in points]
    path = Path(out_csv) if out_csv is not None else None
    existing: dict[tuple[int, int], dict[str, Any]] = {}
    if path is not None and not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PalsctlError(f"{path}: cannot create its folder ({exc.strerror})") from None
    if path is not None and path.exists():
        if not path.is_file():
            raise PalsctlError(f"{path}: not a file (the profile CSV to write or resume)")
        old = read_profile(path)
        with path.open() as f:
            n_lines = sum(1 for line in f if line.strip())
        if n_lines - 1 != len(old):  # drop a partial row left by an interruption
            _rewrite(path, old)
        for r in old:
            existing[_key(r["power_cap_w"], r["max_batch"])] = r
    settings = dict(prompt_tokens=int(prompt_tokens), output_tokens=int(output_tokens),
                    seed=int(seed), warmup_s=float(warmup_s), window_s=float(window_s))
    rows: list[dict[str, Any]] = []
    total = len(points)
    checked = False  # whether the existing rows were found to measure this plant
    for done_n, (cap, batch) in enumerate(points, start=1):
        key = _key(cap, batch)
        row = existing.get(key)
        if row is not None:
            for k, v in settings.items():
                if row[k] != v:
                    raise PalsctlError(f"{path}: existing rows were measured with {k}={row[k]!r}, "
                                       f"this sweep uses {v!r}; use another --csv file")
        else:
            plant = make_plant(point_seed(seed, cap, batch))
            try:
                desc = _describe(plant.info)
                _check_same_plant(path, existing, desc)
                checked = True
                measured = _measure_point(plant, cap, batch, warmup_s=warmup_s,
                                          window_s=window_s, prompt_tokens=prompt_tokens,
                                          output_tokens=output_tokens)
            finally:
                plant.close()
            row = dict(power_cap_w=cap, max_batch=batch, **settings, **desc, **measured)
            if path is not None:
                _append(path, row)
            existing[key] = row
        rows.append(row)
        if progress is not None:
            progress(done_n, total, row)
    if existing and not checked and points:  # every point reused: rows of this plant only
        plant = make_plant(point_seed(seed, *points[0]))
        try:
            _check_same_plant(path, existing, _describe(plant.info))
        finally:
            plant.close()
    return rows


def _describe(info: Any) -> dict[str, Any]:
    """The profile CSV's plant columns of a plant's `PlantInfo`."""
    return dict(model=str(info.model), gpu=str(info.gpu), num_gpus=int(info.num_gpus),
                simulated=str(bool(info.simulated)).lower())


def _check_same_plant(path: Path | None, existing: dict[Any, dict[str, Any]],
                      desc: dict[str, Any]) -> None:
    """Raise `PalsctlError` when the existing rows measured another plant than ``desc``."""
    if not existing:
        return
    some = next(iter(existing.values()))
    for k in ("model", "gpu", "num_gpus"):
        if some[k] != desc[k]:
            raise PalsctlError(f"{path}: existing rows profile {k}={some[k]!r}, this plant has "
                               f"{desc[k]!r}; use another --csv file")


# --------------------------------------------------------------------------------------------
# Convenience for controllers and experiments
# --------------------------------------------------------------------------------------------

def default_grid(limits, *, n_caps: int = 7, batches: Sequence[int] = (1, 2, 4, 8, 16, 32, 64)
                 ) -> tuple[list[float], list[int]]:
    """``n_caps`` caps evenly spaced over the plant's cap range (rounded down to the cap step)
    and the batch list limited to the plant's batch range."""
    caps = sorted({limits.clamp_cap_w(c) for c in
                   np.linspace(limits.power_cap_min_w, limits.power_cap_max_w, n_caps)})
    bs = sorted({limits.clamp_batch(b) for b in batches})
    return caps, bs


def build_model_for(model: str, gpu: str, num_gpus: int, *, prompt_tokens: int,
                    output_tokens: int, points: int = 12, kind: str = "parametric", seed: int = 0,
                    warmup_s: float = 20.0, window_s: float = 30.0, cv_folds: int = 0,
                    plant_kwargs: dict[str, Any] | None = None,
                    batches: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                    parallelism: str = "tp"):
    """Profile the simulated plant and fit a power-performance model of it.

    ``points`` points of the default 7-cap × 7-batch grid are measured on `SimPlant` through
    `profile_plant`: two thirds space-filling (`sample_points`), the rest where a first fit places
    the tokens/J-best configurations for a range of throughput targets (`frontier_points`). The
    profile is measured (noise, windows), not read from the simulator's steady state, so the
    model carries honest errors.

    Parameters
    ----------
    model, gpu : str
        Model and GPU preset names.
    num_gpus : int
        GPUs in the group.
    prompt_tokens, output_tokens : int
        Prompt and output lengths of the profiling requests, tokens.
    points : int, default 12
        Configurations measured.
    kind : {"parametric", "gbt", "forest"}
        The model family fitted.
    seed : int, default 0
        Seed of the plant noise and the point choice.
    warmup_s, window_s : float, default 20.0 and 30.0
        Settling time discarded and measuring window per point, simulated s.
    cv_folds : int, default 0
        > 0 also reports k-fold CV errors in ``model.cv_mape`` (one more fit per fold).
    plant_kwargs : dict or None
        More `SimPlant` arguments (e.g. ``constants`` of another calibration).
    batches : sequence of int, default (1, 2, 4, 8, 16, 32, 64)
        Batch levels of the grid (limited to the plant's launch batch).
    parallelism : {"tp", "ep", "tp+ep"}
        The plant's parallelism.

    Returns
    -------
    PowerPerfModel
        The fitted model.
    """
    from palsctl.models.power_perf import PowerPerfModel
    from palsctl.plants.sim import SimPlant

    def make(s: int):
        return SimPlant(model=model, gpu=gpu, num_gpus=num_gpus, seed=s,
                        **{"parallelism": parallelism, **(plant_kwargs or {})})

    probe = make(seed)
    try:
        caps, batches = default_grid(probe.limits, batches=batches)
    finally:
        probe.close()
    kw: dict[str, Any] = dict(warmup_s=warmup_s, window_s=window_s, prompt_tokens=prompt_tokens,
              output_tokens=output_tokens, out_csv=None, seed=seed)
    # two thirds space-filling, then the rest where the first fit says the decisions are
    n_first = points if points < 6 else points - points // 3
    pts = sample_points(caps, batches, n_first, seed=seed)
    rows = profile_plant(make, pts, **kw)
    if n_first < points:
        first = PowerPerfModel.fit(rows, kind="parametric", seed=seed, cv_folds=0)
        more = frontier_points(first, caps, batches, points - n_first, exclude=pts)
        more += [p for p in sample_points(caps, batches, len(caps) * len(batches), seed=seed)
                 if p not in pts and p not in more][: points - n_first - len(more)]
        rows += profile_plant(make, more, **kw)
    return PowerPerfModel.fit(rows, kind=kind, seed=seed, cv_folds=cv_folds)
