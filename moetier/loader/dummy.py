"""Random weights from a config alone, generated straight into their final buffers."""

import torch

from moetier.models.transformer import CausalLM
from moetier.moe.executor import ResidentExecutor

_INIT_STD = 0.02


def _is_unit(name: str) -> bool:
    return name.endswith("norm.weight") or name.endswith("layernorm.weight")


def _is_zero(name: str) -> bool:
    return name.endswith(".bias") or name.endswith("sinks") or name.endswith("e_score_correction_bias")


@torch.no_grad()
def fill_dummy(model: CausalLM, executor: ResidentExecutor, seed: int) -> None:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if _is_unit(name):
            param.fill_(1.0)
        elif _is_zero(name):
            param.zero_()
        else:
            param.normal_(0.0, _INIT_STD, generator=generator)
    for bank in executor.banks.values():
        for part, tensor in bank.parts.items():
            if part.endswith("bias"):
                tensor.zero_()
            else:
                tensor.normal_(0.0, _INIT_STD, generator=generator)
