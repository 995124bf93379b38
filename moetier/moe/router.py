"""Router: every gating variant of the supported families, producing one Routing.

Legend: T tokens, D hidden, E routed experts, K experts per token, G expert groups.
Scores are computed in fp32; the k order of topk_ids_TK is the summation order downstream.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moetier.kernels import router_topk
from moetier.kernels.fuse import fused
from moetier.models.linear import linear
from moetier.models.spec import RouterSpec


@dataclass(frozen=True)
class Routing:
    topk_ids_TK: torch.Tensor  # int64
    topk_weights_TK: torch.Tensor  # fp32


@fused
def _route(logits_TE: torch.Tensor, correction_bias_E: torch.Tensor | None, spec: RouterSpec):
    """Scores, (grouped) top-k selection and weights from the router logits (fp32 math)."""
    logits_TE = logits_TE.float()
    if spec.scoring == "topk_softmax":
        top_logits_TK, topk_ids_TK = torch.topk(logits_TE, spec.top_k, dim=-1)
        return topk_ids_TK, torch.softmax(top_logits_TK, dim=-1)
    scores_TE = torch.softmax(logits_TE, dim=-1) if spec.scoring == "softmax" else torch.sigmoid(logits_TE)
    choice_TE = scores_TE + correction_bias_E.float() if correction_bias_E is not None else scores_TE
    if spec.num_groups > 1:
        choice_TE = _mask_to_top_groups(choice_TE, spec)
    topk_ids_TK = torch.topk(choice_TE, spec.top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, topk_ids_TK)
    if spec.norm_topk:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_ids_TK, weights_TK * spec.routed_scaling


def _mask_to_top_groups(choice_TE: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Grouped top-k (DeepSeek): experts outside the topk_groups best groups can't be chosen.

    Groups score by their best expert ("max", V2 group_limited_greedy) or by the sum of their
    two best biased scores ("top2_sum", V3 noaux_tc). Masked experts get -inf: V3's biased
    scores can be negative, so 0 (V2's fill) would not exclude them; for V2's softmax scores
    both fills choose the same experts whenever the kept groups hold at least top_k experts,
    which the config readers require.
    """
    grouped_TGe = choice_TE.unflatten(-1, (spec.num_groups, -1))
    if spec.group_score == "max":
        group_scores_TG = grouped_TGe.amax(dim=-1)
    else:
        group_scores_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
    top_groups_TG = torch.topk(group_scores_TG, spec.topk_groups, dim=-1).indices
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
    keep_TE = keep_TG[:, :, None].expand_as(grouped_TGe).flatten(1)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))


class Router(torch.nn.Module):
    def __init__(self, spec: RouterSpec, hidden_size: int):
        super().__init__()
        self.spec = spec
        self.weight = torch.nn.Parameter(torch.empty(spec.num_experts, hidden_size))
        if spec.bias:
            self.bias = torch.nn.Parameter(torch.zeros(spec.num_experts))
        if spec.correction_bias:
            # fp32 whatever the model dtype, as the checkpoints store it: it decides near-ties.
            self.e_score_correction_bias = torch.nn.Parameter(torch.zeros(spec.num_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        spec = self.spec
        bias = self.bias if spec.bias else None
        if spec.fp32_logits:
            logits_TE = F.linear(x_TD.float(), self.weight.float(), None if bias is None else bias.float())
        else:
            logits_TE = linear(x_TD, self.weight, bias)
        if router_topk.supported(logits_TE, spec.scoring, spec.num_groups, spec.correction_bias):
            return Routing(*router_topk.softmax_topk(logits_TE, spec.top_k, spec.scoring == "softmax",
                                                     spec.norm_topk, spec.routed_scaling))
        correction = self.e_score_correction_bias if spec.correction_bias else None
        return Routing(*_route(logits_TE, correction, spec))
