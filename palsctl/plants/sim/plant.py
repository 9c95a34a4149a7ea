"""`SimPlant`: the simulated GPU group + vLLM engine behind palsctl's `SimulatedPlant` interface.

Sensors behave like the real ones: ``read()`` reports the window since the previous read with
the mean power computed from the (monotonic, cumulative) energy counter, like NVML's energy
counter differenced by a controller; ``counters()`` gives a snapshot for a vLLM ``/metrics``
and NVML stand-in (instant and 1 s-averaged power per GPU, energy per GPU, token counters,
vLLM's latency histograms). Measurement noise is seeded; the engine itself is deterministic,
so two plants with different seeds differ only in their noise.
"""
from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter

import numpy as np

from palsctl.errors import ConfigError
from palsctl.interfaces import SimulatedPlant
from palsctl.plants.sim.engine import Engine, Histogram
from palsctl.plants.sim.gpu import PlantConstants
from palsctl.plants.sim.specs import GPUSpec, ModelSpec, check_fits, get_gpu, get_model
from palsctl.plants.sim.steady import MAX_NUM_BATCHED_TOKENS, group_model
from palsctl.types import Action, Limits, Measurement, PlantInfo, Request, RequestResult

__all__ = ["SimPlant", "PlantCounters", "HistogramSnapshot"]

POWER_NOISE_FRAC = 0.01   # 1-sigma relative noise of a power reading


@dataclass(frozen=True, kw_only=True, slots=True)
class HistogramSnapshot:
    """A cumulative Prometheus histogram.

    Parameters
    ----------
    bounds_s : tuple of float
        Upper bounds of the buckets, s (+Inf implied last).
    cumulative_counts : tuple of int
        Observations at or below each bound, then the total (+Inf).
    sum_s : float
        Sum of the observed values, s.
    count : int
        Number of observations.
    """

    bounds_s: tuple[float, ...]
    cumulative_counts: tuple[int, ...]
    sum_s: float
    count: int

    @classmethod
    def of(cls, h: Histogram) -> "HistogramSnapshot":
        """Snapshot of a histogram's buckets, sum and count."""
        return cls(bounds_s=h.bounds, cumulative_counts=h.cumulative(), sum_s=h.sum, count=h.count)


@dataclass(frozen=True, kw_only=True, slots=True)
class PlantCounters:
    """Snapshot of the plant's cumulative counters and gauges (vLLM's and NVML's stand-ins).

    Parameters
    ----------
    t_s : float
        Plant time of the snapshot, s.
    generation_tokens_total, prompt_tokens_total : int
        Generated and prompt tokens so far.
    requests_finished_total : int
        Requests finished so far.
    requests_running, requests_waiting : int
        Sequences running and waiting now.
    preemptions_total : int
        Preemptions so far (KV cache full).
    kv_usage : float
        KV-cache usage, 0..1.
    power_instant_w, power_avg_1s_w : tuple of float
        Instant and 1 s-averaged power per GPU, W.
    energy_j : tuple of float
        Cumulative energy per GPU, J.
    power_cap_w : float
        Cap in force per GPU, W.
    max_batch : int
        Batch limit in force.
    sm_clock_mhz : float
        SM clock now, MHz.
    ttft_s, itl_s, tpot_s, e2e_s : HistogramSnapshot
        Histograms of time to first token, inter-token latency, time per output token and
        request latency, s.
    """

    t_s: float
    generation_tokens_total: int
    prompt_tokens_total: int
    requests_finished_total: int
    requests_running: int
    requests_waiting: int
    preemptions_total: int
    kv_usage: float
    power_instant_w: tuple[float, ...]
    power_avg_1s_w: tuple[float, ...]
    energy_j: tuple[float, ...]
    power_cap_w: float
    max_batch: int
    sm_clock_mhz: float
    ttft_s: HistogramSnapshot
    itl_s: HistogramSnapshot
    tpot_s: HistogramSnapshot
    e2e_s: HistogramSnapshot


def _p90(values: list[float]) -> float | None:
    """90th percentile with linear interpolation (numpy's default method)."""
    if not values:
        return None
    v = sorted(values)
    x = 0.9 * (len(v) - 1)
    i = int(x)
    return v[i] if i + 1 >= len(v) else v[i] + (v[i + 1] - v[i]) * (x - i)


class SimPlant(SimulatedPlant):
    """Simulated GPU group serving a model with vLLM-like continuous batching.

    Defaults: Mixtral-8x7B on 4 × A100-SXM4-80GB (tensor parallel), cap = the GPU's default limit
    (TDP), batch = ``max_batch_launch``.

    Parameters
    ----------
    model : str or ModelSpec, default "mixtral-8x7b"
        A model preset name (`MODEL_PRESETS`) or a spec.
    gpu : str or GPUSpec, default "a100-sxm4-80gb"
        A GPU preset name (`GPU_PRESETS`) or a spec.
    num_gpus : int, default 4
        GPUs in the group.
    dt_s : float, default 1.0
        Control period, s.
    seed : int, default 0
        Seed of the measurement noise (the engine itself is deterministic).
    max_batch_launch : int, default 256
        vLLM's launch ``max_num_seqs``: the largest batch limit.
    power_cap_w : float or None
        Initial cap per GPU, W (None: the default limit).
    max_batch : int or None
        Initial batch limit (None: ``max_batch_launch``).
    noise : bool, default True
        Add seeded noise to the power readings.
    constants : PlantConstants or None
        Efficiency constants (None: the committed calibration for ``gpu``).
    max_num_batched_tokens : int, default 8192
        vLLM's chunked-prefill token budget per step.
    parallelism : {"tp", "ep", "tp+ep"}
        Tensor parallel, expert parallel with data-parallel attention, or expert-parallel MoE
        layers with tensor-parallel attention.
    """

    def __init__(self, model: str | ModelSpec = "mixtral-8x7b",
                 gpu: str | GPUSpec = "a100-sxm4-80gb",
                 num_gpus: int = 4, *, dt_s: float = 1.0, seed: int = 0,
                 max_batch_launch: int = 256, power_cap_w: float | None = None,
                 max_batch: int | None = None, noise: bool = True,
                 constants: PlantConstants | None = None,
                 max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS,
                 parallelism: str = "tp") -> None:
        m = get_model(model)
        g = get_gpu(gpu)
        if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
            raise ConfigError("num_gpus must be an integer >= 1", key="num_gpus", value=num_gpus)
        if not (isinstance(dt_s, (int, float)) and math.isfinite(dt_s) and dt_s > 0):
            raise ConfigError("dt_s must be a positive number of seconds", key="dt_s", value=dt_s)
        if isinstance(max_batch_launch, bool) or not isinstance(max_batch_launch, int) \
                or max_batch_launch < 1:
            raise ConfigError("max_batch_launch must be an integer >= 1", key="max_batch_launch",
                              value=max_batch_launch)
        if max_batch_launch > max_num_batched_tokens:
            raise ConfigError(f"max_batch_launch must not exceed max_num_batched_tokens "
                              f"({max_num_batched_tokens}), as in vLLM", key="max_batch_launch",
                              value=max_batch_launch)
        check_fits(m, g, num_gpus, parallelism)
        gm = group_model(m, g, num_gpus, constants, parallelism)
        self.limits = Limits(power_cap_min_w=g.min_cap_w, power_cap_max_w=g.tdp_w,
                             power_cap_default_w=g.tdp_w, power_cap_step_w=1.0, max_batch_min=1,
                             max_batch_max=max_batch_launch, num_gpus=num_gpus)
        if power_cap_w is None:
            cap = g.tdp_w
        else:
            cap = float(power_cap_w)
            if not (math.isfinite(cap) and g.min_cap_w <= cap <= g.tdp_w):
                raise ConfigError(f"power cap outside the limits of {g.name} "
                                  f"[{g.min_cap_w:g}, {g.tdp_w:g}] W", key="power_cap_w",
                                  value=power_cap_w)
        if max_batch is None:
            batch = max_batch_launch
        else:
            if isinstance(max_batch, bool) or not isinstance(max_batch, int) \
                    or not 1 <= max_batch <= max_batch_launch:
                raise ConfigError(f"max_batch must be an integer in [1, {max_batch_launch}]",
                                  key="max_batch", value=max_batch)
            batch = max_batch
        self.dt_s = float(dt_s)
        self.model, self.gpu, self.num_gpus = m, g, num_gpus
        self.seed = int(seed)
        self.noise = bool(noise)
        self.parallelism = parallelism
        self._gm = gm
        self._eng = Engine(self._gm, max_batch=batch, power_cap_w=cap,
                           max_num_batched_tokens=max_num_batched_tokens)
        self.info = PlantInfo(model=m.name, gpu=g.name, num_gpus=num_gpus, simulated=True,
                              extra={"kv_capacity_tokens": self._gm.kv_capacity_tokens,
                                     "parallelism": parallelism,
                                     "max_num_batched_tokens": int(max_num_batched_tokens)})
        self._rng = np.random.default_rng([self.seed, 0])
        self._rng_counters = np.random.default_rng([self.seed, 1])
        self._now = 0.0
        self._last_t = 0.0
        self._last_e = 0.0
        self._last_clock = 0.0
        self._last_gen = 0
        self._last_prompt = 0
        self._read_res = 0
        self._read_ttft = 0
        self._done_idx = 0
        # accepted requests not yet counted as demand: (arrival_s, output tokens) from index
        # _demand_head on, sorted by arrival unless a submission came out of order
        self._demand: list[tuple[float, int]] = []
        self._demand_head = 0
        self._demand_sorted = True
        self._noise: list[float] = []      # standard normals drawn from _rng in blocks

    # ---- SimulatedPlant ------------------------------------------------------------------
    @property
    def now_s(self) -> float:
        """The simulated clock, s."""
        return self._now

    @property
    def engine(self) -> Engine:
        """The ground-truth engine (for tests and the oracle; controllers must not use it)."""
        return self._eng

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue requests (prompt and output of at least one token each)."""
        for r in requests:
            if r.prompt_tokens < 1 or r.output_tokens < 1:
                raise ConfigError("a request needs prompt_tokens >= 1 and output_tokens >= 1",
                                  key=f"request {r.request_id}",
                                  value=(r.prompt_tokens, r.output_tokens))
            if not math.isfinite(r.arrival_s):
                raise ConfigError("arrival_s must be finite", key=f"request {r.request_id}",
                                  value=r.arrival_s)
            try:
                accepted = self._eng.submit(r)
            except ValueError as exc:
                raise ConfigError(str(exc), key="request_id", value=r.request_id) from None
            if accepted:
                d = self._demand
                a = float(r.arrival_s)
                if len(d) > self._demand_head and a < d[-1][0]:
                    self._demand_sorted = False
                d.append((a, int(r.output_tokens)))

    def advance(self, dt_s: float) -> None:
        """Run the engine and the firmware for ``dt_s`` simulated seconds."""
        if not (math.isfinite(dt_s) and dt_s >= 0):
            raise ConfigError("advance needs a finite dt_s >= 0", key="dt_s", value=dt_s)
        target = self._now + dt_s
        self._eng.run_until(target)
        self._now = target

    def read(self) -> Measurement:
        """Measurement over the window since the previous read (NVML-style averaged power)."""
        eng = self._eng
        now = self._now
        window = now - self._last_t
        e_now = eng.energy_at(now)
        clk = eng.clock_at(now)
        gen, prompt = eng.gen_tokens, eng.prompt_tokens
        demand_tok = self._demand_until(now)
        ttfts = [x[1] for x in eng.first_token_events[self._read_ttft:]]
        self._read_ttft = len(eng.first_token_events)
        tpots = [(r.finish_s - r.first_token_s) / (r.output_tokens - 1)    # r.tpot_s
                 for r in eng.results[self._read_res:] if r.output_tokens > 1]
        self._read_res = len(eng.results)
        if window > 0:
            power = (e_now - self._last_e) / window
            thr = (gen - self._last_gen) / window
            pthr = (prompt - self._last_prompt) / window
            dem = demand_tok / window
            clock = (clk - self._last_clock) / window * self.gpu.max_sm_clock_mhz
        else:
            power = eng.seg_power_w
            thr = pthr = dem = 0.0
            clock = eng.seg_clock * self.gpu.max_sm_clock_mhz
        if self.noise:
            if not self._noise:     # the same draws, in the same order, as one at a time
                self._noise = self._rng.standard_normal(64).tolist()[::-1]
            power *= 1.0 + POWER_NOISE_FRAC * self._noise.pop()
        self._last_t, self._last_e, self._last_clock = now, e_now, clk
        self._last_gen, self._last_prompt = gen, prompt
        return Measurement(
            t_s=now, window_s=window, power_w=max(0.0, power), energy_j=e_now,
            throughput_tok_s=thr, prompt_tok_s=pthr, demand_tok_s=dem,
            running=len(eng.running), waiting=len(eng.waiting),
            kv_usage=min(1.0, eng.kv_used / eng.kv_cap) if eng.kv_cap else 0.0,
            ttft_p90_s=_p90(ttfts), tpot_p90_s=_p90(tpots), power_cap_w=eng.cap_set_w,
            max_batch=eng.max_batch, sm_clock_mhz=clock)

    def _demand_until(self, now: float) -> int:
        """Output tokens of the accepted requests that arrived before ``now`` and were not
        counted yet."""
        d, i = self._demand, self._demand_head
        if not self._demand_sorted:
            d[:] = sorted(d[i:], key=itemgetter(0))
            i = self._demand_head = 0
            self._demand_sorted = True
        if i == len(d) or d[i][0] >= now:
            return 0
        k = bisect_left(d, now, lo=i, key=itemgetter(0))
        tok = sum(x[1] for x in d[i:k])
        if k == len(d):
            d.clear()
            k = 0
        elif k > 4096 and 2 * k > len(d):
            del d[:k]
            k = 0
        self._demand_head = k
        return tok

    def apply(self, action: Action) -> Action:
        """Set the cap (clamped, rounded down to the step) and the batch limit; return both."""
        eng = self._eng
        if action.power_cap_w is not None:
            if not math.isfinite(action.power_cap_w):
                raise ConfigError("power_cap_w must be finite", key="power_cap_w",
                                  value=action.power_cap_w)
            eng.cap_set_w = float(self.limits.clamp_cap_w(action.power_cap_w))
        if action.max_batch is not None:
            eng.max_batch = self.limits.clamp_batch(action.max_batch)
        return Action(power_cap_w=eng.cap_set_w, max_batch=eng.max_batch)

    def completed(self) -> list[RequestResult]:
        """Drain the requests finished since the previous call."""
        res = self._eng.results[self._done_idx:]
        self._done_idx = len(self._eng.results)
        return res

    @property
    def rejected(self) -> int:
        """Requests refused at submission because they can never fit the KV cache."""
        return self._eng.rejected

    def progress(self, request_id: int) -> tuple[int, bool]:
        """(tokens generated so far, finished?) of a submitted request. `KeyError` for an
        unknown request and for one refused at submission (longer than the KV cache)."""
        try:
            return self._eng.progress(request_id)
        except KeyError:
            if request_id in self._eng.rejected_ids:
                raise KeyError(f"request_id {request_id!r} was refused: prompt + output exceed "
                               f"the KV cache ({self._eng.kv_cap} tokens)") from None
            raise KeyError(f"unknown request_id {request_id!r}") from None

    def counters(self) -> PlantCounters:
        """The cumulative counters and histograms, as vLLM's ``/metrics`` would show them."""
        eng = self._eng
        n = self.num_gpus
        now = self._now
        e_now = eng.energy_at(now)
        span = min(1.0, now) if now > 0 else 0.0
        avg_total = (e_now - eng.energy_at(now - span)) / span if span > 0 else eng.seg_power_w
        inst_total = eng.seg_power_w
        if self.noise:
            z = self._rng_counters.standard_normal(2 * n)
            inst = tuple(max(0.0, inst_total / n * (1 + POWER_NOISE_FRAC * float(z[i])))
                         for i in range(n))
            avg = tuple(max(0.0, avg_total / n * (1 + 0.3 * POWER_NOISE_FRAC * float(z[n + i])))
                        for i in range(n))
        else:
            inst = (inst_total / n,) * n
            avg = (avg_total / n,) * n
        return PlantCounters(
            t_s=now, generation_tokens_total=eng.gen_tokens, prompt_tokens_total=eng.prompt_tokens,
            requests_finished_total=eng.finished, requests_running=len(eng.running),
            requests_waiting=len(eng.waiting), preemptions_total=eng.preemptions,
            kv_usage=min(1.0, eng.kv_used / eng.kv_cap) if eng.kv_cap else 0.0,
            power_instant_w=inst, power_avg_1s_w=avg, energy_j=(e_now / n,) * n,
            power_cap_w=eng.cap_set_w, max_batch=eng.max_batch,
            sm_clock_mhz=eng.seg_clock * self.gpu.max_sm_clock_mhz,
            ttft_s=HistogramSnapshot.of(eng.ttft_hist), itl_s=HistogramSnapshot.of(eng.itl_hist),
            tpot_s=HistogramSnapshot.of(eng.tpot_hist), e2e_s=HistogramSnapshot.of(eng.e2e_hist))
