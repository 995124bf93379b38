"""Stream checkpoint tensors into the model and the routed experts; fail loudly on any mismatch."""

from collections.abc import Iterator

import torch

from moetier.errors import CheckpointError
from moetier.models.family import ExpertTensor, Family
from moetier.models.transformer import CausalLM
from moetier.moe.executor import ExpertExecutor
from moetier.moe.experts import ExpertId, ExpertWeights

_SHOWN = 5


def _listing(names) -> str:
    names = sorted(names)
    more = f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


class _ExpertWriter:
    """Copies expert tensors into the expert weights (resident banks or the offload store) and tracks
    which (layer, expert, part) are covered. A fused [E, ...] tensor goes in one copy where the layer's
    experts are one tensor, else one copy per expert."""

    def __init__(self, weights: ExpertWeights):
        self.weights = weights
        self.num_experts = weights.num_experts
        parts = ["gate", "up", "down"] + (["gate_up_bias", "down_bias"] if weights.layout.bias else [])
        self.missing = {(l, e, p) for l in weights.moe_layers for e in range(self.num_experts) for p in parts}

    def _half(self, target: torch.Tensor, part: str) -> torch.Tensor:
        f = self.weights.layout.intermediate_size
        return target[..., :f, :] if part == "gate" else target[..., f:, :] if part == "up" else target

    def write(self, name: str, ref: ExpertTensor, tensor: torch.Tensor) -> None:
        if ref.layer not in self.weights.moe_layers:
            raise CheckpointError(f"unexpected tensor {name}: layer {ref.layer} has no routed experts")
        if ref.expert is not None and ref.expert >= self.num_experts:
            raise CheckpointError(f"unexpected tensor {name}: expert {ref.expert} >= num_experts")
        part = "gate_up" if ref.part in ("gate", "up") else ref.part
        shape = self.weights.layout.part_shapes[part]
        if ref.part in ("gate", "up"):
            shape = (shape[0] // 2, *shape[1:])
        expected = shape if ref.expert is not None else (self.num_experts, *shape)
        if tuple(tensor.shape) != tuple(expected):
            raise CheckpointError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, config expects {tuple(expected)}")
        experts = range(self.num_experts) if ref.expert is None else [ref.expert]
        stacked = self.weights.layer_part(ref.layer, part) if ref.expert is None else None
        if stacked is not None:
            self._half(stacked, ref.part).copy_(tensor)
        else:
            for e in experts:
                target = self.weights.expert_part(ExpertId(ref.layer, e), part)
                if target is not None:  # None: already stored (a reused disk tier)
                    self._half(target, ref.part).copy_(tensor if ref.expert is not None else tensor[e])
        covered = ("gate", "up") if ref.part == "gate_up" else (ref.part,)
        self.missing -= {(ref.layer, e, p) for e in experts for p in covered}


def load_weights(
    model: CausalLM, executor: ExpertExecutor, family: Family, tensors: Iterator[tuple[str, torch.Tensor]]
) -> None:
    params = dict(model.named_parameters())
    missing_params = set(params)
    experts = _ExpertWriter(executor.expert_weights)
    unexpected = []
    if family.convert is not None:
        tensors = family.convert(tensors)
    for checkpoint_name, tensor in tensors:
        if family.is_ignored(checkpoint_name, model.spec.num_layers):
            continue
        name = family.our_name(checkpoint_name)
        if ref := family.parse_expert(name):
            experts.write(checkpoint_name, ref, tensor)
        elif name in params:
            param = params[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"shape mismatch for {checkpoint_name}: checkpoint {tuple(tensor.shape)}, config expects {tuple(param.shape)}"
                )
            param.data.copy_(tensor)
            missing_params.discard(name)
        elif not (name == "lm_head.weight" and model.spec.tie_word_embeddings):
            unexpected.append(checkpoint_name)
    if unexpected:
        raise CheckpointError(f"checkpoint has tensors this {family.name} model does not: {_listing(unexpected)}")
    missing = sorted(missing_params) + [f"layer {l} expert {e} {p}" for l, e, p in sorted(experts.missing)]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensors: {_listing(missing)}")
