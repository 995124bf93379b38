"""What a model is, independent of its checkpoint's naming: frozen specs read from config.json.

Each family's reader turns an HF config dict into a ModelSpec; everything downstream (model
construction, loading, KV-cache sizing) reads only the spec.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class RopeSpec:
    rotary_dim: int
    theta: float
    kind: str = "default"  # "default" | "linear" | "yarn"
    factor: float = 1.0
    original_max_position: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # YaRN: 0 means not given (then the attention factor depends on factor alone)
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # YaRN: explicit cos/sin scale, overriding the mscales
    truncate: bool = True
    interleaved: bool = False  # rotate adjacent pairs (DeepSeek) instead of halves


@dataclass(frozen=True)
class AttentionSpec:
    kind: str  # "gqa" | "mla"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec
    softmax_scale: float
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (per-head RMSNorm) | "full" (over all heads, OLMoE)
    clip_qkv: float | None = None
    sinks: bool = False
    # MLA only
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0


@dataclass(frozen=True)
class RouterSpec:
    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid" | "topk_softmax" (top-k of logits, then softmax)
    norm_topk: bool = False
    routed_scaling: float = 1.0
    num_groups: int = 1  # grouped top-k (DeepSeek): pick topk_groups groups first
    topk_groups: int = 1
    group_score: str = "max"  # "max" | "top2_sum"
    bias: bool = False  # linear bias on the router (GPT-OSS)
    correction_bias: bool = False  # e_score_correction_bias added for selection only (DeepSeek-V3)
    fp32_logits: bool = False  # router GEMM in fp32 (DeepSeek-V3 does); else in the model dtype


@dataclass(frozen=True)
class MoESpec:
    router: RouterSpec
    intermediate_size: int
    activation: str = "silu"  # "silu" (SwiGLU) | "gpt_oss" (clamped SwiGLU with alpha)
    expert_bias: bool = False
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k


@dataclass(frozen=True)
class LayerSpec:
    is_moe: bool
    sliding_window: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    attention: AttentionSpec
    moe: MoESpec
    dense_intermediate_size: int
    layers: tuple[LayerSpec, ...]
    checkpoint_dtype: str = "bfloat16"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, layer in enumerate(self.layers) if layer.is_moe)
