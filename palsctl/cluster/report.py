"""Scoring and writing a fleet run: the site summary, per-pool summaries, the site timeline.

Site metrics (``P`` site power: the sum of the replicas' window-mean power — a dead replica's
last reading holds, its GPUs keeping their cap —, ``B`` the site budget in force during the
window, ``w`` = ``dt_s``):

* ``energy_j``, ``generated_tokens``, ``tokens_per_joule``: sums over replicas;
* ``qos_violation_rate``: the fraction of replica-windows in violation (each replica scored by
  `palsctl.metrics.summarize` against its own target and SLOs);
* ``time_over_budget_s`` / ``energy_over_budget_j``: windows with ``P > B·(1 + 1 %)`` and the
  excess energy in them; ``time_over_budget_after_step_s``: the same, not counting the first
  allocation period after each budget change (the protocol's promise);
  ``max_shares_over_budget_w``: the largest excess of the granted shares' sum over the budget,
  and ``max_caps_over_budget_w`` the same for the sum of the caps (caps × GPUs);
* tracking mode: ``power_tracking_mae_w`` and ``power_tracking_rel_error`` against the site
  target;
* ``allocation_ms_p50`` / ``allocation_ms_p99``: time of one `allocate` call.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["summarize_fleet", "plot_site_timeline", "write_fleet_outputs"]

_TOL = 0.01


def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _aggregate(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    energy = sum(s.get("energy_j") or 0.0 for s in summaries)
    tokens = sum(s.get("generated_tokens") or 0.0 for s in summaries)
    steps = [s.get("steps") or 0 for s in summaries]
    out: dict[str, Any] = {
        "replicas": len(summaries),
        "energy_j": energy,
        "generated_tokens": tokens,
        "tokens_per_joule": tokens / energy if energy > 0 else None,
    }
    for key in ("qos_violation_rate", "throughput_shortfall_rate", "latency_violation_rate",
                "slo_attainment"):
        weighted = [(s.get(key),
                     n if key != "slo_attainment" else s.get("completed_requests") or 0)
                    for s, n in zip(summaries, steps)]
        vals = [(v, n) for v, n in weighted if v is not None and n]
        tot = sum(n for _, n in vals)
        out[key] = sum(v * n for v, n in vals) / tot if tot else None
    reqs = sum(s.get("completed_requests") or 0 for s in summaries)
    out["completed_requests"] = reqs
    dur = max((s.get("duration_s") or 0.0 for s in summaries), default=0.0)
    out["mean_power_w"] = energy / dur if dur > 0 else None
    out["mean_throughput_tok_s"] = tokens / dur if dur > 0 else None
    return out


def summarize_fleet(result: Any) -> dict[str, Any]:
    """Summarise a fleet run for the site (definitions in the module doc).

    Parameters
    ----------
    result : FleetResult
        The run.

    Returns
    -------
    dict
        Metric name (unit in the name) -> value.
    """
    reps = result.replicas
    site = _aggregate([r.summary for r in reps])
    dt = result.dt_s
    p, b = np.asarray(result.power_w), np.asarray(result.budget_w)
    out: dict[str, Any] = {"name": result.name, "policy": result.policy,
                           "engine": result.engine, **site}
    if result.tracking:
        err = np.abs(p - b)
        out["power_tracking_mae_w"] = float(err.mean()) if err.size else None
        out["power_tracking_rel_error"] = float(err.mean() / b.mean()) if b.mean() > 0 else None
        out.update(time_over_budget_s=None, energy_over_budget_j=None,
                   time_over_budget_after_step_s=None, max_shares_over_budget_w=None,
                   max_caps_over_budget_w=None)
    else:
        over = p > b * (1 + _TOL)
        out["time_over_budget_s"] = float(over.sum() * dt)
        out["energy_over_budget_j"] = float(((p - b) * over).sum() * dt)
        # windows within one period after a budget change are the protocol's grace
        period = max(1, round(result.meta.get("period_s", dt) / dt))
        grace = np.zeros(b.size, dtype=bool)
        for i in np.flatnonzero(np.abs(np.diff(b)) > 1e-9 * np.maximum(b[1:], 1.0)) + 1:
            grace[i:i + period] = True
        out["time_over_budget_after_step_s"] = float((over & ~grace).sum() * dt)
        out["max_shares_over_budget_w"] = float(max(0.0, np.max(result.shares_w - b)))
        caps = np.asarray(result.caps_w)
        out["max_caps_over_budget_w"] = float(max(0.0, np.nanmax(caps[1:] - b[1:]))) \
            if caps.size > 1 else 0.0
        out["power_tracking_mae_w"] = out["power_tracking_rel_error"] = None
    al = np.asarray(result.allocation_s) * 1e3
    out["allocation_ms_p50"] = float(np.percentile(al, 50)) if al.size else None
    out["allocation_ms_p99"] = float(np.percentile(al, 99)) if al.size else None
    out["ticks"] = len(result.ticks)
    out["wall_s"] = result.wall_s
    out["duration_s"] = float(result.t_s[-1]) if len(result.t_s) else 0.0
    by = {r.name: r for r in reps}
    pools = {}
    pool_power = result.pool_power_w()
    for pool, names in result.pools.items():
        ps = _aggregate([by[n].summary for n in names])
        ps["mean_site_power_share"] = float(pool_power[pool].mean() / p.mean()) \
            if p.mean() > 0 else None
        pools[pool] = ps
    out["pools"] = pools
    out["dead_replicas"] = [r.name for r in reps if not r.alive]
    for k, v in list(out.items()):
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
    return out


def plot_site_timeline(result: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Plot power per pool against the site budget, the shares' sum and the sum of caps.

    Parameters
    ----------
    result : FleetResult
        The run.
    path : str or Path
        The PNG to write.
    title : str or None
        The figure's title.

    Returns
    -------
    Path
        The file written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(result.t_s)
    pp = result.pool_power_w()
    fig, ax = plt.subplots(figsize=(11, 4.5), constrained_layout=True)
    ax.stackplot(t, *[pp[k] for k in pp], labels=list(pp), alpha=0.8, step="pre")
    lab = "site power target" if result.tracking else "site budget"
    ax.step(t, result.budget_w, where="pre", color="k", lw=1.6, label=lab)
    ax.step(t, result.shares_w, where="pre", color="C3", lw=0.9, ls="--",
            label="granted shares (sum)")
    if not result.tracking:
        ax.step(t, result.caps_w, where="pre", color="C7", lw=0.8, ls=":",
                label="caps x GPUs (sum)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("power (W)")
    ax.set_title(title or f"{result.name}: {result.policy} allocation ({result.engine})")
    ax.legend(loc="lower left", fontsize=8, ncol=3, framealpha=0.85)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_fleet_outputs(result: Any, out: str | Path, *, plot: bool = True) -> list[Path]:
    """Write a fleet run's files.

    Per replica ``replicas/<name>/steps.csv``; ``summary.json``, ``site.csv`` (the site timeline)
    and ``site_timeline.png``.

    Parameters
    ----------
    result : FleetResult
        The run.
    out : str or Path
        The results folder.
    plot : bool, default True
        Also write the PNG.

    Returns
    -------
    list of Path
        The files written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for r in result.replicas:
        if r.record is not None:
            written.append(r.record.write_csv(out / "replicas" / r.name / "steps.csv"))
    summary = summarize_fleet(result)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    written.append(out / "summary.json")
    pp = result.pool_power_w()
    lines = ["t_s,budget_w,power_w,shares_w,caps_w," + ",".join(f"power_{k}_w" for k in pp)]
    for i in range(len(result.t_s)):
        vals = [result.t_s[i], result.budget_w[i], result.power_w[i], result.shares_w[i],
                result.caps_w[i]] + [pp[k][i] for k in pp]
        lines.append(",".join(repr(float(v)) for v in vals))
    (out / "site.csv").write_text("\n".join(lines) + "\n")
    written.append(out / "site.csv")
    if plot:
        written.append(plot_site_timeline(result, out / "site_timeline.png"))
    return written
