"""Hardware and model specifications of the simulated plant (datasheet and published-config facts).

A `GPUSpec` holds datasheet numbers of one GPU; a `ModelSpec` the architecture of one model,
from which the plant derives weight bytes, KV-cache bytes and FLOPs per token. Presets cover
the GPUs and models palsctl is evaluated on; `ModelSpec.from_hf_config` builds a spec for any
model from its Hugging Face ``config.json`` fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from palsctl.errors import ConfigError, UnknownNameError

__all__ = ["GPUSpec", "ModelSpec", "GPU_PRESETS", "MODEL_PRESETS", "check_fits",
           "weight_bytes_per_gpu", "get_gpu", "get_model"]


@dataclass(frozen=True, kw_only=True, slots=True)
class GPUSpec:
    """Datasheet numbers of one GPU (SI units; FLOP/s are dense, without sparsity).

    Parameters
    ----------
    name : str
        The preset name.
    mem_bw_bytes_s : float
        HBM bandwidth, bytes/s.
    bf16_flops, fp8_flops : float
        Dense bf16 and fp8 tensor-core peaks, FLOP/s (fp8 = bf16 where unsupported).
    mem_bytes : float
        HBM capacity, bytes.
    tdp_w : float
        Default (= maximum) power limit, W.
    min_cap_w : float
        Lowest settable power limit, W.
    idle_w : float
        Power at rest with a model loaded, W.
    max_sm_clock_mhz, min_sm_clock_mhz : float
        Highest (boost) SM clock and the lowest the firmware may use under a cap, MHz.
    link_bw_bytes_s : float
        NVLink bandwidth per GPU per direction (collectives), bytes/s.
    """

    name: str
    mem_bw_bytes_s: float          # HBM bandwidth
    bf16_flops: float              # dense bf16 tensor-core peak
    fp8_flops: float               # dense fp8 tensor-core peak (= bf16 where unsupported)
    mem_bytes: float               # HBM capacity
    tdp_w: float                   # default (= max) power limit
    min_cap_w: float               # lowest settable power limit
    idle_w: float                  # power at rest with a model loaded
    max_sm_clock_mhz: float        # highest (boost) SM clock
    min_sm_clock_mhz: float        # lowest SM clock the firmware may use under a cap
    link_bw_bytes_s: float         # NVLink bandwidth per GPU per direction (collectives)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "name":
                v = getattr(self, f.name)
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                    raise ConfigError(f"GPUSpec {self.name!r}: {f.name} must be a positive number",
                                      key=f.name, value=v)
        if not self.idle_w < self.min_cap_w <= self.tdp_w:
            raise ConfigError(f"GPUSpec {self.name!r}: need idle_w < min_cap_w <= tdp_w, got "
                              f"{self.idle_w}, {self.min_cap_w}, {self.tdp_w}")
        if self.min_sm_clock_mhz >= self.max_sm_clock_mhz:
            raise ConfigError(f"GPUSpec {self.name!r}: min_sm_clock_mhz must be below "
                              "max_sm_clock_mhz")


GPU_PRESETS: dict[str, GPUSpec] = {
    g.name: g for g in (
        GPUSpec(name="a100-sxm4-80gb", mem_bw_bytes_s=2.039e12, bf16_flops=312e12, fp8_flops=312e12,
                mem_bytes=80e9, tdp_w=400.0, min_cap_w=100.0, idle_w=55.0,
                max_sm_clock_mhz=1410.0, min_sm_clock_mhz=210.0, link_bw_bytes_s=300e9),
        GPUSpec(name="a100-sxm4-40gb", mem_bw_bytes_s=1.555e12, bf16_flops=312e12, fp8_flops=312e12,
                mem_bytes=40e9, tdp_w=400.0, min_cap_w=100.0, idle_w=50.0,
                max_sm_clock_mhz=1410.0, min_sm_clock_mhz=210.0, link_bw_bytes_s=300e9),
        GPUSpec(name="h100-sxm", mem_bw_bytes_s=3.35e12, bf16_flops=989e12, fp8_flops=1979e12,
                mem_bytes=80e9, tdp_w=700.0, min_cap_w=200.0, idle_w=75.0,
                max_sm_clock_mhz=1980.0, min_sm_clock_mhz=345.0, link_bw_bytes_s=450e9),
        GPUSpec(name="h200", mem_bw_bytes_s=4.8e12, bf16_flops=989e12, fp8_flops=1979e12,
                mem_bytes=141e9, tdp_w=700.0, min_cap_w=200.0, idle_w=80.0,
                max_sm_clock_mhz=1980.0, min_sm_clock_mhz=345.0, link_bw_bytes_s=450e9),
        GPUSpec(name="b200", mem_bw_bytes_s=8.0e12, bf16_flops=2250e12, fp8_flops=4500e12,
                mem_bytes=180e9, tdp_w=1000.0, min_cap_w=200.0, idle_w=140.0,
                max_sm_clock_mhz=1965.0, min_sm_clock_mhz=400.0, link_bw_bytes_s=900e9),
    )
}


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """Architecture of a decoder-only transformer (dense or MoE).

    Parameters
    ----------
    name : str
        The preset name.
    num_layers, hidden_size, num_heads, num_kv_heads, head_dim : int
        Layers, model width, query and key/value heads, head width (for MLA: the query/key head
        width, nope + rope).
    intermediate_size : int
        Dense FFN width (dense models, and the dense layers of an MoE model).
    vocab_size : int
        Vocabulary size.
    num_experts, experts_per_token : int, default 0
        Routed experts per MoE layer (0: dense) and experts each token goes through.
    moe_intermediate_size : int, default 0
        Width of one routed expert.
    shared_intermediate_size : int, default 0
        Total width of the always-active shared experts.
    num_dense_layers : int, default 0
        Layers with a dense FFN in an MoE model, wherever they sit (DeepSeek's leading ones,
        Llama 4's interleaved ones).
    tie_embeddings : bool, default False
        The output projection shares the input embedding.
    dtype_bytes : float, default 2.0
        Bytes per weight of the dense part.
    expert_dtype_bytes : float or None
        Bytes per weight of the routed experts (MXFP4 ≈ 0.53; None: ``dtype_bytes``).
    kv_dtype_bytes : float, default 2.0
        Bytes per KV-cache value.
    compute_bytes : int, default 2
        2: bf16 tensor cores, 1: fp8.
    sliding_window : int, default 0
        Window of the local-attention layers, tokens (0: none).
    sliding_layer_fraction : float, default 0.0
        Fraction of the layers with local attention (they read at most the window and vLLM's
        hybrid KV-cache manager keeps only the window of them).
    family : str
        Model family (for the calibration's breakdowns).
    kv_lora_rank : int, default 0
        > 0 selects multi-head latent attention (MLA): the cache holds one latent of
        ``kv_lora_rank + qk_rope_head_dim`` values per token and layer, shared by all heads.
    q_lora_rank : int, default 0
        MLA low-rank query projection (0: full-rank query).
    qk_rope_head_dim : int, default 0
        MLA: rotary part of the query/key head.
    v_head_dim : int, default 0
        MLA: value head width (0: ``head_dim``).
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int          # dense FFN width (dense models, dense layers of MoE)
    vocab_size: int
    num_experts: int = 0            # routed experts per MoE layer (0 = dense)
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0   # total width of always-active shared experts
    num_dense_layers: int = 0
    tie_embeddings: bool = False
    dtype_bytes: float = 2.0
    expert_dtype_bytes: float | None = None
    kv_dtype_bytes: float = 2.0
    compute_bytes: int = 2
    sliding_window: int = 0
    sliding_layer_fraction: float = 0.0
    family: str = ""
    kv_lora_rank: int = 0           # MLA latent width (0 = ordinary multi-/grouped-query)
    q_lora_rank: int = 0            # MLA low-rank query projection (0 = full-rank query)
    qk_rope_head_dim: int = 0       # MLA: rotary part of the query/key head
    v_head_dim: int = 0             # MLA: value head width (0 = head_dim)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"ModelSpec {self.name!r}: {name} must be a positive integer",
                                  key=name, value=v)
        if self.is_moe:
            if not (1 <= self.experts_per_token <= self.num_experts) \
                    or self.moe_intermediate_size < 1:
                raise ConfigError(f"ModelSpec {self.name!r}: MoE needs 1 <= experts_per_token <= "
                                  "num_experts and moe_intermediate_size >= 1",
                                  key="experts_per_token", value=self.experts_per_token)
        elif self.intermediate_size < 1:
            raise ConfigError(f"ModelSpec {self.name!r}: intermediate_size must be >= 1",
                              key="intermediate_size", value=self.intermediate_size)
        if not 0.0 <= self.sliding_layer_fraction <= 1.0:
            raise ConfigError(f"ModelSpec {self.name!r}: sliding_layer_fraction must be in [0, 1]",
                              key="sliding_layer_fraction", value=self.sliding_layer_fraction)
        if self.dtype_bytes <= 0 or self.kv_dtype_bytes <= 0:
            raise ConfigError(f"ModelSpec {self.name!r}: dtype bytes must be > 0",
                              key="dtype_bytes",
                              value=self.dtype_bytes)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        """Whether the model has routed experts."""
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        """Layers with experts (0 for a dense model)."""
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    @property
    def is_mla(self) -> bool:
        """Whether attention is multi-head latent attention (a compressed KV cache)."""
        return self.kv_lora_rank > 0

    @property
    def attn_params_per_layer(self) -> int:
        """Attention weights per layer (parameters)."""
        h, nh = self.hidden_size, self.num_heads
        if self.is_mla:
            vd = self.v_head_dim or self.head_dim
            nope = self.head_dim - self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * nh * self.head_dim
                 if self.q_lora_rank else h * nh * self.head_dim)
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + \
                self.kv_lora_rank * nh * (nope + vd)
            return q + kv + nh * vd * h
        q = nh * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return h * (q + 2 * kv) + q * h

    @property
    def kv_shards(self) -> int:
        """How many ways tensor parallelism can split the KV cache (KV heads; 1 for MLA)."""
        return 1 if self.is_mla else self.num_kv_heads

    @property
    def attn_flops_per_pair(self) -> float:
        """FLOPs of one (query token, cached token) pair, all layers: scores plus weighted values
        (MLA in vLLM's absorbed decode form: over the latent)."""
        if self.is_mla:
            per_head = 2.0 * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        else:
            per_head = 4.0 * self.head_dim
        return self.num_layers * self.num_heads * per_head

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up, down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def dense_params(self) -> int:
        """Parameters read on every step whatever the routing: attention, dense FFNs, shared
        experts, routers, the LM head (the input embedding is a gather, not a read)."""
        h = self.hidden_size
        p = self.num_layers * self.attn_params_per_layer
        dense_ffn_layers = self.num_layers if not self.is_moe else self.num_dense_layers
        p += dense_ffn_layers * 3 * h * self.intermediate_size
        if self.is_moe:
            p += self.num_moe_layers * (3 * h * self.shared_intermediate_size
                                        + h * self.num_experts)
        p += self.vocab_size * h  # LM head
        return p

    @property
    def total_params(self) -> int:
        """Every weight of the model (parameters; the output embedding unless tied)."""
        emb = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        return self.dense_params + self.num_moe_layers * self.num_experts * self.expert_params + emb

    @property
    def active_params(self) -> int:
        """Parameters multiplied per token (FLOPs per token ≈ 2 × this)."""
        return self.dense_params + self.num_moe_layers * self.experts_per_token * self.expert_params

    @property
    def weight_bytes(self) -> float:
        """Bytes of all weights held in GPU memory (all GPUs together)."""
        eb = self.expert_dtype_bytes if self.expert_dtype_bytes is not None else self.dtype_bytes
        emb = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        return (self.dense_params + emb) * self.dtype_bytes + \
            self.num_moe_layers * self.num_experts * self.expert_params * eb

    @property
    def dense_weight_bytes(self) -> float:
        """Bytes of the weights every token reads (all but the experts)."""
        return self.dense_params * self.dtype_bytes

    @property
    def expert_bytes(self) -> float:
        """Bytes of one expert's weights."""
        eb = self.expert_dtype_bytes if self.expert_dtype_bytes is not None else self.dtype_bytes
        return self.expert_params * eb

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes per token of context, all layers, all GPUs together."""
        if self.is_mla:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * \
                self.kv_dtype_bytes
        return 2.0 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    @property
    def kv_cache_bytes_per_token(self) -> float:
        """KV-cache bytes a long sequence holds per token: the full-attention layers only (vLLM's
        hybrid KV-cache manager keeps at most the window of sliding-window layers)."""
        return self.kv_bytes_per_token * (1.0 - self.sliding_layer_fraction
                                          if self.sliding_window else 1.0)

    @property
    def kv_window_bytes_per_seq(self) -> float:
        """KV-cache bytes a sequence holds in its sliding-window layers (at most)."""
        if not self.sliding_window:
            return 0.0
        return self.kv_bytes_per_token * self.sliding_layer_fraction * self.sliding_window

    # ---- construction from a Hugging Face config -------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], *, name: str,
                       dtype_bytes: float | None = None,
                       expert_dtype_bytes: float | None = None, family: str = "") -> "ModelSpec":
        """Build a spec from the fields of a Hugging Face ``config.json`` (a dict).

        Required: hidden_size, num_hidden_layers, num_attention_heads, vocab_size, and
        intermediate_size (dense) or the MoE fields (num_local_experts / num_experts /
        n_routed_experts, num_experts_per_tok, moe_intermediate_size).

        Covered: grouped-query and multi-head latent attention (DeepSeek-V2/V3: ``kv_lora_rank``,
        ``q_lora_rank``, ``qk_rope_head_dim``, ``qk_nope_head_dim``, ``v_head_dim``); shared
        experts (``n_shared_experts``, ``shared_expert_intermediate_size``, Llama 4's implicit
        one); dense and MoE layer mixes (``first_k_dense_replace`` with ``moe_layer_freq``,
        ``decoder_sparse_step`` and ``mlp_only_layers``, ``interleave_moe_layer_step``; dense
        layers use ``intermediate_size_mlp`` where given); sliding-window and chunked local
        attention; weight formats from ``quantization_config`` (fp8, fbgemm_fp8, 8-bit
        compressed-tensors: 1 byte and fp8 tensor cores; mxfp4: 4.25-bit experts).
        ``dtype_bytes`` / ``expert_dtype_bytes`` given here override the config's format.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"model config for {name!r} must be a dict, "
                              f"got {type(config).__name__}")
        cfg = dict(config)
        if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal: Gemma 3, Llama 4
            tc = cfg["text_config"]
            if not isinstance(tc, Mapping):
                raise ConfigError(f"model config for {name!r}: text_config must be a dict",
                                  key="text_config", value=type(tc).__name__)
            cfg = {**cfg, **tc}

        def req(key: str) -> Any:
            if key not in cfg or cfg[key] is None:
                raise ConfigError(f"model config for {name!r} is missing a required field",
                                  key=key)
            return cfg[key]

        def as_int(key: str, v: Any) -> int:
            try:
                iv = int(v)
            except (TypeError, ValueError):
                raise ConfigError(f"model config for {name!r}: field must be an integer",
                                  key=key, value=v) from None
            if iv != v or iv < 0:
                raise ConfigError(f"model config for {name!r}: field must be a non-negative "
                                  "integer",
                                  key=key, value=v)
            return iv

        def opt_int(key: str) -> int:
            return as_int(key, cfg[key]) if cfg.get(key) else 0

        hidden = as_int("hidden_size", req("hidden_size"))
        layers = as_int("num_hidden_layers", req("num_hidden_layers"))
        heads = as_int("num_attention_heads", req("num_attention_heads"))
        vocab = as_int("vocab_size", req("vocab_size"))
        kv_heads = as_int("num_key_value_heads", cfg.get("num_key_value_heads") or heads)
        kv_lora, q_lora, rope, v_dim = (opt_int("kv_lora_rank"), opt_int("q_lora_rank"),
                                        opt_int("qk_rope_head_dim"), opt_int("v_head_dim"))
        if kv_lora:   # MLA: query/key heads are nope + rope wide
            head_dim = as_int("qk_nope_head_dim", req("qk_nope_head_dim")) + rope
            kv_heads = heads
        else:
            raw_head_dim = cfg.get("head_dim")
            head_dim = as_int("head_dim", raw_head_dim) if raw_head_dim else \
                (hidden // heads if heads else 0)
        n_exp = 0
        for key in ("num_local_experts", "num_experts", "n_routed_experts"):
            if cfg.get(key):
                n_exp = as_int(key, cfg[key])
                break
        top_k, moe_inter, shared, dense_layers = 0, 0, 0, 0
        inter = cfg.get("intermediate_size")
        model_type = str(cfg.get("model_type", ""))
        if n_exp:
            top_k = as_int("num_experts_per_tok", req("num_experts_per_tok"))
            raw_moe_inter = cfg.get("moe_intermediate_size")
            if raw_moe_inter is None:  # Mixtral / gpt-oss / Llama 4: experts use intermediate_size
                raw_moe_inter = req("intermediate_size")
            moe_inter = as_int("moe_intermediate_size", raw_moe_inter)
            if cfg.get("shared_expert_intermediate_size"):
                shared = as_int("shared_expert_intermediate_size",
                                cfg["shared_expert_intermediate_size"])
            elif cfg.get("n_shared_experts"):
                shared = as_int("n_shared_experts", cfg["n_shared_experts"]) * moe_inter
            elif model_type.startswith("llama4"):   # one shared expert per MoE layer
                shared = moe_inter
            dense_layers = layers - len(_moe_layer_indices(cfg, layers, opt_int))
            if dense_layers:
                inter = cfg.get("intermediate_size_mlp") or inter
                inter = as_int("intermediate_size", req("intermediate_size") if inter is None
                               else inter)
            else:
                inter = 0
        else:
            inter = as_int("intermediate_size", req("intermediate_size"))
        window = cfg.get("sliding_window") or 0
        frac = 0.0
        if window:
            window = as_int("sliding_window", window)
            if cfg.get("layer_types"):
                lt = list(cfg["layer_types"])
                frac = sum(1 for t in lt if "sliding" in str(t)) / max(1, len(lt))
            elif cfg.get("sliding_window_pattern"):
                frac = 1.0 - 1.0 / float(cfg["sliding_window_pattern"])
            elif cfg.get("use_sliding_window", True) and model_type in ("mistral",):
                frac = 1.0
        elif cfg.get("attention_chunk_size"):  # Llama 4: chunked local attention, 3 of 4 layers
            window = as_int("attention_chunk_size", cfg["attention_chunk_size"])
            every = opt_int("nope_layer_interval") or 4
            frac = 1.0 - 1.0 / every
        d_bytes, e_bytes = _weight_format(cfg, name)
        if dtype_bytes is not None:
            d_bytes, e_bytes = float(dtype_bytes), None
        if expert_dtype_bytes is not None:
            e_bytes = float(expert_dtype_bytes)
        try:
            return cls(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=inter or 0,
                       vocab_size=vocab, num_experts=n_exp, experts_per_token=top_k,
                       moe_intermediate_size=moe_inter, shared_intermediate_size=shared,
                       num_dense_layers=dense_layers,
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                       dtype_bytes=d_bytes, expert_dtype_bytes=e_bytes,
                       compute_bytes=1 if d_bytes <= 1 and e_bytes is None else 2,
                       sliding_window=window if frac > 0 else 0, sliding_layer_fraction=frac,
                       family=family, kv_lora_rank=kv_lora, q_lora_rank=q_lora,
                       qk_rope_head_dim=rope if kv_lora else 0,
                       v_head_dim=v_dim if kv_lora else 0)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model config for {name!r}: {exc}") from None


def _moe_layer_indices(cfg: dict, layers: int, opt_int) -> list[int]:
    """Indices of the MoE layers of a Hugging Face MoE config (the others have a dense FFN)."""
    first_k = opt_int("first_k_dense_replace")
    freq = opt_int("moe_layer_freq") or 1                       # DeepSeek
    step = opt_int("decoder_sparse_step") or opt_int("interleave_moe_layer_step") or 1
    only_mlp = cfg.get("mlp_only_layers") or []
    if not isinstance(only_mlp, (list, tuple)):
        raise ConfigError("mlp_only_layers must be a list of layer indices", key="mlp_only_layers",
                          value=only_mlp)
    dense = {int(i) for i in only_mlp}
    return [i for i in range(layers) if i >= first_k and i % freq == 0 and (i + 1) % step == 0
            and i not in dense]


def _weight_format(cfg: dict, name: str) -> tuple[float, float | None]:
    """(dense bytes per weight, routed-expert bytes per weight or None = same) from a config's
    ``quantization_config`` (absent: 16-bit)."""
    q = cfg.get("quantization_config")
    if not q:
        return 2.0, None
    if not isinstance(q, Mapping):
        raise ConfigError(f"model config for {name!r}: quantization_config must be a dict",
                          key="quantization_config", value=type(q).__name__)
    method = str(q.get("quant_method", "")).lower()
    if method in ("fp8", "fbgemm_fp8"):
        return 1.0, None
    if method == "mxfp4":
        return 2.0, _MX
    if method == "compressed-tensors":
        groups = q.get("config_groups") or {}
        bits = {(g.get("weights") or {}).get("num_bits") for g in groups.values()
                if isinstance(g, Mapping)}
        if bits == {8}:
            return 1.0, None
        return 2.0, None
    raise ConfigError(f"model config for {name!r}: unsupported quant_method; known: fp8, "
                      "fbgemm_fp8, mxfp4, compressed-tensors", key="quantization_config",
                      value=method)


def _m(**kw: Any) -> ModelSpec:
    return ModelSpec(**kw)


_MX = 0.53  # MXFP4: 4-bit values + one 8-bit scale per 32 → 4.25 bits per weight

MODEL_PRESETS: dict[str, ModelSpec] = {
    m.name: m for m in (
        # dense
        _m(name="llama-3.1-8b", family="llama", num_layers=32, hidden_size=4096, num_heads=32,
           num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256),
        _m(name="llama-3.1-70b", family="llama", num_layers=80, hidden_size=8192, num_heads=64,
           num_kv_heads=8, head_dim=128, intermediate_size=28672, vocab_size=128256),
        _m(name="llama-3.1-405b-fp8", family="llama", num_layers=126, hidden_size=16384,
           num_heads=128, num_kv_heads=8, head_dim=128, intermediate_size=53248,
           vocab_size=128256, dtype_bytes=1.0, compute_bytes=1),
        _m(name="llama-3.1-405b", family="llama", num_layers=126, hidden_size=16384,
           num_heads=128, num_kv_heads=8, head_dim=128, intermediate_size=53248,
           vocab_size=128256),
        _m(name="qwen3-8b", family="qwen3", num_layers=36, hidden_size=4096, num_heads=32,
           num_kv_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936),
        _m(name="qwen3-14b", family="qwen3", num_layers=40, hidden_size=5120, num_heads=40,
           num_kv_heads=8, head_dim=128, intermediate_size=17408, vocab_size=151936),
        _m(name="qwen3-32b", family="qwen3", num_layers=64, hidden_size=5120, num_heads=64,
           num_kv_heads=8, head_dim=128, intermediate_size=25600, vocab_size=151936),
        _m(name="gemma-3-12b", family="gemma3", num_layers=48, hidden_size=3840, num_heads=16,
           num_kv_heads=8, head_dim=256, intermediate_size=15360, vocab_size=262208,
           tie_embeddings=True, sliding_window=1024, sliding_layer_fraction=5 / 6),
        _m(name="gemma-3-27b", family="gemma3", num_layers=62, hidden_size=5376, num_heads=32,
           num_kv_heads=16, head_dim=128, intermediate_size=21504, vocab_size=262208,
           tie_embeddings=True, sliding_window=1024, sliding_layer_fraction=5 / 6),
        # MoE
        _m(name="qwen3-30b-a3b", family="qwen3-moe", num_layers=48, hidden_size=2048, num_heads=32,
           num_kv_heads=4, head_dim=128, intermediate_size=6144, vocab_size=151936,
           num_experts=128, experts_per_token=8, moe_intermediate_size=768),
        _m(name="qwen3-235b-a22b", family="qwen3-moe", num_layers=94, hidden_size=4096,
           num_heads=64, num_kv_heads=4, head_dim=128, intermediate_size=12288, vocab_size=151936,
           num_experts=128, experts_per_token=8, moe_intermediate_size=1536),
        _m(name="qwen3-235b-a22b-fp8", family="qwen3-moe", num_layers=94, hidden_size=4096,
           num_heads=64, num_kv_heads=4, head_dim=128, intermediate_size=12288,
           vocab_size=151936, num_experts=128, experts_per_token=8, moe_intermediate_size=1536,
           dtype_bytes=1.0, compute_bytes=1),
        _m(name="mixtral-8x7b", family="mixtral", num_layers=32, hidden_size=4096, num_heads=32,
           num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=32000,
           num_experts=8, experts_per_token=2, moe_intermediate_size=14336),
        _m(name="deepseek-moe-16b", family="deepseek-moe", num_layers=28, hidden_size=2048,
           num_heads=16, num_kv_heads=16, head_dim=128, intermediate_size=10944,
           vocab_size=102400, num_experts=64, experts_per_token=6, moe_intermediate_size=1408,
           shared_intermediate_size=2 * 1408, num_dense_layers=1),
        _m(name="qwen1.5-moe-a2.7b", family="qwen-moe", num_layers=24, hidden_size=2048,
           num_heads=16, num_kv_heads=16, head_dim=128, intermediate_size=5632,
           vocab_size=151936, num_experts=60, experts_per_token=4, moe_intermediate_size=1408,
           shared_intermediate_size=5632),
        _m(name="olmoe-1b-7b", family="olmoe", num_layers=16, hidden_size=2048, num_heads=16,
           num_kv_heads=16, head_dim=128, intermediate_size=1024, vocab_size=50304,
           num_experts=64, experts_per_token=8, moe_intermediate_size=1024),
        _m(name="phi-3.5-moe", family="phi-moe", num_layers=32, hidden_size=4096, num_heads=32,
           num_kv_heads=8, head_dim=128, intermediate_size=6400, vocab_size=32064,
           num_experts=16, experts_per_token=2, moe_intermediate_size=6400),
        _m(name="gpt-oss-20b", family="gpt-oss", num_layers=24, hidden_size=2880, num_heads=64,
           num_kv_heads=8, head_dim=64, intermediate_size=2880, vocab_size=201088,
           num_experts=32, experts_per_token=4, moe_intermediate_size=2880,
           expert_dtype_bytes=_MX, sliding_window=128, sliding_layer_fraction=0.5),
        _m(name="gpt-oss-120b", family="gpt-oss", num_layers=36, hidden_size=2880, num_heads=64,
           num_kv_heads=8, head_dim=64, intermediate_size=2880, vocab_size=201088,
           num_experts=128, experts_per_token=4, moe_intermediate_size=2880,
           expert_dtype_bytes=_MX, sliding_window=128, sliding_layer_fraction=0.5),
        # MLA + shared expert + leading dense layers, block-FP8 weights (DeepSeek-V3/V3.1/R1)
        _m(name="deepseek-v3", family="deepseek-v3", num_layers=61, hidden_size=7168,
           num_heads=128, num_kv_heads=128, head_dim=192, intermediate_size=18432,
           vocab_size=129280, num_experts=256, experts_per_token=8, moe_intermediate_size=2048,
           shared_intermediate_size=2048, num_dense_layers=3, dtype_bytes=1.0, compute_bytes=1,
           kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128),
        # interleaved dense / MoE layers (every second), one shared expert, chunked attention
        _m(name="llama-4-maverick-fp8", family="llama4", num_layers=48, hidden_size=5120,
           num_heads=40, num_kv_heads=8, head_dim=128, intermediate_size=16384,
           vocab_size=202048, num_experts=128, experts_per_token=1, moe_intermediate_size=8192,
           shared_intermediate_size=8192, num_dense_layers=24, dtype_bytes=1.0,
           compute_bytes=1, sliding_window=8192, sliding_layer_fraction=0.75),
        # Qwen3-MoE at 480B (the largest Qwen3 coder)
        _m(name="qwen3-coder-480b-a35b", family="qwen3-moe", num_layers=62, hidden_size=6144,
           num_heads=96, num_kv_heads=8, head_dim=128, intermediate_size=8192,
           vocab_size=151936, num_experts=160, experts_per_token=8, moe_intermediate_size=2560),
        _m(name="qwen3-coder-480b-a35b-fp8", family="qwen3-moe", num_layers=62, hidden_size=6144,
           num_heads=96, num_kv_heads=8, head_dim=128, intermediate_size=8192,
           vocab_size=151936, num_experts=160, experts_per_token=8, moe_intermediate_size=2560,
           dtype_bytes=1.0, compute_bytes=1),
    )
}


def _preset(value, spec_type: type, presets: dict, kind: str):
    """``value`` itself when it is a spec, else the preset of that name (case-insensitive)."""
    if isinstance(value, spec_type):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{kind} must be a preset name or a {spec_type.__name__}, "
                          f"got {type(value).__name__}")
    key = value.strip().lower()
    if key not in presets:
        raise UnknownNameError(f"{kind} preset", value, list(presets))
    return presets[key]


def get_gpu(gpu: str | GPUSpec) -> GPUSpec:
    """Look up a GPU spec.

    Parameters
    ----------
    gpu : str or GPUSpec
        A preset name (case-insensitive) or a spec (returned as it is).

    Returns
    -------
    GPUSpec
        The spec.

    Raises
    ------
    UnknownNameError
        For an unknown preset name (the message lists the known ones).
    """
    return _preset(gpu, GPUSpec, GPU_PRESETS, "gpu")


def get_model(model: str | ModelSpec) -> ModelSpec:
    """Look up a model spec.

    Parameters
    ----------
    model : str or ModelSpec
        A preset name (case-insensitive) or a spec (returned as it is).

    Returns
    -------
    ModelSpec
        The spec.

    Raises
    ------
    UnknownNameError
        For an unknown preset name (the message lists the known ones).
    """
    return _preset(model, ModelSpec, MODEL_PRESETS, "model")


def check_fits(model: str | ModelSpec, gpu: str | GPUSpec, num_gpus: int,
               parallelism: str = "tp") -> None:
    """Check that a model fits the GPUs, leaving room for the KV cache.

    Parameters
    ----------
    model : str or ModelSpec
        A model preset name or a spec.
    gpu : str or GPUSpec
        A GPU preset name or a spec.
    num_gpus : int
        GPUs in the group.
    parallelism : {"tp", "ep", "tp+ep"}
        ``"tp"`` and ``"tp+ep"`` split every weight over the GPUs; ``"ep"`` (data-parallel
        attention) keeps a full copy of the dense weights on every GPU and splits the experts.

    Raises
    ------
    ConfigError
        (key ``num_gpus``) When the weights each GPU holds leave less than 10 % of its memory and
        2 GB for the KV cache and activations.
    """
    m, g = get_model(model), get_gpu(gpu)
    room_b = 0.9 * g.mem_bytes - 2.0e9
    per_gpu = weight_bytes_per_gpu(m, num_gpus, parallelism)
    if per_gpu > room_b:
        need = ""
        if room_b > 0 and parallelism != "ep":
            need = f"; needs num_gpus >= {math.ceil(m.weight_bytes / room_b)}"
        raise ConfigError(f"{m.name} ({m.weight_bytes / 1e9:.0f} GB of weights, "
                          f"{per_gpu / 1e9:.0f} GB per GPU with {parallelism}) does not fit on "
                          f"{num_gpus} × {g.name}{need}", key="num_gpus", value=num_gpus)


def weight_bytes_per_gpu(model: ModelSpec, num_gpus: int, parallelism: str = "tp") -> float:
    """Weight bytes each of ``num_gpus`` GPUs holds under ``parallelism``."""
    if parallelism not in ("tp", "ep", "tp+ep"):
        raise ConfigError("parallelism must be one of tp, ep, tp+ep", key="parallelism",
                          value=parallelism)
    experts = model.num_moe_layers * model.num_experts * model.expert_bytes
    dense = model.weight_bytes - experts
    if parallelism == "ep" and num_gpus > 1:
        return dense + experts / num_gpus
    return model.weight_bytes / num_gpus
