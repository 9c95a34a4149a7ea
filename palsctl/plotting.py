"""Figures of a recorded run (matplotlib, Agg backend, imported only when plotting)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from palsctl.loop import RunRecord
from palsctl.metrics import trailing_means, window_setpoints


def plot_timeline(record: RunRecord, path: str | Path, *, title: str | None = None,
                  qos_window_s: float = 30.0) -> Path:
    """Three stacked panels over time: power vs budget (and power target), throughput vs
    target and offered demand (also as the trailing means the QoS metric uses), cap and batch
    applied. Writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = record.steps
    sps = window_setpoints(steps)
    t = [s.t_s for s in steps]
    m = [s.measurement for s in steps]
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True, constrained_layout=True)

    ax = axes[0]
    ax.plot(t, [x.power_w for x in m], lw=0.8, label="power (all GPUs)")
    if any(sp.power_budget_w is not None for sp in sps):
        ax.step(t, [sp.power_budget_w for sp in sps], where="pre", color="C3", lw=1.5,
                label="budget")
    if any(sp.power_target_w is not None for sp in sps):
        ax.step(t, [sp.power_target_w for sp in sps], where="pre", color="C2", lw=1.2, ls="--",
                label="power target")
    ax.set_ylabel("power (W)")
    ax.legend(loc="lower left", fontsize=8)

    ax = axes[1]
    ax.plot(t, [x.throughput_tok_s for x in m], lw=0.5, alpha=0.35, color="C0",
            label="throughput (per window)")
    ax.plot(t, trailing_means(steps, qos_window_s, "throughput_tok_s"), lw=1.3, color="C0",
            label=f"throughput ({qos_window_s:g} s mean)")
    if any(x.demand_tok_s is not None for x in m):
        ax.plot(t, trailing_means(steps, qos_window_s, "demand_tok_s"), lw=1.0, color="C7",
                label=f"offered demand ({qos_window_s:g} s mean)")
    if any(sp.throughput_tok_s is not None for sp in sps):
        ax.step(t, [sp.throughput_tok_s for sp in sps], where="pre", color="C3", lw=1.5,
                label="target")
    ax.set_ylabel("generated tok/s")
    ax.legend(loc="upper left", fontsize=7, ncol=4, framealpha=0.8)

    ax = axes[2]
    ax.step(t, [s.applied.power_cap_w for s in steps], where="post", color="C0",
            label="cap per GPU")
    ax.set_ylabel("power cap (W)")
    ax.set_xlabel("time (s)")
    ax2 = ax.twinx()
    ax2.step(t, [s.applied.max_batch for s in steps], where="post", color="C1", label="max batch")
    ax2.plot(t, [x.running for x in m], lw=0.5, color="C1", alpha=0.4, label="running")
    ax2.set_ylabel("batch (sequences)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower left", fontsize=8)

    info = record.plant_info
    head = title or (f"{record.controller} — {info.model} on {info.num_gpus} × {info.gpu}"
                     if info else record.controller)
    fig.suptitle(head)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_overlay(records: dict[str, Any], path: Any, *, title: str | None = None) -> Any:
    """One figure, four panels (power vs budget, throughput vs target, cap, batch), one line per
    controller: ``records`` maps a controller name to one `RunRecord`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

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
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
