"""Expert executors: the seam where offloading and expert parallelism plug in.

An executor turns (layer, tokens, routing) into the routed-expert output. The resident executor
holds every expert of every MoE layer in one ExpertBank per layer (slot == expert id).
"""

from typing import Protocol

import torch

from moetier.models.spec import ModelSpec
from moetier.moe.dispatch import combine, dispatch, weighted_k_sum
from moetier.moe.experts import ExpertBank, ExpertLayout
from moetier.moe.grouped import (
    GEMV_MAX_TOKENS,
    gemv_experts,
    gemv_supported,
    grouped_experts,
    grouped_mm_supported,
    looped_experts,
)
from moetier.moe.router import Routing


class ExpertExecutor(Protocol):
    sync_free: bool

    def run(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor: ...


class ResidentExecutor:
    def __init__(self, model_spec: ModelSpec, dtype: torch.dtype, device: torch.device | str):
        self.spec = model_spec.moe
        layout = ExpertLayout(model_spec.hidden_size, self.spec.intermediate_size, dtype, self.spec.expert_bias)
        self.banks = {layer: ExpertBank(self.spec.num_experts, layout, device) for layer in model_spec.moe_layer_ids}
        self.kernel = grouped_experts if grouped_mm_supported(dtype, torch.device(device)) else looped_experts
        self.gemv = self.kernel is grouped_experts and gemv_supported(self.spec, torch.device(device))

    @property
    def sync_free(self) -> bool:
        """True when a step needs no host sync, so it can be captured in a CUDA graph."""
        return self.kernel is grouped_experts

    def run(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        bank = self.banks[layer]
        if self.gemv and x_TD.shape[0] <= GEMV_MAX_TOKENS:
            out_AD = gemv_experts(x_TD, routing.topk_ids_TK.reshape(-1), bank)
            return weighted_k_sum(out_AD, routing.topk_weights_TK)
        plan = dispatch(x_TD, routing, bank.num_slots)
        return combine(self.kernel(plan, bank, self.spec), plan, routing)
