"""Local dispatch/combine: group token-expert assignments by expert, then sum back per token.

Legend: T tokens, K experts per token, A = T*K assignments, D hidden, S expert slots.
Everything stays on the device (no host sync), so a dispatch can run inside a CUDA graph.
The combine sums each token's K expert outputs in the fixed k order, so any executor that
computes the same per-expert outputs (resident or offloaded) gets bitwise identical results.
"""

import functools
from dataclasses import dataclass

import torch

from moetier.kernels import moe_elementwise
from moetier.kernels.fuse import fused
from moetier.moe.router import Routing


@dataclass(frozen=True)
class Dispatch:
    order_A: torch.Tensor  # assignment index (t*K + k) of each row of x_sorted_AD
    slots_sorted_A: torch.Tensor  # slot of each sorted row (ascending)
    x_sorted_AD: torch.Tensor  # token rows grouped by slot
    ends_S: torch.Tensor  # cumulative row ends per slot (int32): the grouped GEMM's offsets


def dispatch(x_TD: torch.Tensor, routing: Routing, num_slots: int, slot_of_expert_E: torch.Tensor | None = None) -> Dispatch:
    """Groups assignments by the slot holding their expert (slot == expert when resident)."""
    return Dispatch(*_dispatch(x_TD, routing.topk_ids_TK, num_slots, slot_of_expert_E))


@fused
def _dispatch(x_TD, topk_ids_TK, num_slots: int, slot_of_expert_E):
    slots_A = topk_ids_TK.reshape(-1)
    if slot_of_expert_E is not None:
        slots_A = slot_of_expert_E[slots_A]
    return group_by_slot(x_TD, slots_A, num_slots, topk_ids_TK.shape[1])


def dispatch_round(x_TD: torch.Tensor, routing: Routing, num_slots: int, slot_of_expert_E: torch.Tensor
                   ) -> tuple[Dispatch, torch.Tensor]:
    """A round of an offloaded layer step (offload/executor.py): the assignments of the experts in slots
    grouped by slot; those of the others (slot `num_slots`, past the pool) sorted last, past every group,
    so the grouped kernel leaves them out. With each sorted row's destination: its assignment row, or
    A (a dump row) for the left-out ones. Eager, in few torch calls: a layer step may run a dozen rounds,
    and their launches are host time the copies can wait for (torch.compile's wrapper cost ~0.7 ms of host
    time a call here, with the prefill's dynamic shapes; benchmarks/host_time_offload.py --prefill)."""
    topk_ids_TK = routing.topk_ids_TK
    slots_A = slot_of_expert_E[topk_ids_TK.reshape(-1)]
    slots_sorted_A, order_A = torch.sort(slots_A, stable=True)
    ends_S = torch.searchsorted(slots_sorted_A, _slot_ids(num_slots, slots_A.device), right=True, out_int32=True)
    rows_A = torch.where(slots_sorted_A < num_slots, order_A, slots_A.numel())
    # The clamp keeps the left-out rows' bias reads (gpt-oss) inside the pool.
    plan = Dispatch(order_A, slots_sorted_A.clamp(max=num_slots - 1), x_TD[order_A // topk_ids_TK.shape[1]], ends_S)
    return plan, rows_A


@functools.cache
def _slot_ids(num_slots: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_slots, device=device)


def group_by_slot(x_TD, slots_A, num_slots: int, top_k: int):
    """Assignment rows (t*K + k) grouped by their slots, stable, so rows keep ascending order within a
    slot: (rows, sorted slots, x rows, ends)."""
    slots_sorted_A, order_A = torch.sort(slots_A, stable=True)
    counts_S = torch.zeros(num_slots, dtype=torch.int32, device=x_TD.device)
    counts_S.index_add_(0, slots_A, torch.ones_like(slots_A, dtype=torch.int32))
    ends_S = torch.cumsum(counts_S, dim=0, dtype=torch.int32)
    return order_A, slots_sorted_A, x_TD[order_A // top_k], ends_S


def combine(out_sorted_AD: torch.Tensor, plan: Dispatch, routing: Routing) -> torch.Tensor:
    """Rows back to assignment order, then the one weighted k-ordered sum every executor uses (the
    offloaded rounds fill out_AD round by round and call the same sum, so results agree bitwise)."""
    out_AD = torch.empty_like(out_sorted_AD)
    out_AD[plan.order_A] = out_sorted_AD
    return weighted_k_sum(out_AD, routing.topk_weights_TK)


def _weighted_k_sum(out_AD, topk_weights_TK):
    """Each token's K expert outputs (rows t*K + k), weighted and summed in k order."""
    num_tokens, top_k = topk_weights_TK.shape
    out_TKD = out_AD.view(num_tokens, top_k, -1) * topk_weights_TK[:, :, None].to(out_AD.dtype)
    y_TD = out_TKD[:, 0]
    for k in range(1, top_k):
        y_TD = y_TD + out_TKD[:, k]
    return y_TD


_weighted_k_sum_fused = fused(_weighted_k_sum)


def weighted_k_sum(out_AD: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Each token's K expert outputs (rows t*K + k), weighted and summed in k order: [A, D] -> [T, D]."""
    if moe_elementwise.supported(out_AD):
        return moe_elementwise.weighted_k_sum(out_AD, topk_weights_TK)
    return _weighted_k_sum_fused(out_AD, topk_weights_TK)
