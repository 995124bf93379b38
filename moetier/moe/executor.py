"""Expert executors: the seam where offloading and expert parallelism plug in.

An executor turns (layer, tokens, routing) into the routed-expert output. The resident executor
holds every expert of every MoE layer in one ExpertBank per layer (slot == expert id).
"""

from typing import Protocol

import torch

from moetier.models.spec import ModelSpec
from moetier.moe.dispatch import combine, dispatch
from moetier.moe.experts import ExpertBank, ExpertLayout, expert_mlp
from moetier.moe.router import Routing


class ExpertExecutor(Protocol):
    def run(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor: ...


class ResidentExecutor:
    def __init__(self, model_spec: ModelSpec, dtype: torch.dtype, device: torch.device | str):
        self.spec = model_spec.moe
        layout = ExpertLayout(model_spec.hidden_size, self.spec.intermediate_size, dtype, self.spec.expert_bias)
        self.banks = {layer: ExpertBank(self.spec.num_experts, layout, device) for layer in model_spec.moe_layer_ids}

    def run(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        bank = self.banks[layer]
        plan = dispatch(x_TD, routing, self.spec.num_experts)
        out_sorted_AD = torch.empty_like(plan.x_sorted_AD)
        for expert, rows in plan.segments():
            out_sorted_AD[rows] = expert_mlp(plan.x_sorted_AD[rows], bank, expert, self.spec)
        return combine(out_sorted_AD, plan, routing)
