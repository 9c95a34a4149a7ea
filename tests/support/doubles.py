"""Test doubles for the controller tests: an analytic power-performance model with the
`PowerPerfModel` interface (predict / gradients), shaped like a MoE replica on 4 GPUs (interior
tokens/J optimum over the cap, throughput rising with batch)."""
from __future__ import annotations

import dataclasses

import numpy as np

from palsctl.types import Limits, Measurement, PlantInfo


@dataclasses.dataclass(frozen=True)
class _Pred:
    throughput_tok_s: object
    power_w: object
    itl_p90_s: object
    tokens_per_joule: object


@dataclasses.dataclass(frozen=True)
class _Grad:
    dthroughput_dcap: object
    dthroughput_dbatch: object
    dpower_dcap: object
    dpower_dbatch: object


class AnalyticModel:
    """Per GPU: natural draw P_nat(b) = idle + 260·(1 − exp(−b/24)) W; drawn power min(cap,
    P_nat); clock fraction φ = ((p − idle)/(P_nat − idle))^(1/2.5) with a 0.45 voltage floor in
    power; step time = mem + compute(b)/φ; throughput = b / step time (×scale)."""

    def __init__(self, num_gpus: int = 4, idle_w: float = 90.0, scale: float = 1.0,
                 power_scale: float = 1.0) -> None:
        self.num_gpus, self.idle_w, self.scale, self.power_scale = (num_gpus, idle_w, scale,
                                                                      power_scale)

    def _eval(self, cap, b):
        cap = np.asarray(cap, float)
        b = np.asarray(b, float)
        p_nat = self.idle_w + 260.0 * (1 - np.exp(-b / 24.0))
        p = np.minimum(cap, p_nat)
        phi = np.clip((p - self.idle_w) / (p_nat - self.idle_w), 1e-3, 1.0) ** (1 / 2.5)
        step_s = 0.012 + (0.004 + 0.00035 * b) / phi
        thr = self.scale * b / step_s
        return thr, self.power_scale * self.num_gpus * p, step_s * 1.1

    def predict(self, *, power_cap_w, max_batch):
        thr, pw, itl = self._eval(power_cap_w, max_batch)
        scalar = np.ndim(power_cap_w) == 0 and np.ndim(max_batch) == 0
        if scalar:
            thr, pw, itl = float(thr), float(pw), float(itl)
        return _Pred(throughput_tok_s=thr, power_w=pw, itl_p90_s=itl,
                     tokens_per_joule=thr / pw)

    def gradients(self, power_cap_w, max_batch):
        hc, hb = 0.5, 0.25
        t1, p1, _ = self._eval(power_cap_w + hc, max_batch)
        t0, p0, _ = self._eval(power_cap_w - hc, max_batch)
        t3, p3, _ = self._eval(power_cap_w, max_batch + hb)
        t2, p2, _ = self._eval(power_cap_w, max(max_batch - hb, 1e-3))
        return _Grad(dthroughput_dcap=float((t1 - t0) / (2 * hc)),
                     dthroughput_dbatch=float((t3 - t2) / (2 * hb)),
                     dpower_dcap=float((p1 - p0) / (2 * hc)),
                     dpower_dbatch=float((p3 - p2) / (2 * hb)))


def limits4() -> Limits:
    return Limits(power_cap_min_w=100, power_cap_max_w=400, power_cap_default_w=400,
                  power_cap_step_w=1, max_batch_min=1, max_batch_max=256, num_gpus=4)


def plant_info4(simulated: bool = True) -> PlantInfo:
    return PlantInfo(model="mixtral-8x7b", gpu="a100-sxm4-80gb", num_gpus=4, simulated=simulated,
                     prompt_tokens_mean=512, output_tokens_mean=256)


class FakePlant:
    """A tiny closed-loop stand-in for unit tests: the analytic model's steady state, a queue
    of offered tokens, no noise. Not a plant implementation: just enough to exercise feedback."""

    def __init__(self, truth: AnalyticModel, limits: Limits) -> None:
        self.truth, self.limits = truth, limits
        self.cap_w, self.batch = limits.power_cap_default_w, limits.max_batch_max
        self.backlog_tok = 0.0
        self.t_s = 0.0
        self.energy_j = 0.0

    def step(self, demand_tok_s: float, dt_s: float = 1.0) -> Measurement:
        """Serve for one window: capacity is the truth's saturated throughput at (cap, batch);
        below it the plant runs the batch whose saturated throughput equals what it serves
        (that batch's power and latency)."""
        thr_cap = float(self.truth._eval(self.cap_w, self.batch)[0])
        offered = self.backlog_tok + demand_tok_s * dt_s
        served = min(offered, thr_cap * dt_s)
        self.backlog_tok = offered - served
        bs = np.arange(1, self.batch + 1, dtype=float)
        thr_b, pw_b, itl_b = self.truth._eval(np.full_like(bs, self.cap_w), bs)
        k = int(min(np.searchsorted(thr_b, served / dt_s), self.batch - 1))
        running = k + 1 if served > 0 else 0
        power = float(pw_b[k]) if served > 0 else self.truth.num_gpus * self.truth.idle_w
        self.t_s += dt_s
        self.energy_j += power * dt_s
        waiting = int(self.backlog_tok / 256)
        return Measurement(t_s=self.t_s, window_s=dt_s, power_w=power, energy_j=self.energy_j,
                           throughput_tok_s=served / dt_s, demand_tok_s=demand_tok_s,
                           running=running, waiting=waiting, tpot_p90_s=float(itl_b[k]),
                           power_cap_w=self.cap_w, max_batch=self.batch)

    def apply(self, action) -> None:
        if action.power_cap_w is not None:
            self.cap_w = self.limits.clamp_cap_w(action.power_cap_w)
        if action.max_batch is not None:
            self.batch = self.limits.clamp_batch(action.max_batch)
