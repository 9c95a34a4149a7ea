"""Roofline iteration time, power and power-cap firmware of a tensor-parallel GPU group.

One engine step on ``N`` GPUs (tensor parallel; expert weights split evenly) costs, per GPU:

* memory time  ``t_mem = (dense weights/N + distinct experts hit × expert bytes/N + KV reads/N')
  / (bw_eff × HBM bandwidth)`` — clock independent;
* compute time ``t_comp = FLOPs/N / (flops_eff × peak) / r`` with ``r = f / f_max`` the SM clock;
* per-sequence time ``seq_time_s × sequences / r`` (attention launch, sampling, per-sequence
  kernel work; the GPU is busy during it);
* all-reduce time (two per layer, ring over NVLink) and a fixed host overhead per step
  (GPU idle).

``t = max(t_mem, t_comp) + t_seq + t_comm + t_fixed``.

Power per GPU: ``P = P_idle + P_dyn · r · V(r)² · A / t`` with ``V(r) = max(v_floor, r)``
(voltage stops falling below a fraction of the max clock) and ``A`` the activity-weighted busy
time: compute and per-sequence time count fully, memory-stalled time with weight
``mem_activity``; all-reduce waits and host overhead count as idle. The firmware runs at the highest clock whose power fits the cap.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from importlib import resources
from typing import Any, NamedTuple

from palsctl.errors import ConfigError
from palsctl.plants.sim.specs import GPUSpec, ModelSpec

__all__ = ["PlantConstants", "default_constants", "StepCost", "GroupModel"]


@dataclass(frozen=True, kw_only=True, slots=True)
class PlantConstants:
    """The plant's few global efficiency constants (fitted by ``palsctl calibrate``)."""

    bw_eff: float = 0.80            # achieved fraction of datasheet HBM bandwidth
    flops_eff: float = 0.60         # achieved fraction of dense tensor-core peak at max clock
    step_overhead_s: float = 2.0e-3  # host time per engine step (GPU idle)
    seq_time_s: float = 3.0e-5      # GPU time per running sequence per step at max clock
    comm_latency_s: float = 1.0e-5  # latency of one all-reduce
    dyn_power_frac: float = 1.1     # dynamic power at max clock, full activity, × (TDP − idle)
    mem_activity: float = 0.6       # activity of memory-stalled time relative to compute
    v_floor: float = 0.8            # voltage floor as a fraction of the max-clock voltage
    comm_bw_eff: float = 0.7        # achieved fraction of NVLink bandwidth in all-reduce

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError("plant constant must be a positive number", key=f.name, value=v)
        for name in ("bw_eff", "flops_eff", "mem_activity", "v_floor", "comm_bw_eff"):
            if getattr(self, name) > 1.0:
                raise ConfigError("plant constant must be <= 1", key=name, value=getattr(self, name))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, file: str | None = None) -> "PlantConstants":
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                raise ConfigError(f"unknown plant constant; known: {', '.join(sorted(known))}",
                                  file=file, key=k)
        return cls(**{k: float(v) for k, v in d.items()})


@lru_cache(maxsize=1)
def _committed_calibration() -> dict[str, Any]:
    try:
        text = resources.files("palsctl").joinpath("data/calibration.json").read_text()
    except (FileNotFoundError, ModuleNotFoundError, OSError):
        return {}
    return json.loads(text)


def default_constants() -> PlantConstants:
    """The committed, calibrated constants (``palsctl/data/calibration.json``), or the built-in
    defaults when that file is absent."""
    cal = _committed_calibration()
    if "constants" in cal:
        return PlantConstants.from_dict(cal["constants"], file="calibration.json")
    return PlantConstants()


class StepCost(NamedTuple):
    """Clock-independent parts of one engine step on one GPU (seconds at max clock)."""

    t_mem_s: float
    t_comp1_s: float
    t_seq1_s: float
    t_comm_s: float
    t_fixed_s: float


class GroupModel:
    """Time and power of engine steps of ``model`` on ``num_gpus`` × ``gpu`` (tensor parallel)."""

    def __init__(self, model: ModelSpec, gpu: GPUSpec, num_gpus: int,
                 constants: PlantConstants | None = None) -> None:
        if not isinstance(num_gpus, int) or isinstance(num_gpus, bool) or num_gpus < 1:
            raise ConfigError("num_gpus must be an integer >= 1", key="num_gpus", value=num_gpus)
        c = constants or default_constants()
        self.model, self.gpu, self.num_gpus, self.constants = model, gpu, num_gpus, c
        n = num_gpus
        self._bw = gpu.mem_bw_bytes_s * c.bw_eff
        peak = gpu.fp8_flops if model.compute_bytes == 1 else gpu.bf16_flops
        self._flops = peak * c.flops_eff
        self._w_dense = model.dense_weight_bytes / n
        self._w_expert = model.expert_bytes / n
        self._moe_layers = model.num_moe_layers
        self._E = model.num_experts
        self._log_miss = math.log1p(-model.experts_per_token / model.num_experts) if model.is_moe \
            else 0.0
        self._kv_tok = model.kv_bytes_per_token / min(n, model.num_kv_heads)
        self._sw = model.sliding_window
        self._sf = model.sliding_layer_fraction if model.sliding_window else 0.0
        self._flop_tok = 2.0 * model.active_params / n
        self._attn_flop = 4.0 * model.num_layers * model.num_heads * model.head_dim / n
        if n > 1:
            self._ar_n = 2 * model.num_layers
            self._ar_bytes_tok = 2.0 * (n - 1) / n * model.hidden_size * 2.0 / \
                (gpu.link_bw_bytes_s * c.comm_bw_eff)
        else:
            self._ar_n, self._ar_bytes_tok = 0, 0.0
        self.idle_w = gpu.idle_w
        self.dyn_w = c.dyn_power_frac * (gpu.tdp_w - gpu.idle_w)
        self.r_min = gpu.min_sm_clock_mhz / gpu.max_sm_clock_mhz
        self._a = c.mem_activity
        self._v0 = c.v_floor
        self._seq = c.seq_time_s
        self._fixed = c.step_overhead_s
        self._lat = c.comm_latency_s
        # KV capacity (tokens, whole group) after weights, at vLLM's default 0.9 memory use
        per_gpu_free = 0.9 * gpu.mem_bytes - model.weight_bytes / n - 2.0e9
        self.kv_capacity_tokens = int(max(0.0, per_gpu_free) / self._kv_tok)

    # ---- pieces -------------------------------------------------------------------------
    def distinct_experts(self, tokens: float) -> float:
        """Expected distinct experts hit per MoE layer by ``tokens`` tokens (uniform routing)."""
        if not self._E or tokens <= 0:
            return 0.0
        return self._E * -math.expm1(tokens * self._log_miss)

    def _kv_read(self, n_seqs: float, ctx_sum: float) -> float:
        if self._sf:
            return (1.0 - self._sf) * ctx_sum + self._sf * min(ctx_sum, n_seqs * self._sw)
        return ctx_sum

    def step_cost(self, n_dec: float, ctx_dec: float, n_pref: float = 0.0,
                  pref_attn: float = 0.0, pref_kv: float = 0.0,
                  n_pref_seqs: float = 0.0) -> StepCost:
        """Cost of one step: ``n_dec`` decoding sequences whose contexts sum to ``ctx_dec``
        tokens; ``n_pref`` prefill tokens from ``n_pref_seqs`` sequences, whose attention spans
        ``pref_attn`` token pairs in all and which read ``pref_kv`` KV tokens in all."""
        tokens = n_dec + n_pref
        w = self._w_dense
        if self._E:
            w += self._moe_layers * self.distinct_experts(tokens) * self._w_expert
        kv_dec = self._kv_read(n_dec, ctx_dec)
        kv_tokens = kv_dec + (self._kv_read(n_pref_seqs, pref_kv) if n_pref_seqs else 0.0)
        t_mem = (w + kv_tokens * self._kv_tok) / self._bw
        flops = tokens * self._flop_tok + self._attn_flop * (kv_dec + pref_attn)
        t_comp1 = flops / self._flops
        t_seq1 = self._seq * (n_dec + n_pref_seqs)
        t_comm = self._ar_n * (self._lat + tokens * self._ar_bytes_tok) if self._ar_n else 0.0
        return StepCost(t_mem, t_comp1, t_seq1, t_comm, self._fixed)

    # ---- time and power at a clock ratio r = f / f_max ------------------------------------
    @staticmethod
    def step_time(c: StepCost, r: float) -> float:
        tc = c.t_comp1_s / r
        return (c.t_mem_s if c.t_mem_s > tc else tc) + c.t_seq1_s / r + c.t_comm_s + c.t_fixed_s

    def power_per_gpu(self, c: StepCost, r: float) -> float:
        """Mean power of one GPU (W) over a step of cost ``c`` at clock ratio ``r``."""
        tc = c.t_comp1_s / r
        ts = c.t_seq1_s / r
        if c.t_mem_s > tc:
            kern, act = c.t_mem_s, self._a * (c.t_mem_s - tc) + tc
        else:
            kern, act = tc, tc
        act += ts   # all-reduce waits and host overhead: the GPU idles
        t = kern + ts + c.t_comm_s + c.t_fixed_s
        v = r if r > self._v0 else self._v0
        return self.idle_w + self.dyn_w * r * v * v * act / t

    def clock_for_cap(self, c: StepCost, cap_w: float) -> float:
        """Highest clock ratio in [r_min, 1] whose power fits ``cap_w`` (per GPU)."""
        if self.power_per_gpu(c, 1.0) <= cap_w:
            return 1.0
        lo, hi = self.r_min, 1.0
        if self.power_per_gpu(c, lo) >= cap_w:
            return lo
        for _ in range(18):
            mid = 0.5 * (lo + hi)
            if self.power_per_gpu(c, mid) <= cap_w:
                lo = mid
            else:
                hi = mid
        return lo
