"""Random weights from a config alone, generated straight into their final buffers."""

import torch

from moetier.models.transformer import CausalLM
from moetier.moe.executor import ExpertExecutor
from moetier.moe.experts import ExpertBank, ExpertId, ExpertWeights
from moetier.offload.executor import OffloadedExecutor

_INIT_STD = 0.02


def _is_unit(name: str) -> bool:
    return name.endswith("norm.weight") or name.endswith("layernorm.weight")


def _is_zero(name: str) -> bool:
    return name.endswith(".bias") or name.endswith("sinks") or name.endswith("e_score_correction_bias")


@torch.no_grad()
def fill_dummy(model: CausalLM, executor: ExpertExecutor, seed: int) -> None:
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if _is_unit(name):
            param.fill_(1.0)
        elif _is_zero(name):
            param.zero_()
        else:
            param.normal_(0.0, _INIT_STD, generator=generator)
    pool = executor.pool.bank if isinstance(executor, OffloadedExecutor) else None
    _fill_experts(executor.expert_weights, generator, device, pool)


def _fill_experts(weights: ExpertWeights, generator: torch.Generator, device: torch.device,
                  pool: ExpertBank | None) -> None:
    """Per layer, the same draws into a bank of every expert; where experts are stored one by one
    (the offload store) that bank is a staging bank on the model's device, copied out per expert,
    so a seed gives the same experts resident or offloaded. The staging bank is the first slots of
    the offloaded executor's (still empty) pool when it has enough, so loading stays in the budget."""
    staging = None
    for layer in weights.moe_layers:
        stacked = {part: weights.layer_part(layer, part) for part in weights.layout.part_shapes}
        direct = all(t is not None for t in stacked.values())
        if not direct:
            if staging is None:
                enough = pool is not None and pool.num_slots >= weights.num_experts
                staging = pool if enough else ExpertBank(weights.num_experts, weights.layout, device)
            stacked = {part: tensor[: weights.num_experts] for part, tensor in staging.parts.items()}
        for part, tensor in stacked.items():
            if part.endswith("bias"):
                tensor.zero_()
            else:
                tensor.normal_(0.0, _INIT_STD, generator=generator)
        if not direct:
            for e in range(weights.num_experts):
                for part, tensor in stacked.items():
                    target = weights.expert_part(ExpertId(layer, e), part)
                    if target is not None:  # None: already stored (a reused disk tier)
                        target.copy_(tensor[e])
