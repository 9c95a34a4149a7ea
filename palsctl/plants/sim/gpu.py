"""Roofline iteration time, power and power-cap firmware of a GPU group (tensor or expert parallel).

One engine step is a sequence of kernels; each kernel class is bound either by the bytes it
moves or by the FLOPs it does, so its time is its own roofline ``max(bytes / (bw_eff · HBM
bandwidth), FLOPs / (flops_eff · peak) / r)`` with ``r = f / f_max`` the SM clock ratio. Per GPU:

* **linear layers** (attention projections, dense FFNs, shared experts, routers, LM head):
  the weights held by the GPU versus ``2 × parameters × tokens``;
* **routed experts**: the *distinct* experts the step's tokens hit (expected number, top-k of E
  with a skewed expert popularity, see `GroupModel.distinct_experts`) versus
  ``2 × k × expert parameters × tokens``;
* **attention**: the KV cache read (the context of every sequence in flight, at most the
  window in sliding-window layers) versus the score and value FLOPs;
* per-sequence time ``seq_time_s × sequences / r`` (sampling, per-sequence kernel work);
* collectives, the launch gaps and tails of the kernels of every layer (``layer_time_s`` per
  layer) and the host's work for the step (GPU idle): a fixed overhead, a share per running
  sequence (``host_seq_time_s``) and a share per sequence that prefills in the step
  (``prefill_seq_time_s``).

``t = Σ_kernels roofline + t_seq + t_comm + t_fixed`` with ``t_fixed = step_overhead_s +
layers × layer_time_s + sequences × host_seq_time_s + prefilling sequences ×
prefill_seq_time_s``. Routed experts may stream and multiply at their own fraction of the dense
layers' rates (``expert_bw_ratio``, ``expert_flops_ratio``: grouped expert kernels are tuned per
GPU). The host and expert terms are 0 and 1 in the H100-fitted set (Hopper and Ampere); the
B200 set fits them (see `palsctl.plants.sim.calibration`).

Parallelism (``parallelism``):

* ``"tp"``: tensor parallel over ``N`` GPUs: every GPU holds 1/N of every weight (KV heads split
  up to their number), sees every token, and all-reduces the hidden state twice per layer.
* ``"ep"``: vLLM's expert parallel with data-parallel attention (``--data-parallel-size N
  --enable-expert-parallel``): each GPU runs attention and the dense layers for its own 1/N of
  the sequences with a full copy of the dense weights and its sequences' whole KV cache; the
  routed experts are sharded whole (E/N per GPU); tokens are dispatched to and combined from
  the experts' owners (an all-gather and a reduce-scatter per MoE layer over NVLink); the step
  waits for the busiest GPU, whose share of the routed tokens exceeds 1/N by the skew of expert
  popularity and by chance (load imbalance).
* ``"tp+ep"``: expert parallel MoE layers with tensor-parallel attention (``--tensor-parallel-size
  N --enable-expert-parallel``): as ``"tp"`` (every GPU sees every token, two all-reduces per
  layer) but the routed experts are sharded whole, with the load imbalance of ``"ep"``.

Power per GPU: ``P = P_idle + P_dyn · r · V(r)² · A / t`` with ``V(r) = max(v_floor, r)``
(voltage stops falling below a fraction of the max clock) and ``A`` the activity-weighted busy
time: compute and per-sequence time count fully, memory-stalled time with weight
``mem_activity``; collective waits, load-imbalance waits and host overhead count as idle. The
firmware runs at the highest clock whose power fits the cap.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from importlib import resources
from statistics import NormalDist
from typing import Any, NamedTuple

from palsctl.errors import ConfigError
from palsctl.plants.sim.specs import GPUSpec, ModelSpec, weight_bytes_per_gpu

__all__ = ["PlantConstants", "default_constants", "StepCost", "GroupModel", "PARALLELISMS",
           "GPU_MEMORY_UTILIZATION", "MEMORY_RESERVE_BYTES", "constants_key"]

PARALLELISMS = ("tp", "ep", "tp+ep")
GPU_MEMORY_UTILIZATION = 0.9     # vLLM's default share of GPU memory it may use
MEMORY_RESERVE_BYTES = 2.0e9     # activations, CUDA graphs, NCCL buffers per GPU


@dataclass(frozen=True, kw_only=True, slots=True)
class PlantConstants:
    """The plant's few global efficiency constants (fitted by ``palsctl calibrate``).

    Parameters
    ----------
    bw_eff : float, default 0.8
        Achieved fraction of the datasheet HBM bandwidth.
    flops_eff : float, default 0.6
        Achieved fraction of the dense tensor-core peak at the maximum clock.
    step_overhead_s : float, default 2e-3
        Host time per engine step (GPU idle), s.
    seq_time_s : float, default 3e-5
        GPU time per running sequence per step at the maximum clock, s.
    comm_latency_s : float, default 1e-5
        Latency of one collective on 2 GPUs (× log2 N on N), s.
    dyn_power_frac : float, default 1.1
        Dynamic power at the maximum clock and full activity, × (TDP − idle).
    mem_activity : float, default 0.6
        Activity of memory-stalled time relative to compute.
    v_floor : float, default 0.8
        Voltage floor, a fraction of the maximum-clock voltage.
    comm_bw_eff : float, default 0.7
        Achieved fraction of the NVLink bandwidth in collectives.
    route_skew : float, default 0.4
        Exponent of the Zipf-like popularity of routed experts (``p_e ∝ (e+1)^-s``; 0: uniform):
        how fast the distinct experts a batch touches grow with the batch, and the load imbalance
        of expert parallelism.
    layer_time_s : float, default 5e-5
        Kernel launch gaps and tails per layer per step (GPU idle), s.
    fp8_flops_eff : float, default 0.4
        Achieved fraction of the dense FP8 tensor-core peak.
    host_seq_time_s : float, default 0.0
        Host time per running sequence per step (GPU idle), s: scheduling, input preparation
        and output processing on the CPU that the GPU waits for.
    prefill_seq_time_s : float, default 0.0
        Host time per sequence that prefills in a step (GPU idle), s: its prompt inputs and
        attention metadata are built on the CPU.
    expert_bw_ratio : float, default 1.0
        Achieved bandwidth of the routed-expert weight reads, a fraction of the dense layers'
        (``bw_eff``).
    expert_flops_ratio : float, default 1.0
        Achieved FLOP/s of the routed-expert GEMMs, a fraction of the dense layers'.
    """

    bw_eff: float = 0.80            # achieved fraction of datasheet HBM bandwidth
    flops_eff: float = 0.60         # achieved fraction of dense tensor-core peak at max clock
    step_overhead_s: float = 2.0e-3  # host time per engine step (GPU idle)
    seq_time_s: float = 3.0e-5      # GPU time per running sequence per step at max clock
    comm_latency_s: float = 1.0e-5  # latency of one collective on 2 GPUs (× log2 N on N)
    dyn_power_frac: float = 1.1     # dynamic power at max clock, full activity, × (TDP − idle)
    mem_activity: float = 0.6       # activity of memory-stalled time relative to compute
    v_floor: float = 0.8            # voltage floor as a fraction of the max-clock voltage
    comm_bw_eff: float = 0.7        # achieved fraction of NVLink bandwidth in collectives
    route_skew: float = 0.4         # Zipf exponent of expert popularity (0 = uniform)
    layer_time_s: float = 5.0e-5    # kernel launch gaps and tails per layer per step (GPU idle)
    fp8_flops_eff: float = 0.40     # achieved fraction of the dense FP8 tensor-core peak
    host_seq_time_s: float = 0.0    # host time per running sequence per step (GPU idle)
    prefill_seq_time_s: float = 0.0  # host time per sequence prefilling in a step (GPU idle)
    expert_bw_ratio: float = 1.0    # routed-expert weight bandwidth, × the dense layers'
    expert_flops_ratio: float = 1.0  # routed-expert GEMM FLOP/s, × the dense layers'

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            ok = isinstance(v, (int, float)) and math.isfinite(v)
            if not ok or v < 0 or (v == 0 and f.name not in _MAY_BE_ZERO):
                raise ConfigError("plant constant must be a positive number", key=f.name, value=v)
        for name in ("bw_eff", "flops_eff", "mem_activity", "v_floor", "comm_bw_eff",
                     "fp8_flops_eff", "expert_bw_ratio", "expert_flops_ratio"):
            if getattr(self, name) > 1.0:
                raise ConfigError("plant constant must be <= 1", key=name,
                                  value=getattr(self, name))
        if self.route_skew > 3.0:
            raise ConfigError("route_skew must be <= 3", key="route_skew", value=self.route_skew)

    def to_dict(self) -> dict[str, float]:
        """The constants as a dict (field name -> value)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, file: str | None = None) -> "PlantConstants":
        """Constants from a dict (unknown keys raise `ConfigError` naming ``file``)."""
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                raise ConfigError(f"unknown plant constant; known: {', '.join(sorted(known))}",
                                  file=file, key=k)
        return cls(**{k: float(v) for k, v in d.items()})


# constants for which 0 is a value (no skew, no host time), not a missing one
_MAY_BE_ZERO = ("route_skew", "host_seq_time_s", "prefill_seq_time_s")


@lru_cache(maxsize=1)
def _committed_calibration() -> dict[str, Any]:
    try:
        text = resources.files("palsctl").joinpath("data/calibration.json").read_text()
    except (FileNotFoundError, ModuleNotFoundError, OSError):
        return {}
    return json.loads(text)


def constants_key(gpu: str | GPUSpec | None) -> str:
    """The calibration group of a GPU: ``"b200"`` (Blackwell, its own constants) or ``"base"``
    (Hopper and Ampere share the H100-fitted constants)."""
    name = gpu.name if isinstance(gpu, GPUSpec) else (gpu or "")
    return "b200" if name.lower().startswith("b200") else "base"


def default_constants(gpu: str | GPUSpec | None = None) -> PlantConstants:
    """Return the committed, calibrated efficiency constants for a GPU.

    They come from ``palsctl/data/calibration.json`` (``palsctl calibrate``); the built-in
    defaults when that file is absent.

    Parameters
    ----------
    gpu : str, GPUSpec or None
        The GPU (None: the H100-fitted constants, which the Hopper and Ampere presets use; B200
        has its own).

    Returns
    -------
    PlantConstants
        The constants.
    """
    cal = _committed_calibration()
    key = constants_key(gpu)
    by_gpu = cal.get("constants_by_gpu", {})
    if key in by_gpu:
        return PlantConstants.from_dict(by_gpu[key], file="calibration.json")
    if "constants" in cal:
        return PlantConstants.from_dict(cal["constants"], file="calibration.json")
    return PlantConstants()


class StepCost(NamedTuple):
    """Clock-independent parts of one engine step on one GPU (seconds at max clock): memory and
    compute time of the linear layers, the routed experts (``exp_imbalance`` ≥ 1: the busiest
    GPU's load over the mean) and attention; per-sequence, collective and host time."""

    m_lin_s: float
    c_lin1_s: float
    m_exp_s: float
    c_exp1_s: float
    exp_imbalance: float
    m_att_s: float
    c_att1_s: float
    t_seq1_s: float
    t_comm_s: float
    t_fixed_s: float

    @property
    def t_mem_s(self) -> float:
        """All memory time (the step's bytes over the achieved bandwidth)."""
        return self.m_lin_s + self.m_exp_s + self.m_att_s

    @property
    def t_comp1_s(self) -> float:
        """All compute time at max clock."""
        return self.c_lin1_s + self.c_exp1_s + self.c_att1_s


_D_EXACT = 512          # distinct-expert table: exact at integer tokens up to this
_D_RATIO = 1.04         # then on a geometric grid
_D_MAX = 2.0 ** 22


def _expert_inclusion(num_experts: int, top_k: int, skew: float) -> list[float]:
    """Probability that a token routes to each expert (sum = k, each ≤ 1): Zipf-like
    popularity ``p_e ∝ (e+1)^-skew`` scaled to k picks, capped at 1 and redistributed."""
    w = [(e + 1.0) ** -skew for e in range(num_experts)]
    pi = [0.0] * num_experts
    free = list(range(num_experts))
    left = float(top_k)
    while free:
        tot = sum(w[e] for e in free)
        over = [e for e in free if left * w[e] / tot >= 1.0]
        if not over:
            for e in free:
                pi[e] = left * w[e] / tot
            break
        for e in over:
            pi[e] = 1.0
            left -= 1.0
        free = [e for e in free if e not in set(over)]
    return pi


class GroupModel:
    """Time and power of the engine steps of a model on a group of GPUs.

    Parameters
    ----------
    model : ModelSpec
        The model.
    gpu : GPUSpec
        The GPU.
    num_gpus : int
        GPUs in the group.
    constants : PlantConstants or None
        Efficiency constants (None: the committed calibration for ``gpu``).
    parallelism : {"tp", "ep", "tp+ep"}
        Tensor parallel, expert parallel with data-parallel attention, or expert-parallel MoE
        layers with tensor-parallel attention (all the same on one GPU).
    """

    def __init__(self, model: ModelSpec, gpu: GPUSpec, num_gpus: int,
                 constants: PlantConstants | None = None, parallelism: str = "tp") -> None:
        if not isinstance(num_gpus, int) or isinstance(num_gpus, bool) or num_gpus < 1:
            raise ConfigError("num_gpus must be an integer >= 1", key="num_gpus", value=num_gpus)
        if parallelism not in PARALLELISMS:
            raise ConfigError(f"parallelism must be one of {', '.join(PARALLELISMS)}",
                              key="parallelism", value=parallelism)
        c = constants or default_constants(gpu)
        self.model, self.gpu, self.num_gpus, self.constants = model, gpu, num_gpus, c
        n = num_gpus
        ep = parallelism == "ep" and n > 1             # data-parallel attention
        self.parallelism = parallelism
        self._ep = n > 1 and parallelism in ("ep", "tp+ep")   # experts sharded whole
        self._bw = gpu.mem_bw_bytes_s * c.bw_eff
        if model.compute_bytes == 1:
            self._flops = gpu.fp8_flops * c.fp8_flops_eff
        else:
            self._flops = gpu.bf16_flops * c.flops_eff
        # routed experts run grouped kernels whose efficiency is tuned per GPU (× 1.0 exactly
        # where the ratios are 1: the H100-fitted set)
        self._bw_exp = self._bw * c.expert_bw_ratio
        self._flops_exp = self._flops * c.expert_flops_ratio
        # the share of the step's tokens and sequences each GPU runs attention/dense layers for
        self._share = 1.0 / n if ep else 1.0
        wsplit = 1 if ep else n          # dense weights: replicated (ep) or split (tp)
        self._w_dense = model.dense_weight_bytes / wsplit
        self._w_expert = model.expert_bytes / n
        self._moe_layers = model.num_moe_layers
        self._E = model.num_experts
        self._lin_flop_tok = 2.0 * model.dense_params / n   # all tokens over n, or 1/n of them
        self._exp_flop_tok = 2.0 * model.experts_per_token * model.expert_params * \
            model.num_moe_layers / n
        # KV bytes a GPU reads per token of context in the group: its own sequences' whole
        # cache (ep) or its share of the KV heads (tp; MLA's latent is not split)
        kv_split = n if ep else min(n, model.kv_shards)
        self._kv_tok = model.kv_bytes_per_token / kv_split
        self._sw = model.sliding_window
        self._sf = model.sliding_layer_fraction if model.sliding_window else 0.0
        self._attn_flop = model.attn_flops_per_pair / n
        link = gpu.link_bw_bytes_s * c.comm_bw_eff
        hbytes = model.hidden_size * 2.0
        if n > 1 and not ep:    # two ring all-reduces of the hidden state per layer
            self._coll_n = 2 * model.num_layers
            self._coll_s_tok = 2.0 * (n - 1) / n * hbytes / link
        elif ep:                # all-gather + reduce-scatter of the hidden state per MoE layer
            self._coll_n = 2 * model.num_moe_layers
            self._coll_s_tok = (n - 1) / n * hbytes / link
        else:
            self._coll_n, self._coll_s_tok = 0, 0.0
        # kept for callers of the previous version
        self._ar_n, self._ar_bytes_tok = self._coll_n, self._coll_s_tok
        self.idle_w = gpu.idle_w
        self.dyn_w = c.dyn_power_frac * (gpu.tdp_w - gpu.idle_w)
        self.r_min = gpu.min_sm_clock_mhz / gpu.max_sm_clock_mhz
        self._a = c.mem_activity
        self._v0 = c.v_floor
        self._seq = c.seq_time_s * self._share
        self._fixed = c.step_overhead_s + c.layer_time_s * model.num_layers
        # host work that grows with the sequences in the step and with those prefilling (0 in
        # the H100-fitted set, where adding 0.0 changes no step time)
        self._host_seq = c.host_seq_time_s * self._share
        self._host_pref = c.prefill_seq_time_s * self._share
        self._parts: dict[tuple[float, float], tuple[float, ...]] = {}   # max_clock_parts
        # a collective's latency grows with the number of hops of a tree/recursive-doubling
        # exchange: log2(N) (1 on two GPUs)
        self._lat = c.comm_latency_s * math.log2(n) if n > 1 else 0.0
        # expert coverage: distinct experts per layer vs tokens (table) and EP load imbalance
        self._dtab: list[float] = []
        self._dlog: list[float] = []
        self._imb_static_var = 0.0
        self._z_max = 0.0
        if self._E:
            pi = _expert_inclusion(self._E, model.experts_per_token, c.route_skew)
            self._build_distinct_table(pi)
            if self._ep:
                k = model.experts_per_token
                p = [x / k for x in pi]        # share of the routed tokens per expert
                mean = 1.0 / self._E
                var = sum((x - mean) ** 2 for x in p) / self._E
                per = self._E / n              # experts per GPU, placed without regard to load
                fpc = (self._E - per) / max(1.0, self._E - 1.0)
                self._imb_static_var = per * var * fpc
                self._z_max = NormalDist().inv_cdf((n - 0.375) / (n + 0.25))
        # memory: weights per GPU and the KV cache (tokens of the whole group) after them
        self.weight_bytes_per_gpu = weight_bytes_per_gpu(model, n, parallelism)
        per_gpu_free = GPU_MEMORY_UTILIZATION * gpu.mem_bytes - self.weight_bytes_per_gpu - \
            MEMORY_RESERVE_BYTES
        self.fits = per_gpu_free > 0
        kv_cache_tok = model.kv_cache_bytes_per_token / kv_split   # per GPU, per token
        self.kv_capacity_tokens = int(max(0.0, per_gpu_free) / kv_cache_tok) * (n if ep else 1)
        # sliding-window layers hold up to the window per sequence: in tokens of the full layers
        self.kv_seq_tokens = int(math.ceil(model.kv_window_bytes_per_seq /
                                           model.kv_cache_bytes_per_token)) if self._sf else 0

    # ---- expert coverage -------------------------------------------------------------------
    def _build_distinct_table(self, pi: list[float]) -> None:
        import numpy as np

        p = np.asarray(pi, dtype=float)
        lq = np.log1p(-np.minimum(p, 1.0 - 1e-12))
        ts: list[float] = list(range(_D_EXACT + 1))
        t = float(_D_EXACT)
        while t < _D_MAX:
            t *= _D_RATIO
            ts.append(t)
        tt = np.asarray(ts)
        d = (-np.expm1(np.outer(tt, lq))).sum(axis=1)
        self._dtab = [float(x) for x in d]
        self._dts = ts
        self._dlog_r = math.log(_D_RATIO)

    def distinct_experts(self, tokens: float) -> float:
        """Expected distinct experts hit per MoE layer by ``tokens`` tokens (each routed to k
        of E experts with the calibrated popularity skew; uniform routing when it is 0)."""
        if not self._E or tokens <= 0:
            return 0.0
        tab = self._dtab
        if tokens <= _D_EXACT:
            i = int(tokens)
            if i >= _D_EXACT:
                return tab[_D_EXACT]
            f = tokens - i
            return tab[i] + f * (tab[i + 1] - tab[i])
        x = math.log(tokens / _D_EXACT) / self._dlog_r
        i = int(x)
        j = _D_EXACT + i
        if j + 1 >= len(tab):
            return tab[-1]
        t0, t1 = self._dts[j], self._dts[j + 1]
        return tab[j] + (tokens - t0) / (t1 - t0) * (tab[j + 1] - tab[j])

    def expert_imbalance(self, tokens: float) -> float:
        """Expected busiest-GPU share of the routed tokens over the mean share (expert parallel;
        1 otherwise): the static skew of expert popularity over the GPUs plus multinomial
        chance for ``tokens`` tokens."""
        if not self._z_max or tokens <= 0:
            return 1.0
        n = self.num_gpus
        var = self._imb_static_var + (1.0 / n) * (1.0 - 1.0 / n) / \
            (tokens * self.model.experts_per_token)
        return 1.0 + self._z_max * n * math.sqrt(var)

    # ---- pieces -------------------------------------------------------------------------
    def _kv_read(self, n_seqs: float, ctx_sum: float) -> float:
        if self._sf:
            return (1.0 - self._sf) * ctx_sum + self._sf * min(ctx_sum, n_seqs * self._sw)
        return ctx_sum

    def step_cost(self, n_dec: float, ctx_dec: float, n_pref: float = 0.0,
                  pref_attn: float = 0.0, pref_kv: float = 0.0,
                  n_pref_seqs: float = 0.0) -> StepCost:
        """Cost of one step: ``n_dec`` decoding sequences whose contexts sum to ``ctx_dec``
        tokens; ``n_pref`` prefill tokens from ``n_pref_seqs`` sequences, whose attention spans
        ``pref_attn`` token pairs in all and which read ``pref_kv`` KV tokens in all (totals
        over the group; a GPU's share follows the parallelism)."""
        tokens = n_dec + n_pref
        bw, fl = self._bw, self._flops
        m_lin = self._w_dense / bw
        c_lin = tokens * self._lin_flop_tok / fl
        if self._E:
            m_exp = self._moe_layers * self.distinct_experts(tokens) * self._w_expert / \
                self._bw_exp
            c_exp = tokens * self._exp_flop_tok / self._flops_exp
            imb = self.expert_imbalance(tokens) if self._ep else 1.0
        else:
            m_exp = c_exp = 0.0
            imb = 1.0
        kv_dec = self._kv_read(n_dec, ctx_dec)
        kv_tokens = kv_dec + (self._kv_read(n_pref_seqs, pref_kv) if n_pref_seqs else 0.0)
        m_att = kv_tokens * self._kv_tok / bw
        c_att = self._attn_flop * (kv_dec + pref_attn) / fl
        t_seq1 = self._seq * (n_dec + n_pref_seqs)
        t_comm = self._coll_n * (self._lat + tokens * self._coll_s_tok) if self._coll_n else 0.0
        t_fixed = self._fixed + self._host_seq * (n_dec + n_pref_seqs) \
            + self._host_pref * n_pref_seqs
        return StepCost(m_lin, c_lin, m_exp, c_exp, imb, m_att, c_att, t_seq1, t_comm, t_fixed)

    # ---- time and power at a clock ratio r = f / f_max ------------------------------------
    @staticmethod
    def step_time(c: StepCost, r: float) -> float:
        """Duration of an engine step of cost ``c`` at relative clock ``r``, s."""
        tl = c.c_lin1_s / r
        te = c.c_exp1_s / r
        ta = c.c_att1_s / r
        return ((c.m_lin_s if c.m_lin_s > tl else tl)
                + c.exp_imbalance * (c.m_exp_s if c.m_exp_s > te else te)
                + (c.m_att_s if c.m_att_s > ta else ta)
                + c.t_seq1_s / r + c.t_comm_s + c.t_fixed_s)

    def power_per_gpu(self, c: StepCost, r: float) -> float:
        """Mean power of one GPU (W) over a step of cost ``c`` at clock ratio ``r``."""
        a = self._a
        tl = c.c_lin1_s / r
        te = c.c_exp1_s / r
        ta = c.c_att1_s / r
        ts = c.t_seq1_s / r
        busy = act = ts
        m = c.m_lin_s
        if m > tl:
            busy += m
            act += a * (m - tl) + tl
        else:
            busy += tl
            act += tl
        m = c.m_exp_s
        if m > te:
            be = m
            act += a * (m - te) + te
        else:
            be = te
            act += te
        busy += c.exp_imbalance * be       # the wait for the busiest GPU idles
        m = c.m_att_s
        if m > ta:
            busy += m
            act += a * (m - ta) + ta
        else:
            busy += ta
            act += ta
        t = busy + c.t_comm_s + c.t_fixed_s    # collective waits and host overhead: idle
        v = r if r > self._v0 else self._v0
        return self.idle_w + self.dyn_w * r * v * v * act / t

    def time_power(self, c: StepCost, r: float) -> tuple[float, float]:
        """``(step_time(c, r), power_per_gpu(c, r))`` bit for bit, in one pass (s, W): the
        firmware's clock search evaluates both at every clock it tries. A copy of their sums,
        not a call to them (this is the hot path; `power_per_gpu` stays separate for the
        callers that need power only); the bit-for-bit equality is tested."""
        a = self._a
        tl = c.c_lin1_s / r
        te = c.c_exp1_s / r
        ta = c.c_att1_s / r
        ts = c.t_seq1_s / r
        busy = act = ts
        m = c.m_lin_s
        if m > tl:
            busy += m
            act += a * (m - tl) + tl
            t_lin = m
        else:
            busy += tl
            act += tl
            t_lin = tl
        m = c.m_exp_s
        if m > te:
            be = m
            act += a * (m - te) + te
        else:
            be = te
            act += te
        imb_be = c.exp_imbalance * be
        busy += imb_be
        m = c.m_att_s
        if m > ta:
            busy += m
            act += a * (m - ta) + ta
            t_att = m
        else:
            busy += ta
            act += ta
            t_att = ta
        t_comm, t_fixed = c.t_comm_s, c.t_fixed_s
        v = r if r > self._v0 else self._v0
        return (t_lin + imb_be + t_att + ts + t_comm + t_fixed,
                self.idle_w + self.dyn_w * r * v * v * act / (busy + t_comm + t_fixed))

    # ---- the same at the max clock, fast (the engine's hot path) ---------------------------
    # At r = 1 every "/ r" and "* r" of step_time and power_per_gpu is exact, and the
    # attention-free terms of a step depend only on its tokens and sequences: they are summed
    # once per (tokens, sequences) in the order step_time and power_per_gpu sum them, and the
    # attention term is added last, as there. Results are bit-identical to
    # step_time(step_cost(...), 1.0) and power_per_gpu(step_cost(...), 1.0).
    def max_clock_parts(self, tokens: float, n_seqs: float) -> tuple[float, ...]:
        """Attention-free partial sums of a step of ``tokens`` tokens and ``n_seqs`` sequences
        at the max clock (cached): time before attention, per-sequence time, collective time,
        busy and activity-weighted time before attention, host time (without the per-prefill
        share)."""
        key = (tokens, n_seqs)
        v = self._parts.get(key)
        if v is not None:
            return v
        c = self.step_cost(tokens, 0.0)
        ml, tl, me, te, imb = c.m_lin_s, c.c_lin1_s, c.m_exp_s, c.c_exp1_s, c.exp_imbalance
        ts = self._seq * n_seqs
        a = self._a
        t_pre = (ml if ml > tl else tl) + imb * (me if me > te else te)
        # power_per_gpu's sums before attention, at r = 1 (not shared through a helper: a call
        # more per power_per_gpu slows steady_state's clock search by ~10 %)
        busy = act = ts
        if ml > tl:
            busy += ml
            act += a * (ml - tl) + tl
        else:
            busy += tl
            act += tl
        if me > te:
            be = me
            act += a * (me - te) + te
        else:
            be = te
            act += te
        busy += imb * be
        if len(self._parts) >= 16384:
            self._parts.clear()
        v = self._parts[key] = (t_pre, ts, c.t_comm_s, busy, act,
                                self._fixed + self._host_seq * n_seqs)
        return v

    def attention_s(self, n_dec: float, ctx_dec: float, pref_attn: float = 0.0,
                    pref_kv: float = 0.0, n_pref_seqs: float = 0.0) -> tuple[float, float]:
        """Memory and max-clock compute time of a step's attention (`StepCost.m_att_s`,
        `StepCost.c_att1_s`; arguments as `step_cost`)."""
        if self._sf:
            kv_dec = self._kv_read(n_dec, ctx_dec)
            kv_tokens = kv_dec + (self._kv_read(n_pref_seqs, pref_kv) if n_pref_seqs else 0.0)
        else:               # _kv_read is the identity
            kv_dec = ctx_dec
            kv_tokens = kv_dec + (pref_kv if n_pref_seqs else 0.0)
        return kv_tokens * self._kv_tok / self._bw, \
            self._attn_flop * (kv_dec + pref_attn) / self._flops

    def time_power_parts(self, parts: tuple[float, ...], m_att_s: float,
                         c_att1_s: float) -> tuple[float, float]:
        """Step time (s) and power per GPU (W) at the max clock from `max_clock_parts` and
        the attention times."""
        t_pre, ts, tc, busy, act, fixed = parts
        if m_att_s > c_att1_s:
            return t_pre + m_att_s + ts + tc + fixed, \
                self.idle_w + self.dyn_w * (act + (self._a * (m_att_s - c_att1_s) + c_att1_s)) \
                / (busy + m_att_s + tc + fixed)
        return t_pre + c_att1_s + ts + tc + fixed, \
            self.idle_w + self.dyn_w * (act + c_att1_s) / (busy + c_att1_s + tc + fixed)

    def time_power_max_clock(self, n_dec: float, ctx_dec: float, n_pref: float = 0.0,
                             pref_attn: float = 0.0, pref_kv: float = 0.0,
                             n_pref_seqs: float = 0.0) -> tuple[float, float]:
        """``(step_time(c, 1.0), power_per_gpu(c, 1.0))`` of ``c = step_cost(...)`` (same
        arguments), bit for bit, without building the `StepCost` (s, W)."""
        if n_pref_seqs and self._host_pref:     # the parts do not know the prefilling share
            return self.time_power(self.step_cost(n_dec, ctx_dec, n_pref, pref_attn, pref_kv,
                                                  n_pref_seqs), 1.0)
        key = (n_dec + n_pref, n_dec + n_pref_seqs)
        parts = self._parts.get(key) or self.max_clock_parts(*key)
        ma, ta = self.attention_s(n_dec, ctx_dec, pref_attn, pref_kv, n_pref_seqs)
        return self.time_power_parts(parts, ma, ta)

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
