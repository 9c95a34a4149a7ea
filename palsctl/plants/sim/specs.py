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

__all__ = ["GPUSpec", "ModelSpec", "GPU_PRESETS", "MODEL_PRESETS", "check_fits", "get_gpu",
           "get_model"]


@dataclass(frozen=True, kw_only=True, slots=True)
class GPUSpec:
    """Datasheet numbers of one GPU (SI units; FLOP/s are dense, without sparsity)."""

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
    link_bw_bytes_s: float         # NVLink bandwidth per GPU per direction (tensor-parallel traffic)

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
            raise ConfigError(f"GPUSpec {self.name!r}: min_sm_clock_mhz must be below max_sm_clock_mhz")


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

    ``dtype_bytes``: bytes per weight of the dense part; ``expert_dtype_bytes``: of the routed
    experts (MXFP4 ≈ 0.53); ``compute_bytes``: 2 = bf16 tensor cores, 1 = fp8.
    ``num_dense_layers``: leading layers with a dense FFN in an MoE model (DeepSeek-MoE).
    ``sliding_window`` / ``sliding_layer_fraction``: local-attention layers read at most the
    window from the KV cache (Gemma 3, gpt-oss).
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

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"ModelSpec {self.name!r}: {name} must be a positive integer",
                                  key=name, value=v)
        if self.is_moe:
            if not (1 <= self.experts_per_token <= self.num_experts) or self.moe_intermediate_size < 1:
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
            raise ConfigError(f"ModelSpec {self.name!r}: dtype bytes must be > 0", key="dtype_bytes",
                              value=self.dtype_bytes)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    @property
    def attn_params_per_layer(self) -> int:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.hidden_size * (q + 2 * kv) + q * self.hidden_size

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
            p += self.num_moe_layers * (3 * h * self.shared_intermediate_size + h * self.num_experts)
        p += self.vocab_size * h  # LM head
        return p

    @property
    def total_params(self) -> int:
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
        return self.dense_params * self.dtype_bytes

    @property
    def expert_bytes(self) -> float:
        eb = self.expert_dtype_bytes if self.expert_dtype_bytes is not None else self.dtype_bytes
        return self.expert_params * eb

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes per token of context, all layers, all GPUs together."""
        return 2.0 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    # ---- construction from a Hugging Face config -------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], *, name: str, dtype_bytes: float = 2.0,
                       expert_dtype_bytes: float | None = None, family: str = "") -> "ModelSpec":
        """Build a spec from the fields of a Hugging Face ``config.json`` (a dict).

        Required: hidden_size, num_hidden_layers, num_attention_heads, vocab_size, and
        intermediate_size (dense) or the MoE fields (num_local_experts / num_experts /
        n_routed_experts, num_experts_per_tok, moe_intermediate_size).
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"model config for {name!r} must be a dict, got {type(config).__name__}")
        cfg = dict(config)
        if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers (Gemma 3)
            cfg = {**cfg, **cfg["text_config"]}

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
                raise ConfigError(f"model config for {name!r}: field must be a non-negative integer",
                                  key=key, value=v)
            return iv

        hidden = as_int("hidden_size", req("hidden_size"))
        layers = as_int("num_hidden_layers", req("num_hidden_layers"))
        heads = as_int("num_attention_heads", req("num_attention_heads"))
        vocab = as_int("vocab_size", req("vocab_size"))
        kv_heads = as_int("num_key_value_heads", cfg.get("num_key_value_heads") or heads)
        head_dim = cfg.get("head_dim")
        head_dim = as_int("head_dim", head_dim) if head_dim else (hidden // heads if heads else 0)
        n_exp = 0
        for key in ("num_local_experts", "num_experts", "n_routed_experts"):
            if cfg.get(key):
                n_exp = as_int(key, cfg[key])
                break
        top_k, moe_inter, shared, dense_layers = 0, 0, 0, 0
        inter = cfg.get("intermediate_size")
        if n_exp:
            top_k = as_int("num_experts_per_tok", req("num_experts_per_tok"))
            moe_inter = cfg.get("moe_intermediate_size")
            if moe_inter is None:  # Mixtral / gpt-oss: experts use intermediate_size
                moe_inter = req("intermediate_size")
            moe_inter = as_int("moe_intermediate_size", moe_inter)
            if cfg.get("shared_expert_intermediate_size"):
                shared = as_int("shared_expert_intermediate_size",
                                cfg["shared_expert_intermediate_size"])
            elif cfg.get("n_shared_experts"):
                shared = as_int("n_shared_experts", cfg["n_shared_experts"]) * moe_inter
            dense_layers = as_int("first_k_dense_replace", cfg.get("first_k_dense_replace") or 0)
            inter = as_int("intermediate_size", inter) if (inter and dense_layers) else 0
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
            elif cfg.get("use_sliding_window", True) and cfg.get("model_type") in ("mistral",):
                frac = 1.0
        try:
            return cls(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=inter or 0,
                       vocab_size=vocab, num_experts=n_exp, experts_per_token=top_k,
                       moe_intermediate_size=moe_inter, shared_intermediate_size=shared,
                       num_dense_layers=dense_layers,
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                       dtype_bytes=dtype_bytes, expert_dtype_bytes=expert_dtype_bytes,
                       compute_bytes=1 if dtype_bytes <= 1 and expert_dtype_bytes is None else 2,
                       sliding_window=window if frac > 0 else 0, sliding_layer_fraction=frac,
                       family=family)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model config for {name!r}: {exc}") from None


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
    """A GPU spec from a preset name (case-insensitive) or a spec object."""
    return _preset(gpu, GPUSpec, GPU_PRESETS, "gpu")


def get_model(model: str | ModelSpec) -> ModelSpec:
    """A model spec from a preset name (case-insensitive) or a spec object."""
    return _preset(model, ModelSpec, MODEL_PRESETS, "model")


def check_fits(model: str | ModelSpec, gpu: str | GPUSpec, num_gpus: int) -> None:
    """Raise `ConfigError` (key ``num_gpus``) when the model's weights, split over ``num_gpus``
    GPUs (tensor parallel), leave less than 10 % of each GPU's memory and 2 GB for the KV cache
    and activations."""
    m, g = get_model(model), get_gpu(gpu)
    room_b = 0.9 * g.mem_bytes - 2.0e9
    if m.weight_bytes / num_gpus > room_b:
        need = f"; needs num_gpus >= {math.ceil(m.weight_bytes / room_b)}" if room_b > 0 else ""
        raise ConfigError(f"{m.name} ({m.weight_bytes / 1e9:.0f} GB of weights) does not fit on "
                          f"{num_gpus} × {g.name}{need}", key="num_gpus", value=num_gpus)
