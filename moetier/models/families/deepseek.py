"""DeepSeek-V2 and DeepSeek-V3: MLA attention, dense first layers, shared experts, grouped routing.

Routers, as transformers 5.17 implements them:
  V2  softmax scores; topk_method "greedy" (plain top-k) or "group_limited_greedy" (keep the
      topk_group groups with the best single expert); weights are the top-k scores times
      routed_scaling_factor, never renormalised (transformers ignores V2's norm_topk_prob; every
      published V2 config has it false).
  V3  sigmoid scores; choice = score + e_score_correction_bias; keep the topk_group groups with the
      best top-2 choice sum; weights are the chosen experts' unbiased scores, normalised when
      norm_topk_prob, times routed_scaling_factor.
Checkpoint names: `.mlp.shared_experts.` becomes our `.mlp.shared_expert.`; DeepSeek-V3's
multi-token-prediction layers (model.layers.{num_hidden_layers}...) are not used for decoding.
"""

import math

from moetier.errors import CheckpointError
from moetier.models.families.common import checkpoint_dtype, read_rope, require
from moetier.models.family import Family
from moetier.models.spec import AttentionSpec, LayerSpec, ModelSpec, MoESpec, RopeSpec, RouterSpec


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(qk_head_dim: int, rope: RopeSpec) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 for scaled rope (DeepSeek YaRN)."""
    scale = qk_head_dim**-0.5
    if rope.kind != "default" and rope.mscale_all_dim:
        scale *= _yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


def _attention(cfg: dict, interleaved: bool) -> AttentionSpec:
    num_heads = require(cfg, "num_attention_heads")
    nope, rope_dim, v = require(cfg, "qk_nope_head_dim"), require(cfg, "qk_rope_head_dim"), require(cfg, "v_head_dim")
    rope = read_rope({**cfg, "partial_rotary_factor": 1.0}, rope_dim, interleaved=interleaved)
    bias = bool(cfg.get("attention_bias", False))
    return AttentionSpec(
        kind="mla",
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=nope + rope_dim,
        rope=rope,
        softmax_scale=softmax_scale(nope + rope_dim, rope),
        qkv_bias=bias,
        o_bias=bias,
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=require(cfg, "kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=v,
    )


def _router(cfg: dict, version: int) -> RouterSpec:
    num_experts, top_k = require(cfg, "n_routed_experts"), require(cfg, "num_experts_per_tok")
    scaling = float(cfg.get("routed_scaling_factor") or 1.0)
    groups, topk_groups = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    if version == 2:
        method = cfg.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise CheckpointError(
                f"unsupported DeepSeek-V2 topk_method '{method}' (supported: greedy, group_limited_greedy)"
            )
        if method == "greedy":
            groups = topk_groups = 1
        spec = RouterSpec(num_experts, top_k, scoring="softmax", routed_scaling=scaling,
                          num_groups=groups, topk_groups=topk_groups, group_score="max")
    else:
        scoring = cfg.get("scoring_func") or "sigmoid"
        method = cfg.get("topk_method") or "noaux_tc"
        if scoring != "sigmoid" or method != "noaux_tc":
            raise CheckpointError(f"unsupported DeepSeek-V3 routing {scoring}/{method} (supported: sigmoid/noaux_tc)")
        spec = RouterSpec(num_experts, top_k, scoring="sigmoid", norm_topk=bool(cfg.get("norm_topk_prob", True)),
                          routed_scaling=scaling, num_groups=groups, topk_groups=topk_groups,
                          group_score="top2_sum", correction_bias=True, fp32_logits=True)
    if num_experts % spec.num_groups or spec.topk_groups > spec.num_groups:
        raise CheckpointError(f"n_group {groups} must divide n_routed_experts {num_experts} and be >= topk_group")
    if spec.topk_groups * (num_experts // spec.num_groups) < top_k:
        raise CheckpointError(f"topk_group {topk_groups} of {groups} groups hold fewer than {top_k} (top-k) experts")
    if spec.group_score == "top2_sum" and spec.num_groups > 1 and num_experts // spec.num_groups < 2:
        raise CheckpointError("DeepSeek-V3 group scoring needs at least 2 experts per group")
    return spec


def _read(cfg: dict, version: int) -> ModelSpec:
    num_layers = require(cfg, "num_hidden_layers")
    interleaved = True if version == 2 else bool(cfg.get("rope_interleave", True))
    expert_size = require(cfg, "moe_intermediate_size")
    moe = MoESpec(
        router=_router(cfg, version),
        intermediate_size=expert_size,
        shared_intermediate_size=expert_size * (cfg.get("n_shared_experts") or 0),
    )
    first_dense = cfg.get("first_k_dense_replace") or 0
    freq = cfg.get("moe_layer_freq") or 1
    layers = tuple(LayerSpec(is_moe=i >= first_dense and i % freq == 0) for i in range(num_layers))
    return ModelSpec(
        architecture=cfg["architectures"][0],
        family=f"deepseek_v{version}",
        vocab_size=require(cfg, "vocab_size"),
        hidden_size=require(cfg, "hidden_size"),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention=_attention(cfg, interleaved),
        moe=moe,
        dense_intermediate_size=cfg.get("intermediate_size", 0),
        layers=layers,
        checkpoint_dtype=checkpoint_dtype(cfg),
    )


_RENAMES = ((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),)

DEEPSEEK_V2 = Family("deepseek_v2", ("DeepseekV2ForCausalLM",), lambda cfg: _read(cfg, 2), renames=_RENAMES)
DEEPSEEK_V3 = Family(
    "deepseek_v3", ("DeepseekV3ForCausalLM",), lambda cfg: _read(cfg, 3), renames=_RENAMES, extra_layers_ignored=True
)
