"""Figures of a recorded run (matplotlib, Agg backend, imported only when plotting)."""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from palsctl.loop import RunRecord
from palsctl.metrics import trailing_means, window_setpoints

__all__ = ["latency_violations", "plot_overlay", "plot_timeline", "timeline_figure"]

_BASELINE_STYLES = (("0.35", "--"), ("C4", ":"), ("C5", "-."), ("C8", "--"))


def latency_violations(record: RunRecord) -> list[bool]:
    """Per step: the window's p90 TPOT or TTFT exceeded the SLO in force during it (the
    latency part of `palsctl.metrics.summarize`'s QoS violation)."""
    out = []
    for s, sp in zip(record.steps, window_setpoints(record.steps)):
        m = s.measurement
        out.append(bool((sp.tpot_slo_s is not None and m.tpot_p90_s is not None
                         and m.tpot_p90_s > sp.tpot_slo_s)
                        or (sp.ttft_slo_s is not None and m.ttft_p90_s is not None
                            and m.ttft_p90_s > sp.ttft_slo_s)))
    return out


def _spans(record: RunRecord, flags: list[bool]) -> list[tuple[float, float]]:
    """Merge flagged windows ``(t_i - window_s, t_i]`` into ``(start_s, end_s)`` spans."""
    spans: list[tuple[float, float]] = []
    for s, bad in zip(record.steps, flags):
        if not bad:
            continue
        a, b = s.t_s - s.measurement.window_s, s.t_s
        if spans and a <= spans[-1][1] + 1e-9:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return spans


def _none_to_nan(values) -> list[float]:
    return [math.nan if v is None else v for v in values]


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (110 dpi) to ``path``, creating its folder; close it."""
    import matplotlib.pyplot as plt

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def _align_slos(ax_l, ax_r, left, right, left_slo, right_slo, most: float = 4.0) -> None:
    """Scale both latency axes so that their SLO lines lie at the same height (a line above it
    violates, whichever axis it uses), showing up to ``most`` times the SLO."""
    ls = max((v for v in left_slo if v is not None), default=None)
    rs = max((v for v in right_slo if v is not None), default=None)
    if not ls or not rs:
        ax_l.set_ylim(bottom=0)
        ax_r.set_ylim(bottom=0)
        return
    peak = max([v / ls for v in left if v is not None and math.isfinite(v)]
               + [v / rs for v in right if v is not None and math.isfinite(v)] + [1.0])
    k = min(peak, most) * 1.05
    ax_l.set_ylim(0, k * ls)
    ax_r.set_ylim(0, k * rs)


def plot_timeline(record: RunRecord, path: str | Path, *, title: str | None = None,
                  baselines: dict[str, RunRecord] | None = None,
                  qos_window_s: float = 30.0) -> Path:
    """`timeline_figure` written as a PNG to ``path`` (folders created); returns the path."""
    return _save(timeline_figure(record, title=title, baselines=baselines,
                                 qos_window_s=qos_window_s), path)


def timeline_figure(record: RunRecord, *, title: str | None = None,
                    baselines: dict[str, RunRecord] | None = None,
                    qos_window_s: float = 30.0):
    """Draw four stacked panels over time (s), for a simulated or a real run.

    1. power of all GPUs (W) against the budget and power target;
    2. generated tokens/s (per window and its ``qos_window_s`` trailing mean) against the
       target and the offered demand;
    3. latency: the windows' p90 time per output token (left axis, s) and p90 time to first
       token (right axis, s) against their SLOs, windows that violate an SLO shaded;
    4. the knobs: power cap per GPU (left axis, W), batch limit and running sequences (right).

    ``baselines`` (name -> `RunRecord` on the same workload and seed) are overlaid as dashed
    lines in the power and throughput panels. Each legend entry says which axis it uses where a
    panel has two. Returns the matplotlib Figure (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = baselines or {}
    steps = record.steps
    sps = window_setpoints(steps)
    t = [s.t_s for s in steps]
    m = [s.measurement for s in steps]
    name = record.controller or "controller"
    fig, axes = plt.subplots(4, 1, figsize=(11, 10.5), sharex=True, constrained_layout=True)

    ax = axes[0]
    ax.plot(t, [x.power_w for x in m], lw=0.8, color="C0", label=f"{name} power")
    for (bname, rec), (col, ls) in zip(baselines.items(), itertools.cycle(_BASELINE_STYLES)):
        ax.plot([s.t_s for s in rec.steps], [s.measurement.power_w for s in rec.steps], lw=0.8,
                color=col, ls=ls, label=f"{bname} power")
    if any(sp.power_budget_w is not None for sp in sps):
        ax.step(t, _none_to_nan(sp.power_budget_w for sp in sps), where="pre", color="C3",
                lw=1.5, label="budget")
    if any(sp.power_target_w is not None for sp in sps):
        ax.step(t, _none_to_nan(sp.power_target_w for sp in sps), where="pre", color="C2",
                lw=1.2, ls="--", label="power target")
    ax.set_ylabel("power, all GPUs (W)")
    ax.legend(loc="lower left", fontsize=7, ncol=3, framealpha=0.8)

    ax = axes[1]
    ax.plot(t, [x.throughput_tok_s for x in m], lw=0.5, alpha=0.3, color="C0",
            label=f"{name} (per window)")
    ax.plot(t, _none_to_nan(trailing_means(steps, qos_window_s, "throughput_tok_s")), lw=1.3,
            color="C0", label=f"{name} ({qos_window_s:g} s mean)")
    for (bname, rec), (col, ls) in zip(baselines.items(), itertools.cycle(_BASELINE_STYLES)):
        ax.plot([s.t_s for s in rec.steps],
                _none_to_nan(trailing_means(rec.steps, qos_window_s, "throughput_tok_s")),
                lw=1.0, color=col, ls=ls, label=f"{bname} ({qos_window_s:g} s mean)")
    if any(x.demand_tok_s is not None for x in m):
        ax.plot(t, _none_to_nan(trailing_means(steps, qos_window_s, "demand_tok_s")), lw=1.0,
                color="C7", label=f"offered demand ({qos_window_s:g} s mean)")
    if any(sp.throughput_tok_s is not None for sp in sps):
        ax.step(t, _none_to_nan(sp.throughput_tok_s for sp in sps), where="pre", color="C3",
                lw=1.5, label="target")
    ax.set_ylabel("generated tokens/s")
    ax.legend(loc="upper left", fontsize=7, ncol=3, framealpha=0.8)

    ax = axes[2]
    ax_r = ax.twinx()
    bad = _spans(record, latency_violations(record))
    for i, (a, b) in enumerate(bad):
        ax.axvspan(a, b, color="C3", alpha=0.15, lw=0,
                   label="window over an SLO" if i == 0 else None)
    ax.plot(t, _none_to_nan(x.tpot_p90_s for x in m), lw=0.8, color="C0",
            label="p90 time per output token (left axis)")
    if any(sp.tpot_slo_s is not None for sp in sps):
        ax.step(t, _none_to_nan(sp.tpot_slo_s for sp in sps), where="pre", color="C0", ls="--",
                lw=1.3, label="TPOT SLO (left axis)")
    ax_r.plot(t, _none_to_nan(x.ttft_p90_s for x in m), lw=0.8, color="C1",
              label="p90 time to first token (right axis)")
    if any(sp.ttft_slo_s is not None for sp in sps):
        ax_r.step(t, _none_to_nan(sp.ttft_slo_s for sp in sps), where="pre", color="C1",
                  ls="--", lw=1.3, label="TTFT SLO (right axis)")
    ax.set_ylabel("p90 TPOT (s)", color="C0")
    ax_r.set_ylabel("p90 TTFT (s)", color="C1")
    _align_slos(ax, ax_r, [x.tpot_p90_s for x in m], [x.ttft_p90_s for x in m],
                [sp.tpot_slo_s for sp in sps], [sp.ttft_slo_s for sp in sps])
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax_r.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=7, ncol=3, framealpha=0.8)

    ax = axes[3]
    ax.step(t, _none_to_nan(s.applied.power_cap_w for s in steps), where="post", color="C0",
            label="cap per GPU (left axis)")
    ax.set_ylabel("power cap per GPU (W)", color="C0")
    ax.set_xlabel("time (s)")
    ax_r = ax.twinx()
    ax_r.step(t, _none_to_nan(s.applied.max_batch for s in steps), where="post", color="C1",
              label="batch limit (right axis)")
    ax_r.plot(t, [x.running for x in m], lw=0.5, color="C1", alpha=0.4,
              label="running sequences (right axis)")
    ax_r.set_ylabel("sequences", color="C1")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax_r.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower left", fontsize=7, ncol=3, framealpha=0.8)

    info = record.plant_info
    head = title or (f"{name} — {info.model} on {info.num_gpus} × {info.gpu}"
                     if info else name)
    if baselines and not title:
        head += f" (dashed: {', '.join(baselines)}, same workload and seed)"
    fig.suptitle(head)
    return fig


def plot_overlay(records: dict[str, Any], path: Any, *, title: str | None = None) -> Any:
    """One figure, four panels (power vs budget, throughput vs target, cap, batch), one line per
    controller: ``records`` maps a controller name to one `RunRecord`."""
    import matplotlib

    matplotlib.use("Agg")

    import matplotlib.pyplot as plt

    from palsctl.metrics import window_setpoints

    fig, ax = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    first = True
    for name, rec in records.items():
        t = [s.t_s for s in rec.steps]
        ax[0].plot(t, [s.measurement.power_w for s in rec.steps], lw=0.8, label=name)
        ax[1].plot(t, [s.measurement.throughput_tok_s for s in rec.steps], lw=0.8, label=name)
        ax[2].plot(t, [s.applied.power_cap_w for s in rec.steps], lw=0.8, label=name)
        ax[3].plot(t, [s.applied.max_batch for s in rec.steps], lw=0.8, label=name)
        if first:
            sps = window_setpoints(rec.steps)
            b = [sp.power_budget_w if sp.power_budget_w is not None else math.nan for sp in sps]
            x = [sp.throughput_tok_s if sp.throughput_tok_s is not None else math.nan
                 for sp in sps]
            ax[0].plot(t, b, "k--", lw=1.2, label="budget")
            ax[1].plot(t, x, "k--", lw=1.2, label="target")
            first = False
    for a, lab in zip(ax, ("power (W, total)", "throughput (tok/s)", "cap per GPU (W)",
                           "max batch")):
        a.set_ylabel(lab)
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=7, ncol=5, loc="upper right")
    ax[-1].set_xlabel("time (s)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_pareto(result: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """The energy-QoS plane of `palsctl.experiment.compare.pareto`: one marker per (controller,
    setting), lines joining a controller's settings, frontier points ringed and joined; the QoS
    axis is linear below 1 % and logarithmic above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    pts = result["points"]
    for name in dict.fromkeys(p["controller"] for p in pts):
        mine = [p for p in pts if p["controller"] == name]
        xs = [100 * p["qos_violation_rate"] for p in mine]
        ys = [p["tokens_per_joule"] for p in mine]
        if name == "static":
            ax.scatter(xs, ys, s=14, c="0.6", marker="s", label="static (cap, batch) grid")
        else:
            ax.plot(xs, ys, "-o", ms=5, lw=1, label=name)
    front = sorted((100 * p["qos_violation_rate"], p["tokens_per_joule"]) for p in pts
                   if p["on_frontier"])
    if front:
        ax.plot([f[0] for f in front], [f[1] for f in front], "k--", lw=0.8, label="frontier")
        ax.scatter([f[0] for f in front], [f[1] for f in front], s=90, facecolors="none",
                   edgecolors="k", lw=1)
    # linear up to 1 %, logarithmic beyond: the settings worth deploying sit within a point of
    # zero while a static grid's spans to 100 %
    ax.set_xscale("symlog", linthresh=1.0, linscale=1.5)
    ax.set_xlim(left=-0.05)
    ax.set_xlabel("QoS violation rate (% of control windows; linear below 1 %, log above)")
    ax.set_ylabel("tokens per joule")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)
