"""What a model family contributes: a config reader and an HF-name map.

Checkpoint names are first rewritten by the family's renames (regex -> replacement) into our
module names; routed-expert tensors are then recognised in either layout:
  per-expert  model.layers.{L}.mlp.experts.{E}.{proj}.weight   (proj from expert_parts)
  fused       model.layers.{L}.mlp.experts.gate_up_proj [E, 2F, D] / down_proj [E, D, F]
A family with another layout (GPT-OSS) supplies its own parse_expert and convert hooks.
"""

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from moetier.models.spec import ModelSpec

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_FUSED_PARTS = {"gate_up_proj": "gate_up", "down_proj": "down"}
_DEFAULT_PARTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


@dataclass(frozen=True)
class ExpertTensor:
    """Where a checkpoint tensor goes: one expert's part, or (expert None) all experts of a layer."""

    layer: int
    expert: int | None
    part: str  # "gate" | "up" | "gate_up" | "down" | "gate_up_bias" | "down_bias"


def parse_expert_default(name: str, expert_parts: dict[str, str]) -> ExpertTensor | None:
    if m := _PER_EXPERT.fullmatch(name):
        part = expert_parts.get(m.group(3))
        return ExpertTensor(int(m.group(1)), int(m.group(2)), part) if part else None
    if m := _FUSED.fullmatch(name):
        return ExpertTensor(int(m.group(1)), None, _FUSED_PARTS[m.group(2)])
    return None


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    read_spec: Callable[[dict], ModelSpec]
    renames: tuple[tuple[str, str], ...] = ()
    expert_parts: dict[str, str] = field(default_factory=lambda: dict(_DEFAULT_PARTS))
    # Checkpoint tensors with no counterpart that are safe to drop (e.g. cached rotary tables).
    ignored: tuple[str, ...] = (r".*rotary_emb\.inv_freq",)
    # Optional stream transform before renaming, for tensors that convert together
    # (e.g. MXFP4 blocks + scales -> dequantized weights).
    convert: Callable[[Iterator[tuple[str, torch.Tensor]]], Iterator[tuple[str, torch.Tensor]]] | None = None
    # Drop model.layers.{L}.* for L >= the model's layer count (DeepSeek-V3's multi-token-prediction
    # modules live there); elsewhere such tensors mean a config/checkpoint mismatch and are errors.
    extra_layers_ignored: bool = False

    def our_name(self, checkpoint_name: str) -> str:
        for pattern, replacement in self.renames:
            checkpoint_name = re.sub(pattern, replacement, checkpoint_name)
        return checkpoint_name

    def parse_expert(self, name: str) -> ExpertTensor | None:
        return parse_expert_default(name, self.expert_parts)

    def is_ignored(self, checkpoint_name: str, num_layers: int | None = None) -> bool:
        if self.extra_layers_ignored and num_layers is not None:
            m = _LAYER.match(checkpoint_name)
            if m and int(m.group(1)) >= num_layers:
                return True
        return any(re.fullmatch(p, checkpoint_name) for p in self.ignored)
