"""Families on the GQA block with softmax top-k routing: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

They differ only in config keys and a few switches, so one reader serves all four.
"""

from moetier.models.families.common import checkpoint_dtype, gqa_attention, layer_windows, require, require_any
from moetier.models.family import Family
from moetier.models.spec import LayerSpec, ModelSpec, MoESpec, RouterSpec


def _read(cfg: dict, family: str) -> ModelSpec:
    num_layers = require(cfg, "num_hidden_layers")
    bias = {
        "mixtral": (False, False),
        "qwen2_moe": (cfg.get("qkv_bias", True), False),
        "qwen3_moe": (cfg.get("attention_bias", False),) * 2,
        "olmoe": (cfg.get("attention_bias", False),) * 2,
    }[family]
    attention = gqa_attention(
        cfg,
        qkv_bias=bias[0],
        o_bias=bias[1],
        qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family, "none"),
        clip_qkv=cfg.get("clip_qkv") if family == "olmoe" else None,
    )
    num_experts = require_any(cfg, "num_experts", "num_local_experts")
    expert_size = require(cfg, "intermediate_size" if family in ("mixtral", "olmoe") else "moe_intermediate_size")
    router = RouterSpec(
        num_experts=num_experts,
        top_k=require(cfg, "num_experts_per_tok"),
        norm_topk=True if family == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
    )
    shared = cfg.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0
    moe = MoESpec(router=router, intermediate_size=expert_size, shared_intermediate_size=shared, shared_gate=bool(shared))
    sparse_step = cfg.get("decoder_sparse_step", 1) or 1
    dense_layers = set(cfg.get("mlp_only_layers") or [])
    windows = layer_windows(cfg, num_layers)
    if family == "qwen2_moe" and not cfg.get("layer_types") and cfg.get("use_sliding_window"):
        start = cfg.get("max_window_layers", num_layers)
        windows = [cfg["sliding_window"] if i >= start else None for i in range(num_layers)]
    layers = tuple(
        LayerSpec(is_moe=i not in dense_layers and (i + 1) % sparse_step == 0, sliding_window=windows[i])
        for i in range(num_layers)
    )
    return ModelSpec(
        architecture=cfg["architectures"][0],
        family=family,
        vocab_size=require(cfg, "vocab_size"),
        hidden_size=require(cfg, "hidden_size"),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention=attention,
        moe=moe,
        dense_intermediate_size=cfg.get("intermediate_size", 0),
        layers=layers,
        checkpoint_dtype=checkpoint_dtype(cfg),
    )


MIXTRAL = Family(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    read_spec=lambda cfg: _read(cfg, "mixtral"),
    renames=((r"\.block_sparse_moe\.", ".mlp."),),
    expert_parts={"w1": "gate", "w3": "up", "w2": "down"},
)
QWEN2_MOE = Family("qwen2_moe", ("Qwen2MoeForCausalLM",), lambda cfg: _read(cfg, "qwen2_moe"))
QWEN3_MOE = Family("qwen3_moe", ("Qwen3MoeForCausalLM",), lambda cfg: _read(cfg, "qwen3_moe"))
OLMOE = Family("olmoe", ("OlmoeForCausalLM",), lambda cfg: _read(cfg, "olmoe"))
