"""QoS-first building blocks shared by the controllers: what the plant must serve (`Demand`,
`DemandEstimator`) and the online tightening of a model's feasible set when measured latencies
come close to their SLOs (`QosTightening`).

QoS is the constraint and energy the objective inside it: every controller asks the plant for
at least the *demand* — the largest of the operator's throughput target and the measured arrival
rate, plus the rate that drains the waiting queue within a horizon — and treats a measured p90
latency near its SLO as evidence that its model is optimistic on this deployment, tightening the
feasible set at once and relaxing it only slowly.

Pure: numbers in, numbers out; no clock (the control period ``dt_s`` is passed in), no I/O.

>>> from palsctl.types import Measurement, Setpoint
>>> est = DemandEstimator(tau_s=20.0, drain_s=30.0)
>>> m = Measurement(t_s=1, window_s=1, power_w=900, energy_j=900, throughput_tok_s=800,
...                 demand_tok_s=1000, running=40, waiting=12)
>>> d = est.update(m, Setpoint(throughput_tok_s=600), dt_s=1.0, output_tokens_mean=250)
>>> d.arrivals_tok_s, d.backlog_tok_s, d.demand_tok_s, d.source
(1000.0, 100.0, 1100.0, 'arrivals')
"""
from __future__ import annotations

import dataclasses
import math
from typing import TypeGuard

from palsctl.types import Measurement, Setpoint

__all__ = ["Demand", "DemandEstimator", "QosTightening"]


def _finite_pos(x: float | None) -> TypeGuard[float]:
    return x is not None and math.isfinite(x) and x > 0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Demand:
    """The generated-token rate a configuration must sustain, and where it comes from.

    Attributes
    ----------
    target_tok_s : float or None
        The operator's throughput target (None: none set).
    arrivals_tok_s : float or None
        Smoothed measured offered load (output tokens of arriving requests per second; the
        served throughput when the plant does not report arrivals and holds no backlog).
    backlog_tok_s : float
        Rate that drains the waiting queue within the drain horizon (waiting requests × mean
        output tokens ÷ ``drain_s``).
    demand_tok_s : float or None
        ``max(target, arrivals) + backlog``; None when nothing is known.
    source : str
        ``"target"``, ``"arrivals"`` or ``"none"``: the larger of the first two terms.
    """

    target_tok_s: float | None
    arrivals_tok_s: float | None
    backlog_tok_s: float
    demand_tok_s: float | None
    source: str


class DemandEstimator:
    """Demand = max(operator target, measured arrivals) + backlog to drain.

    A stale operator target that the load has outgrown does not starve the plant: the measured
    arrival rate (an EWMA with time constant ``tau_s``) takes over, and a growing queue adds the
    rate that drains it within ``drain_s`` seconds — the queue is a demand signal ahead of any
    target.

    Parameters
    ----------
    tau_s : float
        Time constant of the arrival-rate EWMA, seconds (> 0).
    drain_s : float
        Horizon within which the waiting queue should be served, seconds (0: ignore the queue).
    burst_tau_s : float, optional
        Time constant of a second, faster EWMA; the arrival rate is the larger of the two, so a
        burst raises the demand within seconds while the slow average keeps it from falling
        back on every lull.
    shift_s : float, optional
        With the fast EWMA: a fall of the load that lasts is followed within about this long.
        When the fast average has stayed more than ``shift_drop`` below the slow one for
        ``shift_s`` seconds, the slow one restarts at the fast one's level (a level shift, not a
        lull); None: the slow average decays with ``tau_s`` alone.
    shift_drop : float, default 0.1
        Relative gap between the averages that counts towards a level shift.
    rise_ratio : float, optional
        With the fast EWMA: a rise of the load that lasts is followed at once. When every
        window of ``rise_s`` seconds in a row measured more than ``rise_ratio`` times the
        current estimate (the larger average), the fast average restarts at those windows'
        mean: a step up of the arrival rate (a new regime, a flash crowd) reaches the demand
        within ``rise_s`` instead of the fast average's ~``burst_tau_s``. A single spike —
        one window — does not count: the queue absorbs it, and the backlog term drains it.
        None: rises are followed by the fast average alone.
    rise_s : float, default 2.0
        How long a rise must last to count, seconds.
    """

    def __init__(self, *, tau_s: float = 20.0, drain_s: float = 30.0,
                 burst_tau_s: float | None = None, shift_s: float | None = None,
                 shift_drop: float = 0.1, rise_ratio: float | None = None,
                 rise_s: float = 2.0) -> None:
        self.tau_s, self.drain_s = float(tau_s), float(drain_s)
        self.burst_tau_s = None if burst_tau_s is None else float(burst_tau_s)
        self.shift_s = None if shift_s is None else float(shift_s)
        self.shift_drop = float(shift_drop)
        self.rise_ratio = None if rise_ratio is None else float(rise_ratio)
        self.rise_s = float(rise_s)
        self.reset()

    def reset(self) -> None:
        """Forget the arrival-rate history."""
        self._arrivals: float | None = None
        self._fast: float | None = None
        self._below_s = 0.0
        self._seen_s = 0.0          # time since the first window (the averages' warm-up)
        self._rise_s = 0.0          # length and sum of the current run of high windows
        self._rise_sum = 0.0
        self.rises = 0              # rises followed so far (diagnostics)

    def _follow_rise(self, x: float, dt_s: float) -> None:
        assert self.rise_ratio is not None and self._fast is not None
        est = max(self._fast, self._arrivals or 0.0)
        self._seen_s += dt_s
        # not while the averages still start up (half the slow time constant)
        if self._seen_s > self.tau_s / 2 and x > self.rise_ratio * est:
            self._rise_s += dt_s
            self._rise_sum += x * dt_s
            if self._rise_s >= self.rise_s - 1e-9:
                self._fast = self._rise_sum / self._rise_s
                self.rises += 1
                self._rise_s = self._rise_sum = 0.0
        else:
            self._rise_s = self._rise_sum = 0.0

    def update(self, m: Measurement, sp: Setpoint, *, dt_s: float,
               output_tokens_mean: float | None) -> Demand:
        """Fold one measurement in and return the current `Demand`.

        Parameters
        ----------
        m : Measurement
            The window just measured (a stale one only repeats the last estimate).
        sp : Setpoint
            The setpoint in force (its ``throughput_tok_s`` is the operator's target).
        dt_s : float
            Control period, seconds.
        output_tokens_mean : float or None
            Mean output tokens per request (for the backlog; None: the queue is ignored).
        """
        if not m.stale:
            x = m.demand_tok_s
            if x is None or not math.isfinite(x) or x < 0:
                # no arrival counter: an unsaturated plant serves what it is offered
                x = m.throughput_tok_s if m.waiting <= 0 else None
            if x is not None and math.isfinite(x):
                a = 1.0 - math.exp(-max(dt_s, 1e-9) / self.tau_s)
                self._arrivals = x if self._arrivals is None else \
                    self._arrivals + a * (x - self._arrivals)
                if self.burst_tau_s:
                    b = 1.0 - math.exp(-max(dt_s, 1e-9) / self.burst_tau_s)
                    self._fast = x if self._fast is None else self._fast + b * (x - self._fast)
                    if self.shift_s is not None and self._arrivals is not None:
                        # a sustained fall: the fast average has stayed well below the slow
                        # one for shift_s, so the slow one restarts at the new level
                        if self._fast < (1.0 - self.shift_drop) * self._arrivals:
                            self._below_s += dt_s
                            if self._below_s >= self.shift_s:
                                self._arrivals = self._fast
                                self._below_s = 0.0
                        else:
                            self._below_s = 0.0
                    if self.rise_ratio is not None:
                        self._follow_rise(x, dt_s)
        backlog = 0.0
        if (m.waiting > 0 and _finite_pos(output_tokens_mean) and self.drain_s > 0):
            backlog = m.waiting * float(output_tokens_mean) / self.drain_s
        target = sp.throughput_tok_s if _finite_pos(sp.throughput_tok_s) or \
            sp.throughput_tok_s == 0 else None
        arrivals = self._arrivals
        if arrivals is not None and self._fast is not None:
            arrivals = max(arrivals, self._fast)   # a burst shows in the fast average first
        if target is None and arrivals is None:
            return Demand(target_tok_s=None, arrivals_tok_s=None, backlog_tok_s=backlog,
                          demand_tok_s=backlog if backlog > 0 else None, source="none")
        base, source = (target, "target") if arrivals is None or (
            target is not None and target >= arrivals) else (arrivals, "arrivals")
        assert base is not None  # target or arrivals is known here
        return Demand(target_tok_s=target, arrivals_tok_s=arrivals, backlog_tok_s=backlog,
                      demand_tok_s=max(base, 0.0) + backlog, source=source)


class QosTightening:
    """Learned corrections that make a model's feasible set stricter when measured p90 latencies
    come close to their SLOs, and relax back slowly.

    Two factors, each ≥ 1:

    * ``itl_factor`` multiplies the model's p90 inter-token latency. When the measured p90 TPOT
      of a window exceeds ``guard × TPOT SLO``, the factor jumps to at least
      ``measured / (guard × predicted)`` at the configuration in force: the model must predict at
      least what was measured, with the guard's margin, so the configuration that just came
      close stops being feasible and a faster one is chosen.
    * ``capacity_factor`` multiplies the throughput requirement. When the measured p90 TTFT
      exceeds ``ttft_guard × TTFT SLO`` (requests queue or prefill too slowly), it jumps to
      ``min(measured / (ttft_guard × SLO), bound)``.

    Both decay towards 1 with the time constant ``memory_s`` (``f ← 1 + (f − 1)·e^(−dt/memory)``):
    the controller keeps its extra headroom for a while after a burst and returns to saving
    energy only once the latencies stayed clear of the SLO.

    Parameters
    ----------
    guard : float
        Fraction of the TPOT SLO at which tightening starts (0 < guard ≤ 1).
    ttft_guard : float
        Fraction of the TTFT SLO at which the capacity requirement grows.
    memory_s : float
        Decay time constant of both factors, seconds.
    bound : float
        Largest value of either factor.
    """

    def __init__(self, *, guard: float = 0.85, ttft_guard: float = 0.6, memory_s: float = 180.0,
                 bound: float = 4.0) -> None:
        self.guard, self.ttft_guard = float(guard), float(ttft_guard)
        self.memory_s, self.bound = float(memory_s), float(bound)
        self.reset()

    def reset(self) -> None:
        """Back to the model's own predictions."""
        self.itl_factor = 1.0
        self.capacity_factor = 1.0
        self.events = 0

    def update(self, m: Measurement, sp: Setpoint, *, dt_s: float,
               predicted_itl_s: float | None) -> bool:
        """Decay, then fold in one measurement. Returns True when this window tightened.

        Parameters
        ----------
        m : Measurement
            The window just measured.
        sp : Setpoint
            The setpoint in force during it (its SLOs).
        dt_s : float
            Control period, seconds.
        predicted_itl_s : float or None
            The (residual-corrected) model's p90 ITL at the configuration that produced ``m``,
            *before* this factor.
        """
        k = math.exp(-max(dt_s, 0.0) / self.memory_s) if self.memory_s > 0 else 0.0
        self.itl_factor = 1.0 + (self.itl_factor - 1.0) * k
        self.capacity_factor = 1.0 + (self.capacity_factor - 1.0) * k
        if m.stale:
            return False
        hit = False
        slo, tpot = sp.tpot_slo_s, m.tpot_p90_s
        if _finite_pos(slo) and tpot is not None and math.isfinite(tpot) \
                and tpot > self.guard * slo and _finite_pos(predicted_itl_s):
            need = tpot / (self.guard * predicted_itl_s)
            self.itl_factor = min(max(self.itl_factor, need), self.bound)
            hit = True
        slo_t, ttft = sp.ttft_slo_s, m.ttft_p90_s
        if _finite_pos(slo_t) and ttft is not None and math.isfinite(ttft) \
                and ttft > self.ttft_guard * slo_t:
            need = ttft / (self.ttft_guard * slo_t)
            self.capacity_factor = min(max(self.capacity_factor, need), self.bound)
            hit = True
        self.events += hit
        return hit

    def as_dict(self) -> dict[str, float]:
        """The factors, for diagnostics."""
        return {"itl_factor": self.itl_factor, "capacity_factor": self.capacity_factor}
