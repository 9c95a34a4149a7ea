"""Figures of a fitted power-performance model (matplotlib, Agg backend, imported on use)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["efficient_frontier", "plot_model"]


def efficient_frontier(throughput_tok_s: np.ndarray, tokens_per_joule: np.ndarray) -> np.ndarray:
    """Indices of the configurations no other beats in both throughput and tokens/J (Pareto
    set), ordered by increasing throughput."""
    thr = np.asarray(throughput_tok_s, float).ravel()
    tpj = np.asarray(tokens_per_joule, float).ravel()
    order = np.argsort(-thr, kind="stable")
    keep, best = [], -np.inf
    for i in order:
        if tpj[i] > best:
            keep.append(i)
            best = tpj[i]
    return np.array(keep[::-1], dtype=int)


def plot_model(model, rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Four panels: measured vs predicted throughput and power on the profiled points; the
    predicted tokens/J over (cap, batch) with the profiled points and the efficient frontier;
    throughput vs tokens/J of the candidate grid with the frontier. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from palsctl.models.power_perf import _column

    cap = _column(rows, "power_cap_w")
    b = _column(rows, "max_batch")
    ok = np.isfinite(cap) & np.isfinite(b)
    meas_t = _column(rows, "throughput_tok_s")[ok]
    meas_p = _column(rows, "power_w")[ok]
    pred = model.predict(power_cap_w=cap[ok], max_batch=b[ok])

    (clo, chi) = model.training_ranges["power_cap_w"]
    (blo, bhi) = model.training_ranges["max_batch"]
    caps = np.linspace(clo, chi, 61)
    batches = np.unique(np.round(np.geomspace(max(blo, 1.0), bhi, 40)))
    C, B = np.meshgrid(caps, batches, indexing="ij")
    g = model.predict(power_cap_w=C, max_batch=B)
    front = efficient_frontier(g.throughput_tok_s, g.tokens_per_joule)

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), constrained_layout=True)
    for ax, meas, pr, name in ((axes[0, 0], meas_t, pred.throughput_tok_s, "throughput (tok/s)"),
                               (axes[0, 1], meas_p, pred.power_w, "power, all GPUs (W)")):
        ax.scatter(meas, pr, s=18)
        lim = [0.95 * min(meas.min(), pr.min()), 1.05 * max(meas.max(), pr.max())]
        ax.plot(lim, lim, color="k", lw=0.8)
        ax.set_xlabel(f"measured {name}")
        ax.set_ylabel(f"predicted {name}")
        key = "throughput_tok_s" if "throughput" in name else "power_w"
        cv = model.cv_mape.get(key)
        ax.set_title(f"{name}: CV MAPE {cv:.1%}" if cv is not None and np.isfinite(cv) else name)

    ax = axes[1, 0]
    mesh = ax.pcolormesh(C, B, g.tokens_per_joule, shading="auto", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="predicted tokens/J")
    ax.scatter(cap[ok], b[ok], s=20, c="w", edgecolors="k", label="profiled points")
    ax.plot(C.ravel()[front], B.ravel()[front], "r.", ms=5, label="efficient frontier")
    ax.set_yscale("log", base=2)
    ax.set_ylim(batches[0], batches[-1])
    ax.set_xlabel("power cap per GPU (W)")
    ax.set_ylabel("max batch")
    ax.set_title("tokens per joule over (cap, batch)")
    ax.legend(loc="lower right", fontsize=8)

    ax = axes[1, 1]
    ax.scatter(g.throughput_tok_s, g.tokens_per_joule, s=4, alpha=0.3, color="C7",
               label="candidates")
    ax.plot(g.throughput_tok_s.ravel()[front], g.tokens_per_joule.ravel()[front], "r-", lw=1.5,
            label="efficient frontier")
    ax.scatter(meas_t, meas_t / meas_p, s=18, color="C0", label="measured")
    ax.set_xlabel("throughput (tok/s)")
    ax.set_ylabel("tokens/J")
    ax.legend(fontsize=8)
    plant = model.plant
    fig.suptitle(f"{model.kind} power-performance model: {plant.get('model', '?')} on "
                 f"{model.num_gpus} x {plant.get('gpu', '?')}")
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
