"""Local dispatch/combine: group token-expert assignments by expert, then sum back per token.

Legend: T tokens, K experts per token, A = T*K assignments, D hidden.
The combine sums each token's K expert outputs in the fixed k order, so any executor that
computes the same per-expert outputs (resident or offloaded) gets bitwise identical results.
"""

from dataclasses import dataclass

import torch

from moetier.moe.router import Routing


@dataclass(frozen=True)
class Dispatch:
    order_A: torch.Tensor  # assignment index (t*K + k) of each row of x_sorted_AD
    x_sorted_AD: torch.Tensor  # token rows grouped by expert, experts ascending
    expert_counts: tuple[int, ...]  # rows per expert id (host ints: one sync per layer)

    def segments(self):
        """(expert id, row slice) for every expert that received tokens."""
        start = 0
        for expert, count in enumerate(self.expert_counts):
            if count:
                yield expert, slice(start, start + count)
                start += count


def dispatch(x_TD: torch.Tensor, routing: Routing, num_experts: int) -> Dispatch:
    top_k = routing.topk_ids_TK.shape[1]
    flat_ids_A = routing.topk_ids_TK.reshape(-1)
    order_A = torch.argsort(flat_ids_A, stable=True)
    counts = torch.bincount(flat_ids_A, minlength=num_experts).tolist()
    return Dispatch(order_A, x_TD[order_A // top_k], tuple(counts))


def combine(out_sorted_AD: torch.Tensor, plan: Dispatch, routing: Routing) -> torch.Tensor:
    num_tokens, top_k = routing.topk_ids_TK.shape
    out_AD = torch.empty_like(out_sorted_AD)
    out_AD[plan.order_A] = out_sorted_AD
    out_TKD = out_AD.view(num_tokens, top_k, -1) * routing.topk_weights_TK[:, :, None].to(out_AD.dtype)
    y_TD = out_TKD[:, 0]
    for k in range(1, top_k):
        y_TD = y_TD + out_TKD[:, k]
    return y_TD
