"""Scoring a recorded run: one function, `summarize`, so every controller is scored identically.

Conventions (see `palsctl.loop`): step ``i`` records the measurement of the window
``(t_i - window_s, t_i]`` and the setpoint handed to the controller at ``t_i``. That window ran
under the action decided at step ``i-1``, for step ``i-1``'s setpoint, so each window is scored
against the **setpoint in force during it**: step ``i-1``'s (step 0 uses its own).

Definitions (``P`` window-mean power of all GPUs, ``B`` budget, ``X`` generated tokens/s,
``T`` throughput target, ``w`` window length):

* ``energy_j = Σ P·w``; ``generated_tokens = Σ X·w``; ``tokens_per_joule`` their ratio;
  ``duration_s = Σ w``; ``mean_power_w = energy_j / duration_s``.
* A window is **over budget** when ``P > B·(1 + budget_tolerance)`` (1 % band by default).
  ``time_over_budget_s = Σ w`` over such windows; ``energy_over_budget_j = Σ (P - B)·w`` over
  the same windows (the whole excess above the budget, counted only outside the band).
* A window has a **throughput shortfall** when a target ``T`` is set and the plant holds a
  backlog it is not serving fast enough: requests waited for admission (``waiting > 0``: the
  engine was saturated by its batch limit or its KV cache) in *every* window of the trailing
  ``backlog_window_s`` (5 s: windows ending in ``(t_i - backlog_window_s, t_i]``), and the
  generated throughput averaged over those windows ``X̄ < (1 - throughput_tolerance)·T``.
  This is "throughput below the target while the demand exists", with the demand judged by
  what the plant could have served at that moment: a queue that persisted for the whole
  trailing window, so the plant was running at its configuration's capacity and that
  capacity was below the target. An unsaturated plant serves everything it has been offered,
  so it is not in violation however low its throughput (offered load below the target, or a
  request's output still being generated over the seconds after its arrival); its slowness
  shows in the latency SLOs below. A queue that clears within ``backlog_window_s`` (a burst of
  arrivals admitted a few steps later) is not a shortfall either: its cost is the TTFT it adds,
  which the TTFT SLO scores. (Scoring against the *offered* demand instead would charge every
  configuration, full power included, for bursts and long outputs it could not have served
  sooner: tokens are generated over many seconds after a request arrives.)
* A window has a **latency violation** when an SLO is set and the window's p90 TPOT / TTFT
  exceeds it. ``qos_violation_rate`` = fraction of windows with a shortfall or a latency
  violation.
* ``slo_attainment`` = fraction of completed requests whose TTFT and mean TPOT both meet the SLOs
  in force at their arrival (None when no SLO is ever set or no request completed).
* **Settling time** after a step — a change of the budget or of the target by more than 1 %
  between consecutive windows' setpoints, at the start ``t_e`` of the first window under the
  new setpoint: a window is *out of spec* when the mean power over the trailing
  ``settle_window_s`` (10 s, only windows since ``t_e``) is over budget, or when the window has
  a throughput shortfall.
  Averaging keeps sensor noise and single-second bursts from counting. The settling time is
  ``end of the last out-of-spec window in [t_e, next step) - t_e`` (0 when
  none). When the segment's final window is still out of spec the step never settled: it gets
  the segment's length and is counted in ``unsettled_steps``. ``settling_time_s`` is the worst
  (largest) over all steps, ``settling_times_s`` the list; None when the run has no step.
* Power-target mode (windows with ``power_target_w`` set): ``power_tracking_mae_w`` mean
  absolute error ``|P - target|``, ``power_tracking_rel_error`` that divided by the mean target.
* ``throughput_violation_rate``: the PALS paper's QoS violation, throughput only — the fraction
  of windows with a throughput shortfall (as defined above); ``throughput_shortfall_rate`` is
  the same number under its older name.
* **Binding and loose stretches** (only with a ``reference`` run, normally `static` — the
  deployment without power management — on the same workload and seed): a window is *binding*
  when a power budget is set and the reference's power averaged over the trailing
  ``settle_window_s`` exceeds it (the budget takes power away from what the load would draw),
  else *loose*. ``qos_violation_rate_binding`` / ``_loose`` and
  ``throughput_violation_rate_binding`` / ``_loose`` are the rates over those windows (None when
  there are none); ``binding_fraction`` the share of binding windows.
* ``time_over_budget_late_s``: the same, without the first window after each budget cut (a cap
  lowered at the cut acts from the next window on): what a controller that follows budget steps
  at once still spends over the budget. The run's first window counts as one after a cut: the
  plant runs it at the cap it started with, before any controller decided.
* ``time_over_budget_counter_s`` / ``time_over_budget_late_counter_s``: the same two, with ``P``
  the window's increase of the cumulative energy counter (``energy_j``) over its length — what
  the GPUs drew, without the power reading's noise (NVML's counter on a real GPU; the simulated
  plant's counter is exact while its reading has 1 % noise). The reading is used for a window
  whose counter cannot be differenced (the first one, a stale one or the one after it, a
  counter that went backwards). On a real GPU the two agree; on the simulated plant, windows
  over budget by the reading only are sensor noise around a cap within the budget.
* **Thrashing**: ``batch_changes_per_100s`` counts steps whose applied batch limit differs from
  the previous step's; ``cap_reversals_per_100s`` counts changes of direction of the applied cap
  (moves under 0.5 W ignored) — both per 100 s of run; ``budget_reversals_per_100s`` counts the
  same for the power budget itself (a controller that follows a moving budget reverses with it).
* Stale windows count with the values the sensor repeated.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from palsctl.loop import RunRecord, StepRecord
from palsctl.types import Setpoint

__all__ = ["SUMMARY_KEYS", "binding_windows", "summarize", "trailing_means", "window_setpoints"]

SUMMARY_KEYS = ("tokens_per_joule", "qos_violation_rate", "slo_attainment", "time_over_budget_s",
                "energy_over_budget_j", "settling_time_s", "energy_j", "generated_tokens",
                "duration_s")

_STEP_RTOL = 0.01


def window_setpoints(steps: list[StepRecord]) -> list[Setpoint]:
    """The setpoint in force during each step's measured window (step i-1's; step 0's own)."""
    if not steps:
        return []
    return [steps[0].setpoint] + [s.setpoint for s in steps[:-1]]


def _changed(a: float | None, b: float | None) -> bool:
    if a is None and b is None:
        return False
    if a is None or b is None:
        return True
    return abs(a - b) > _STEP_RTOL * max(abs(a), abs(b), 1e-12)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def trailing_means(steps: list[StepRecord], window_s: float,
                   field: str) -> list[float | None]:
    """Mean of a measurement field over the windows ending in ``(t_i - window_s, t_i]`` for each
    step ``i`` (weighted by window length; None where the field was never measured)."""
    out: list[float | None] = []
    acc = acc_w = 0.0
    j = 0
    for s in steps:
        m = s.measurement
        v = getattr(m, field)
        if v is not None:
            acc += v * m.window_s
            acc_w += m.window_s
        while steps[j].t_s <= s.t_s - window_s:
            mj = steps[j].measurement
            vj = getattr(mj, field)
            if vj is not None:
                acc -= vj * mj.window_s
                acc_w -= mj.window_s
            j += 1
        out.append(acc / acc_w if acc_w > 1e-12 else None)
    return out


def binding_windows(record: RunRecord, reference: RunRecord, *,
                    window_s: float = 10.0) -> np.ndarray:
    """Per step of ``record``: True where a power budget is in force and ``reference``'s power,
    averaged over the trailing ``window_s``, exceeds it (see the module doc)."""
    sps = window_setpoints(record.steps)
    ref_t = np.array([s.t_s for s in reference.steps], dtype=float)
    ref_p = trailing_means(reference.steps, window_s, "power_w")
    out = np.zeros(len(record.steps), dtype=bool)
    if not reference.steps:
        return out
    for i, (st, sp) in enumerate(zip(record.steps, sps)):
        if sp.power_budget_w is None:
            continue
        k = min(max(int(np.searchsorted(ref_t, st.t_s - 1e-9)), 0), len(ref_t) - 1)
        p = ref_p[k]
        out[i] = p is not None and p > sp.power_budget_w
    return out


def _thrash(steps: list[StepRecord], duration_s: float) -> tuple[float | None, float | None]:
    """(batch changes, cap reversals) per 100 s of run."""
    if duration_s <= 0:
        return None, None
    batches = [s.applied.max_batch for s in steps]
    changes = sum(1 for a, b in zip(batches, batches[1:])
                  if a is not None and b is not None and a != b)
    caps = [s.applied.power_cap_w for s in steps if s.applied.power_cap_w is not None]
    return 100.0 * changes / duration_s, 100.0 * _reversals(caps, 0.5) / duration_s


def _reversals(values: list[float], min_move: float) -> int:
    """Changes of direction of a series (moves under ``min_move`` ignored)."""
    moves = [b - a for a, b in zip(values, values[1:]) if abs(b - a) >= min_move]
    return sum(1 for a, b in zip(moves, moves[1:]) if (a > 0) != (b > 0))


def _counter_power(steps: list[StepRecord]) -> np.ndarray:
    """Each window's mean power from the energy counter's increase (the reading where the
    counter cannot be differenced: see the module doc)."""
    out = np.array([s.measurement.power_w for s in steps], dtype=float)
    for i in range(1, len(steps)):
        m, prev = steps[i].measurement, steps[i - 1].measurement
        if m.window_s > 0 and not m.stale and not prev.stale:
            de = m.energy_j - prev.energy_j
            if math.isfinite(de) and de >= 0:
                out[i] = de / m.window_s
    return out


def _over_budget(power_w: np.ndarray, sps: list[Setpoint],
                 budget_tolerance: float) -> np.ndarray:
    """Windows whose power is over their budget by more than the tolerance band."""
    band = 1.0 + budget_tolerance
    return np.array([sp.power_budget_w is not None and p > sp.power_budget_w * band
                     for p, sp in zip(power_w, sps)], dtype=bool)


def _rate(mask: np.ndarray, where: np.ndarray) -> float | None:
    return float(mask[where].mean()) if where.any() else None


def summarize(record: RunRecord, *, reference: RunRecord | None = None,
              budget_tolerance: float = 0.01, throughput_tolerance: float = 0.05,
              backlog_window_s: float = 5.0, settle_window_s: float = 10.0) -> dict[str, Any]:
    """Every metric of a run as a JSON-serialisable dict (definitions in the module doc).

    Parameters
    ----------
    record : RunRecord
        The run to score.
    reference : RunRecord, optional
        The same workload and seed run by the deployment without power management (`static`):
        it tells binding from loose budget stretches.
    budget_tolerance, throughput_tolerance : float
        Relative bands of the over-budget and shortfall tests.
    backlog_window_s, settle_window_s : float
        Trailing windows of the shortfall and settling tests, seconds.

    Returns
    -------
    dict
        Metric name (unit in the name) -> value; None where a metric does not apply.
    """
    steps = record.steps
    sps = window_setpoints(steps)
    n = len(steps)
    w = np.array([s.measurement.window_s for s in steps], dtype=float)
    p = np.array([s.measurement.power_w for s in steps], dtype=float)
    x = np.array([s.measurement.throughput_tok_s for s in steps], dtype=float)

    duration_s = float(w.sum())
    energy_j = float((p * w).sum())
    tokens = float((x * w).sum())

    over = _over_budget(p, sps, budget_tolerance)
    over_counter = _over_budget(_counter_power(steps), sps, budget_tolerance)
    excess_j = 0.0
    shortfall = np.zeros(n, dtype=bool)
    latency_bad = np.zeros(n, dtype=bool)
    track_err: list[float] = []
    track_tgt: list[float] = []
    # trailing window (t_i - backlog_window_s, t_i]: persistent backlog and mean throughput
    t_arr = np.array([s.t_s for s in steps], dtype=float)
    wait_arr = np.array([s.measurement.waiting > 0 for s in steps], dtype=bool)
    cw_all = np.concatenate([[0.0], np.cumsum(w)])
    cx_all = np.concatenate([[0.0], np.cumsum(x * w)])
    cq_all = np.concatenate([[0], np.cumsum(~wait_arr)])  # windows with no backlog
    lo_i = 0
    for i, (s, sp) in enumerate(zip(steps, sps)):
        m = s.measurement
        while lo_i < i and t_arr[lo_i] <= t_arr[i] - backlog_window_s:
            lo_i += 1
        if over[i] and sp.power_budget_w is not None:
            excess_j += (m.power_w - sp.power_budget_w) * m.window_s
        if sp.throughput_tok_s is not None and cq_all[i + 1] - cq_all[lo_i] == 0:
            span = cw_all[i + 1] - cw_all[lo_i]
            x_mean = (cx_all[i + 1] - cx_all[lo_i]) / span if span > 1e-12 else x[i]
            shortfall[i] = x_mean < (1 - throughput_tolerance) * sp.throughput_tok_s
        if (sp.tpot_slo_s is not None and m.tpot_p90_s is not None
                and m.tpot_p90_s > sp.tpot_slo_s) \
                or (sp.ttft_slo_s is not None and m.ttft_p90_s is not None
                    and m.ttft_p90_s > sp.ttft_slo_s):
            latency_bad[i] = True
        if sp.power_target_w is not None:
            track_err.append(abs(m.power_w - sp.power_target_w))
            track_tgt.append(sp.power_target_w)

    # settling after each budget / target step
    t_end = np.array([s.t_s for s in steps], dtype=float)
    budget_w = np.array([np.nan if sp.power_budget_w is None else sp.power_budget_w for sp in sps])

    def out_of_spec(e: int, end: int) -> np.ndarray:
        # trailing means within the segment [e, end)
        bad = np.zeros(end - e, dtype=bool)
        cw = np.concatenate([[0.0], np.cumsum(w[e:end])])
        ce = np.concatenate([[0.0], np.cumsum((p * w)[e:end])])
        lo = 0
        for k in range(end - e):
            while t_end[e + lo] <= t_end[e + k] - settle_window_s:
                lo += 1
            span = cw[k + 1] - cw[lo]
            pm = (ce[k + 1] - ce[lo]) / span
            i = e + k
            b = budget_w[i]
            bad[k] = (b == b and pm > b * (1 + budget_tolerance)) or shortfall[i]
        return bad

    events = [i for i in range(1, n)
              if _changed(sps[i].power_budget_w, sps[i - 1].power_budget_w)
              or _changed(sps[i].throughput_tok_s, sps[i - 1].throughput_tok_s)]
    settling: list[float] = []
    unsettled = 0
    for j, e in enumerate(events):
        end = events[j + 1] if j + 1 < len(events) else n
        t_e = steps[e].t_s - steps[e].measurement.window_s
        off_spec = [e + k for k in np.flatnonzero(out_of_spec(e, end))]
        if not off_spec:
            settling.append(0.0)
        else:
            settling.append(float(steps[off_spec[-1]].t_s - t_e))
            if off_spec[-1] == end - 1:
                unsettled += 1

    # request-level SLOs
    slo_attainment = None
    ttfts = [r.ttft_s for r in record.requests]
    tpots = [r.tpot_s for r in record.requests if r.output_tokens > 1]
    if record.requests and any(sp.tpot_slo_s is not None or sp.ttft_slo_s is not None
                               for sp in sps):
        times = np.array([s.t_s for s in steps]) if steps else np.zeros(0)
        ok = 0
        for r in record.requests:
            # setpoint in force at arrival: the last decision at or before the arrival
            k = int(np.searchsorted(times, r.arrival_s, side="right")) - 1
            sp = steps[k].setpoint if k >= 0 else (steps[0].setpoint if steps else Setpoint())
            good = (sp.ttft_slo_s is None or r.ttft_s <= sp.ttft_slo_s) and \
                (sp.tpot_slo_s is None or r.output_tokens <= 1 or r.tpot_s <= sp.tpot_slo_s)
            ok += good
        slo_attainment = ok / len(record.requests)

    lat = [s.step_latency_s for s in steps]
    caps = [s.applied.power_cap_w for s in steps if s.applied.power_cap_w is not None]
    batches = [s.applied.max_batch for s in steps if s.applied.max_batch is not None]
    has_target = any(sp.throughput_tok_s is not None for sp in sps)
    has_latency_slo = any(sp.tpot_slo_s is not None or sp.ttft_slo_s is not None for sp in sps)
    bch, crev = _thrash(steps, duration_s)
    late = over.copy()
    late_counter = over_counter.copy()
    for i in range(n):  # the first window is one after a cut: the plant starts at its own cap
        b0, b1 = (sps[i - 1].power_budget_w if i else None), sps[i].power_budget_w
        if b1 is not None and (b0 is None or b1 < b0):
            late[i] = late_counter[i] = False
    bad = shortfall | latency_bad
    split: dict[str, Any] = {"binding_fraction": None, "qos_violation_rate_binding": None,
                             "qos_violation_rate_loose": None,
                             "throughput_violation_rate_binding": None,
                             "throughput_violation_rate_loose": None}
    if reference is not None and n:
        bind = binding_windows(record, reference, window_s=settle_window_s)
        split["binding_fraction"] = float(bind.mean())
        if has_target or has_latency_slo:
            split["qos_violation_rate_binding"] = _rate(bad, bind)
            split["qos_violation_rate_loose"] = _rate(bad, ~bind)
        if has_target:
            split["throughput_violation_rate_binding"] = _rate(shortfall, bind)
            split["throughput_violation_rate_loose"] = _rate(shortfall, ~bind)
    summary: dict[str, Any] = {
        "controller": record.controller,
        "tokens_per_joule": tokens / energy_j if energy_j > 0 else None,
        "qos_violation_rate": float((shortfall | latency_bad).mean())
        if n and (has_target or has_latency_slo) else None,
        "throughput_shortfall_rate": float(shortfall.mean()) if n and has_target else None,
        "throughput_violation_rate": float(shortfall.mean()) if n and has_target else None,
        "latency_violation_rate": float(latency_bad.mean()) if n and has_latency_slo else None,
        "slo_attainment": slo_attainment,
        "time_over_budget_s": float(w[over].sum()),
        "time_over_budget_late_s": float(w[late].sum()),
        "time_over_budget_counter_s": float(w[over_counter].sum()),
        "time_over_budget_late_counter_s": float(w[late_counter].sum()),
        "energy_over_budget_j": float(excess_j),
        "settling_time_s": max(settling) if settling else None,
        "settling_times_s": settling,
        "unsettled_steps": unsettled,
        "energy_j": energy_j,
        "generated_tokens": tokens,
        "duration_s": duration_s,
        "mean_power_w": energy_j / duration_s if duration_s > 0 else None,
        "mean_throughput_tok_s": tokens / duration_s if duration_s > 0 else None,
        "power_tracking_mae_w": float(np.mean(track_err)) if track_err else None,
        "power_tracking_rel_error": float(np.mean(track_err) / np.mean(track_tgt))
        if track_err and np.mean(track_tgt) > 0 else None,
        "completed_requests": len(record.requests),
        "request_ttft_p90_s": _pct(ttfts, 90),
        "request_tpot_p90_s": _pct(tpots, 90),
        "mean_power_cap_w": float(np.mean(caps)) if caps else None,
        "mean_max_batch": float(np.mean(batches)) if batches else None,
        "guard_interventions": sum(1 for s in steps if s.guard_note),
        # steps where the guard held a safe action (stale/invalid data, controller failure)
        "safe_holds": sum(1 for s in steps if "hold safe cap" in s.guard_note),
        "stale_steps": sum(1 for s in steps if s.measurement.stale),
        "step_latency_p50_s": _pct(lat, 50),
        "step_latency_p99_s": _pct(lat, 99),
        "batch_changes_per_100s": bch,
        "cap_reversals_per_100s": crev,
        "budget_reversals_per_100s": (100.0 * _reversals(
            [sp.power_budget_w for sp in sps if sp.power_budget_w is not None], 0.5)
            / duration_s) if duration_s > 0 else None,
        **split,
        "steps": n,
        "dt_s": record.dt_s,
    }
    for key, v in summary.items():  # JSON has no NaN/inf
        if isinstance(v, float) and not math.isfinite(v):
            summary[key] = None
    return summary
