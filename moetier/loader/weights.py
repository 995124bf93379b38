"""Stream checkpoint tensors into the model and the expert banks; fail loudly on any mismatch."""

from collections.abc import Iterator

import torch

from moetier.errors import CheckpointError
from moetier.models.family import ExpertTensor, Family
from moetier.models.transformer import CausalLM
from moetier.moe.executor import ResidentExecutor

_SHOWN = 5


def _listing(names) -> str:
    names = sorted(names)
    more = f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


class _ExpertWriter:
    """Copies expert tensors into the banks and tracks which (layer, expert, part) are covered."""

    def __init__(self, model: CausalLM, executor: ResidentExecutor):
        self.banks = executor.banks
        self.spec = model.spec.moe
        parts = ["gate", "up", "down"] + (["gate_up_bias", "down_bias"] if self.spec.expert_bias else [])
        self.missing = {(l, e, p) for l in self.banks for e in range(self.spec.num_experts) for p in parts}

    def write(self, name: str, ref: ExpertTensor, tensor: torch.Tensor) -> None:
        if ref.layer not in self.banks:
            raise CheckpointError(f"unexpected tensor {name}: layer {ref.layer} has no routed experts")
        f = self.spec.intermediate_size
        experts = range(self.spec.num_experts) if ref.expert is None else [ref.expert]
        if ref.expert is not None and ref.expert >= self.spec.num_experts:
            raise CheckpointError(f"unexpected tensor {name}: expert {ref.expert} >= num_experts")
        part = "gate_up" if ref.part in ("gate", "up") else ref.part
        target = self.banks[ref.layer].parts[part]
        target = target if ref.expert is None else target[ref.expert]
        if ref.part == "gate":
            target = target[..., :f, :]
        elif ref.part == "up":
            target = target[..., f:, :]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, config expects {tuple(target.shape)}")
        target.copy_(tensor)
        covered = ("gate", "up") if ref.part == "gate_up" else (ref.part,)
        self.missing -= {(ref.layer, e, p) for e in experts for p in covered}


def load_weights(
    model: CausalLM, executor: ResidentExecutor, family: Family, tensors: Iterator[tuple[str, torch.Tensor]]
) -> None:
    params = dict(model.named_parameters())
    missing_params = set(params)
    experts = _ExpertWriter(model, executor)
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
