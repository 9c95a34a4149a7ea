"""Saturated steady state of the simulated plant, in closed form (deterministic, no noise).

With ``max_batch`` requests always in flight, each of ``prompt_tokens`` prompt and
``output_tokens`` generated tokens, one request finishes — and a new one is admitted and
prefilled — every ``output_tokens / batch`` steps. A fraction of the engine steps therefore
carries a prefill chunk (a "mixed" step); the others are pure decode steps whose sequences
hold on average ``prompt + output/2`` tokens of context. All steps run at the highest
clock the power cap allows for the mix: the firmware holds the power averaged over a short
window (0.1 s) within the cap. This is the same
physics as `SimPlant` (`palsctl.plants.sim.gpu.GroupModel`); the plant's saturated runs agree
with it within a few per cent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

from palsctl.errors import ConfigError
from palsctl.plants.sim.gpu import GroupModel, PlantConstants
from palsctl.plants.sim.specs import GPUSpec, ModelSpec, get_gpu, get_model

__all__ = ["SteadyState", "steady_state", "group_model", "MAX_NUM_BATCHED_TOKENS"]

MAX_NUM_BATCHED_TOKENS = 8192  # vLLM's chunked-prefill token budget per step


@dataclass(frozen=True, kw_only=True, slots=True)
class SteadyState:
    """Saturated steady state of one configuration (totals over the plant's GPUs).

    Parameters
    ----------
    throughput_tok_s : float
        Generated tokens per second, tok/s.
    power_w : float
        Mean power, all GPUs, W.
    tokens_per_joule : float
        Generated tokens per joule.
    itl_median_s, itl_p90_s : float
        Median and p90 inter-token latency, s.
    sm_clock_mhz : float
        Time-weighted mean SM clock, MHz.
    batch : float
        Sequences in flight (≤ the batch limit; less when the KV cache bounds it).
    kv_limited : bool
        The KV-cache capacity, not the batch limit, bounds the batch.
    power_per_gpu_w : float
        Mean power per GPU, W.
    decode_step_s : float
        A pure decode step at the mean context, s.
    mixed_step_s : float
        A step carrying a prefill chunk, s.
    mixed_step_fraction : float
        Fraction of the steps that carry prefill.
    ttft_s : float
        Time to first token once admitted (prefill steps), s.
    request_latency_s : float
        Admission to last token, s.
    """

    throughput_tok_s: float       # generated tokens per second
    power_w: float                # mean power, all GPUs
    tokens_per_joule: float
    itl_median_s: float           # median inter-token latency
    itl_p90_s: float
    sm_clock_mhz: float           # time-weighted mean SM clock
    batch: float                  # sequences in flight (≤ max_batch; less when KV-limited)
    kv_limited: bool              # KV-cache capacity, not max_batch, bounds the batch
    power_per_gpu_w: float
    decode_step_s: float          # pure decode step at mean context
    mixed_step_s: float           # step carrying a prefill chunk
    mixed_step_fraction: float    # fraction of steps that carry prefill
    ttft_s: float                 # time to first token once admitted (prefill steps)
    request_latency_s: float      # admission to last token


@lru_cache(maxsize=256)
def group_model(model: ModelSpec, gpu: GPUSpec, num_gpus: int,
                constants: PlantConstants | None = None, parallelism: str = "tp") -> GroupModel:
    """Cached `GroupModel` (constants None = the committed calibration for that GPU)."""
    return GroupModel(model, gpu, num_gpus, constants, parallelism)


def _mix_points(n: float, q: float) -> list[tuple[float, float]]:
    """(count, weight) points of a Binomial(n, q) distribution: exact pmf terms while the mean
    is small, 21 equal-weight normal quantiles otherwise."""
    lam = n * q
    if q >= 1.0:
        return [(float(n), 1.0)]
    if lam <= 20.0:
        out, j, nn = [], 0, int(n)
        pmf = math.exp(nn * math.log1p(-q))
        ratio = q / (1.0 - q)
        jmax = min(nn, int(lam + 6.0 * math.sqrt(lam) + 3))
        while j <= jmax:
            if pmf > 1e-4 or j <= lam:
                out.append((float(j), pmf))
            pmf *= (nn - j) / (j + 1) * ratio
            j += 1
        return out
    sd = math.sqrt(lam * (1.0 - q))
    return [(min(n, max(0.0, lam + sd * z)), 1.0) for z in _Z21]


_Z21 = tuple(NormalDist().inv_cdf((i + 0.5) / 21) for i in range(21))


def _mix_power(gm: GroupModel, costs, r: float) -> float:
    e = t = 0.0
    for w, c, *_ in costs:
        dt = gm.step_time(c, r)
        e += w * dt * gm.power_per_gpu(c, r)
        t += w * dt
    return e / t


def _mix_clock(gm: GroupModel, costs, cap_w: float) -> float:
    """Highest clock ratio whose mean power over the step mix fits ``cap_w`` (per GPU)."""
    if _mix_power(gm, costs, 1.0) <= cap_w:
        return 1.0
    lo, hi = gm.r_min, 1.0
    if _mix_power(gm, costs, lo) >= cap_w:
        return lo
    for _ in range(16):
        mid = 0.5 * (lo + hi)
        if _mix_power(gm, costs, mid) <= cap_w:
            lo = mid
        else:
            hi = mid
    return lo


class _ItlMix:
    """Distribution of the inter-token latency a decode token observes: a mixture over the
    step kinds (weight = decode tokens in such steps). Pure-decode steps spread normally with
    the fluctuation of the summed context of the batch; a step that also prefills ``j`` prompts
    exceeds the decode step by a shifted log-normal whose spread is that of the sum of ``j``
    prompt lengths (coefficient of variation ``prompt_cv / √j``). Quantiles therefore move
    smoothly with the load instead of jumping from one step kind to the other."""

    __slots__ = ("comps", "total", "lo", "hi")

    def __init__(self, t0: float, sd0: float, parts: list[tuple[float, float, float]],
                 prompt_cv: float) -> None:
        sd0 = max(sd0, 1e-9 * t0, 1e-12)
        comps = []       # (weight, kind, a, b, shift): kind 0 normal(a, b); 1 lognormal(a, b)
        lo, hi = t0 - 6.0 * sd0, t0 + 6.0 * sd0
        for w, t, j in parts:
            if w <= 0:
                continue
            excess = t - t0
            if j == 0 or prompt_cv <= 0 or excess <= 1e-9 * t0:
                comps.append((w, 0, t, sd0, 0.0))
                lo, hi = min(lo, t - 6.0 * sd0), max(hi, t + 6.0 * sd0)
            else:
                s2 = math.log1p(prompt_cv * prompt_cv / j)
                sig = math.sqrt(s2)
                mu = math.log(excess) - 0.5 * s2
                comps.append((w, 1, mu, sig, t0))
                hi = max(hi, t0 + math.exp(mu + 6.0 * sig))
        self.comps = comps
        self.total = sum(c[0] for c in comps)
        self.lo, self.hi = max(0.0, lo), hi

    def cdf(self, x: float) -> float:
        acc = 0.0
        for w, kind, a, b, shift in self.comps:
            if kind == 0:
                acc += w * 0.5 * math.erfc((a - x) / (b * _SQRT2))
            elif x > shift:
                acc += w * 0.5 * math.erfc((a - math.log(x - shift)) / (b * _SQRT2))
        return acc / self.total

    def quantile(self, q: float) -> float:
        lo, hi = self.lo, self.hi
        for _ in range(26):
            mid = 0.5 * (lo + hi)
            if self.cdf(mid) < q:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)


_SQRT2 = math.sqrt(2.0)


def _check_int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or int(v) < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}", key=name, value=v)
    return int(v)


def _check_nonneg(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name} must be a number >= 0", key=name, value=v)
    return float(v)


def steady_state(model: str | ModelSpec, gpu: str | GPUSpec, num_gpus: int, max_batch: int,
                 power_cap_w: float | None = None, prompt_tokens: float = 512,
                 output_tokens: float = 256, *, output_cv: float = 0.0,
                 constants: PlantConstants | None = None,
                 max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS,
                 parallelism: str = "tp", prompt_cv: float = 0.0) -> SteadyState:
    """Compute the plant's saturated steady state with ``max_batch`` requests always in flight.

    The sequences in flight are length-biased, so their mean context is
    ``prompt + output · (1 + output_cv²) / 2``.

    Parameters
    ----------
    model : str or ModelSpec
        A model preset name or a spec.
    gpu : str or GPUSpec
        A GPU preset name or a spec.
    num_gpus : int
        GPUs in the group.
    max_batch : int
        The batch limit.
    power_cap_w : float or None
        Cap per GPU, W, within the GPU's limits (None: the default limit, its TDP).
    prompt_tokens, output_tokens : float, default 512 and 256
        Mean prompt and output lengths per request, tokens.
    output_cv : float, default 0.0
        Coefficient of variation of the output length (0: all equal).
    constants : PlantConstants or None
        Efficiency constants (None: the committed calibration for ``gpu``).
    max_num_batched_tokens : int, default 8192
        vLLM's chunked-prefill token budget per step.
    parallelism : {"tp", "ep", "tp+ep"}
        How the model is split over the GPUs.
    prompt_cv : float, default 0.0
        Coefficient of variation of the prompt length (it spreads the steps that carry
        prefill, hence the ITL quantiles).

    Returns
    -------
    SteadyState
        Throughput, power, latencies and clock of the configuration.
    """
    m = get_model(model)
    g = get_gpu(gpu)
    n = _check_int("num_gpus", num_gpus, 1)
    b = _check_int("max_batch", max_batch, 1)
    if b > max_num_batched_tokens:
        raise ConfigError(f"max_batch must not exceed the token budget per step "
                          f"({max_num_batched_tokens})", key="max_batch", value=max_batch)
    if power_cap_w is None:
        cap = g.tdp_w
    else:
        cap = float(power_cap_w)
        if not (math.isfinite(cap) and g.min_cap_w - 1e-9 <= cap <= g.tdp_w + 1e-9):
            raise ConfigError(f"power cap outside the limits of {g.name} "
                              f"[{g.min_cap_w:g}, {g.tdp_w:g}] W", key="power_cap_w",
                              value=power_cap_w)
    p = float(prompt_tokens)
    o = float(output_tokens)
    if not (math.isfinite(p) and p >= 1):
        raise ConfigError("prompt_tokens must be >= 1", key="prompt_tokens", value=prompt_tokens)
    if not (math.isfinite(o) and o >= 1):
        raise ConfigError("output_tokens must be >= 1", key="output_tokens", value=output_tokens)
    output_cv = _check_nonneg("output_cv", output_cv)
    prompt_cv = _check_nonneg("prompt_cv", prompt_cv)
    gm = group_model(m, g, n, constants, parallelism)
    if not gm.fits:
        raise ConfigError(f"{m.name} ({gm.weight_bytes_per_gpu / 1e9:.0f} GB of weights per GPU, "
                          f"{parallelism}) does not fit on {n} × {g.name}", key="num_gpus",
                          value=num_gpus)
    # KV a sequence holds: its context in the full-attention layers, plus up to the window in
    # sliding-window layers (as the engine charges it)
    win = math.ceil(min(p + o, m.sliding_window) * gm.kv_seq_tokens / m.sliding_window) \
        if gm.kv_seq_tokens else 0
    if gm.kv_capacity_tokens < p + o + win:
        raise ConfigError(f"{m.name} on {n} × {g.name} leaves KV-cache room for "
                          f"{gm.kv_capacity_tokens} tokens, less than one request",
                          key="num_gpus", value=num_gpus)
    ctx_mean = p + 0.5 * o * (1.0 + output_cv * output_cv)
    batch = float(min(b, max(1, math.floor(gm.kv_capacity_tokens / (ctx_mean + win)))))
    kv_limited = batch < b
    # `batch / o` requests finish per step and as many are admitted; the number admitted in one
    # step is ~Binomial (output lengths vary), each bringing `p` prompt tokens (chunked by the
    # token budget). Average step time and energy over that distribution.
    budget = max(1.0, max_num_batched_tokens - batch)
    pref_steps = max(1, math.ceil(p / budget))       # steps to prefill one prompt
    span = p / pref_steps                             # prompt tokens per sequence per step
    points = _mix_points(batch, min(1.0, pref_steps / o))
    costs = []   # (weight, cost, decode tokens, prompts in the step)
    for j, wgt in points:
        j = min(j, batch)
        chunk = min(j * span, budget)
        nd = batch - j
        if j > 0:
            c = gm.step_cost(nd, nd * ctx_mean, chunk, chunk * 0.5 * p,
                             j * 0.5 * (p + span), j)
        else:
            c = gm.step_cost(nd, nd * ctx_mean)
        costs.append((wgt, c, nd, j))
    # the firmware holds the power averaged over a short window within the cap: one clock for
    # the whole mix of steps, the highest whose mean power fits
    r = _mix_clock(gm, costs, cap)
    rows = [(w, gm.step_time(c, r), gm.power_per_gpu(c, r), r, nd, j) for w, c, nd, j in costs]
    wsum = sum(x[0] for x in rows)
    t_mean = sum(x[0] * x[1] for x in rows) / wsum
    energy_gpu = sum(x[0] * x[1] * x[2] for x in rows) / wsum
    power_gpu = energy_gpu / t_mean
    clock = sum(x[0] * x[1] * x[3] for x in rows) / wsum / t_mean * g.max_sm_clock_mhz
    # one request: o tokens over (o - 1) decode steps + its prefill steps
    thr = batch * o / (o - 1.0 + pref_steps) / t_mean
    # inter-token latency: each decode token observes its step's time
    c_d = gm.step_cost(batch, batch * ctx_mean)
    t_d = gm.step_time(c_d, r)
    # the summed context of the batch fluctuates (prompt lengths, ages of the sequences);
    # the attention part of the decode step follows it
    t_kv = t_d - gm.step_time(gm.step_cost(batch, 0.0), r)
    var_ctx = (p * prompt_cv) ** 2 + o * o * (1.0 + output_cv * output_cv) / 12.0
    sd0 = t_kv * math.sqrt(var_ctx / batch) / ctx_mean
    mix = _ItlMix(t_d, sd0, [(x[0] * x[4], x[1], x[5]) for x in rows], prompt_cv)
    itl_med = mix.quantile(0.5)
    itl_p90 = mix.quantile(0.9)
    t_m = max(x[1] for x in rows)
    frac = sum(x[0] for x in rows if x[4] < batch) / wsum
    power = power_gpu * n
    return SteadyState(
        throughput_tok_s=thr, power_w=power, tokens_per_joule=thr / power,
        itl_median_s=itl_med, itl_p90_s=itl_p90, sm_clock_mhz=clock, batch=batch,
        kv_limited=kv_limited, power_per_gpu_w=power_gpu, decode_step_s=t_d, mixed_step_s=t_m,
        mixed_step_fraction=frac, ttft_s=pref_steps * t_mean,
        request_latency_s=pref_steps * t_m + (o - 1.0) * t_mean)
