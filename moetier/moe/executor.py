"""Expert executors: the seam where offloading and expert parallelism plug in.

An executor turns (layer, tokens, routing) into the routed-expert output. The resident executor
holds every expert of every MoE layer in one ExpertBank per layer (slot == expert id).
"""

from collections.abc import Callable
from typing import Protocol

import torch

from moetier.models.spec import ModelSpec, MoESpec
from moetier.moe.dispatch import combine, dispatch, weighted_k_sum
from moetier.moe.experts import ExpertBank, ExpertId, ExpertLayout, ExpertWeights
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

    @property
    def expert_weights(self) -> ExpertWeights:
        """Where the loader writes the routed experts."""
        ...

    def run(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor: ...

    def stats(self) -> dict: ...


def expert_kernels(spec: MoESpec, dtype: torch.dtype, device: torch.device) -> tuple[Callable, bool]:
    """The expert kernel for this dtype and device, and whether decode-sized steps use the GEMV:
    every executor picks the same ones, so their results agree bit for bit."""
    kernel = grouped_experts if grouped_mm_supported(dtype, device) else looped_experts
    return kernel, kernel is grouped_experts and gemv_supported(spec, device)


class ResidentExecutor:
    """Every expert of every MoE layer on the device: one bank per layer, slot == expert id."""

    def __init__(self, model_spec: ModelSpec, dtype: torch.dtype, device: torch.device | str):
        self.spec = model_spec.moe
        self.layout = ExpertLayout(model_spec.hidden_size, self.spec.intermediate_size, dtype, self.spec.expert_bias)
        self.num_experts = self.spec.num_experts
        self.moe_layers = tuple(model_spec.moe_layer_ids)
        self.banks = {layer: ExpertBank(self.num_experts, self.layout, device) for layer in self.moe_layers}
        self.kernel, self.gemv = expert_kernels(self.spec, dtype, torch.device(device))

    @property
    def sync_free(self) -> bool:
        """True when a step needs no host sync, so it can be captured in a CUDA graph."""
        return self.kernel is grouped_experts

    @property
    def expert_weights(self) -> ExpertWeights:
        return self

    def expert_part(self, expert: ExpertId, part: str) -> torch.Tensor:
        return self.banks[expert.layer].parts[part][expert.expert]

    def layer_part(self, layer: int, part: str) -> torch.Tensor | None:
        return self.banks[layer].parts[part]

    def finish_loading(self) -> None:
        pass

    def stats(self) -> dict:
        return {"executor": "resident"}

    def run(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        bank = self.banks[layer]
        if self.gemv and x_TD.shape[0] <= GEMV_MAX_TOKENS:
            out_AD = gemv_experts(x_TD, routing.topk_ids_TK.reshape(-1), bank)
            return weighted_k_sum(out_AD, routing.topk_weights_TK)
        plan = dispatch(x_TD, routing, bank.num_slots)
        return combine(self.kernel(plan, bank, self.spec), plan, routing)
