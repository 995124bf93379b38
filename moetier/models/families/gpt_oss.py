"""GPT-OSS: GQA with attention sinks, alternating sliding/full layers, YaRN, biased router and experts.

Its checkpoints store each layer's experts fused, in a layout of their own (transformers keeps it
under both save formats):
  mlp.experts.gate_up_proj       [E, D, 2F]  gate and up INTERLEAVED on the last axis (gate even)
  mlp.experts.gate_up_proj_bias  [E, 2F]     interleaved the same way
  mlp.experts.down_proj          [E, F, D]
  mlp.experts.down_proj_bias     [E, D]
or, as released (quantization_config.quant_method "mxfp4"), the two weights as MXFP4:
  mlp.experts.gate_up_proj_blocks [E, 2F, D/32, 16] + _scales [E, 2F, D/32]   (rows interleaved)
  mlp.experts.down_proj_blocks    [E, D, F/32, 16]  + _scales [E, D, F/32]
The convert hook turns all of these, one expert at a time, into our per-expert parts: gate_up
[2F, D] with gate rows first, down [D, F], and de-interleaved biases. The router is mlp.router.*.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moetier.errors import CheckpointError, UnsupportedModelError
from moetier.models.families.common import checkpoint_dtype, gqa_attention, require, require_any
from moetier.models.family import ExpertTensor, Family
from moetier.models.spec import LayerSpec, ModelSpec, MoESpec, RouterSpec
from moetier.quant.mxfp4 import dequantize_mxfp4

_DEFAULT_ROPE = {  # transformers' GptOssConfig defaults, for configs that give no rope settings
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
_DEFAULT_THETA = 150000.0
_SWIGLU_ALPHA = 1.702

_CHECKPOINT_EXPERTS = re.compile(
    r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?"
)
_CONVERTED_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_up_proj|down_proj)(_bias)?")
_PARTS = {"gate_up_proj": "gate_up", "down_proj": "down"}


def _read(cfg: dict) -> ModelSpec:
    quant = (cfg.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise UnsupportedModelError(f"GPT-OSS checkpoints quantized with '{quant}' are not supported (mxfp4 is)")
    num_layers = require(cfg, "num_hidden_layers")
    if not (cfg.get("rope_parameters") or cfg.get("rope_scaling")):
        cfg = cfg | {"rope_parameters": _DEFAULT_ROPE | {"rope_theta": cfg.get("rope_theta", _DEFAULT_THETA)}}
    elif not cfg.get("rope_parameters") and "rope_theta" not in cfg:
        cfg = cfg | {"rope_theta": _DEFAULT_THETA}
    bias = bool(cfg.get("attention_bias", True))
    attention = gqa_attention(cfg, qkv_bias=bias, o_bias=bias, sinks=True)
    router = RouterSpec(
        num_experts=require_any(cfg, "num_local_experts", "num_experts"),
        top_k=require_any(cfg, "num_experts_per_tok", "experts_per_token"),
        scoring="topk_softmax",
        bias=True,
    )
    moe = MoESpec(
        router=router,
        intermediate_size=require(cfg, "intermediate_size"),
        activation="gpt_oss",
        expert_bias=True,
        swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
        swiglu_alpha=_SWIGLU_ALPHA,
    )
    # transformers' default: even layers slide, odd layers attend fully.
    default_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    layer_types = cfg.get("layer_types") or default_types
    if len(layer_types) < num_layers:
        raise CheckpointError(f"config.json lists {len(layer_types)} layer_types for {num_layers} layers")
    window = cfg.get("sliding_window", 128)
    layers = tuple(
        LayerSpec(is_moe=True, sliding_window=window if layer_types[i] == "sliding_attention" else None)
        for i in range(num_layers)
    )
    return ModelSpec(
        architecture=cfg["architectures"][0],
        family="gpt_oss",
        vocab_size=require(cfg, "vocab_size"),
        hidden_size=require(cfg, "hidden_size"),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        max_position=cfg.get("max_position_embeddings", 131072),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention=attention,
        moe=moe,
        dense_intermediate_size=0,
        layers=layers,
        checkpoint_dtype=checkpoint_dtype(cfg),
    )


def _gate_first(interleaved_2F_: torch.Tensor) -> torch.Tensor:
    """[2F, ...] with gate/up alternating along dim 0 -> [2F, ...] with all gate rows, then all up rows."""
    return torch.cat((interleaved_2F_[0::2], interleaved_2F_[1::2]), dim=0)


def _per_expert(prefix: str, proj: str, suffix: str, tensor_E_: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """One fused float tensor of a layer -> (name, our layout) per expert."""
    for expert, t in enumerate(tensor_E_):
        if suffix == "_bias":
            out = _gate_first(t) if proj == "gate_up_proj" else t
        else:
            out = _gate_first(t.T) if proj == "gate_up_proj" else t.T  # [D, 2F] -> [2F, D]; [F, D] -> [D, F]
        yield f"{prefix}.{expert}.{proj}{suffix}", out


def _per_expert_mxfp4(
    prefix: str, proj: str, blocks: torch.Tensor, scales: torch.Tensor
) -> Iterator[tuple[str, torch.Tensor]]:
    """MXFP4 blocks [E, R, G, 16] + scales [E, R, G] -> (name, dequantized [R, 32G]) per expert."""
    name = f"{prefix}.{proj}_blocks"
    if blocks.dim() != 4 or blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise CheckpointError(f"{name} {tuple(blocks.shape)} and its scales {tuple(scales.shape)} are not MXFP4 blocks")
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise CheckpointError(f"{name} and its scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    for expert in range(blocks.shape[0]):
        weight_RK = dequantize_mxfp4(blocks[expert], scales[expert])
        yield f"{prefix}.{expert}.{proj}", _gate_first(weight_RK) if proj == "gate_up_proj" else weight_RK


def convert(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Rewrites GPT-OSS expert tensors (float or MXFP4) into per-expert tensors in our layout."""
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # MXFP4 halves waiting for their partner
    for name, tensor in tensors:
        m = _CHECKPOINT_EXPERTS.fullmatch(name)
        if m is None:
            yield name, tensor
            continue
        prefix, proj, suffix = m.group(1), m.group(2), m.group(3) or ""
        if suffix in ("", "_bias"):
            yield from _per_expert(prefix, proj, suffix, tensor)
            continue
        halves = pending.setdefault((prefix, proj), {})
        halves[suffix] = tensor
        if len(halves) == 2:
            del pending[(prefix, proj)]
            yield from _per_expert_mxfp4(prefix, proj, halves["_blocks"], halves["_scales"])
    if pending:
        unpaired = [f"{prefix}.{proj}{next(iter(halves))}" for (prefix, proj), halves in pending.items()]
        raise CheckpointError(f"MXFP4 tensors without their blocks/scales partner: {', '.join(sorted(unpaired))}")


@dataclass(frozen=True)
class GptOssFamily(Family):
    """Recognises the per-expert names that `convert` emits."""

    def parse_expert(self, name: str) -> ExpertTensor | None:
        if m := _CONVERTED_EXPERT.fullmatch(name):
            part = _PARTS[m.group(3)] + ("_bias" if m.group(4) else "")
            return ExpertTensor(int(m.group(1)), int(m.group(2)), part)
        return None


GPT_OSS = GptOssFamily(
    name="gpt_oss",
    architectures=("GptOssForCausalLM",),
    read_spec=_read,
    renames=((r"\.mlp\.router\.", ".mlp.gate."),),
    convert=convert,
)
