"""The grouped (sync-free) and looped expert kernels compute the same function as a per-token reference."""

import pytest
import torch

from moetier.models.spec import MoESpec, RouterSpec
from moetier.moe.dispatch import combine, dispatch
from moetier.moe.experts import ExpertBank, ExpertLayout
from moetier.moe.grouped import grouped_experts, looped_experts
from moetier.moe.router import Routing


def _reference(x_TD, routing, bank, spec):
    """Each token, each of its k experts, straight from the bank, summed in k order."""
    parts = bank.parts
    y_TD = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(routing.topk_ids_TK.shape[1]):
            e = int(routing.topk_ids_TK[t, k])
            h = parts["gate_up"][e] @ x_TD[t] + (parts["gate_up_bias"][e] if spec.expert_bias else 0)
            gate, up = h.chunk(2)
            if spec.activation == "silu":
                a = torch.nn.functional.silu(gate) * up
            else:
                gate, up = gate.clamp(max=spec.swiglu_limit), up.clamp(-spec.swiglu_limit, spec.swiglu_limit)
                a = (up + 1) * gate * torch.sigmoid(gate * spec.swiglu_alpha)
            out = parts["down"][e] @ a + (parts["down_bias"][e] if spec.expert_bias else 0)
            y_TD[t] += routing.topk_weights_TK[t, k] * out
    return y_TD


@pytest.mark.parametrize("activation,bias", [("silu", False), ("gpt_oss", True)])
@pytest.mark.parametrize("kernel", [grouped_experts, looped_experts])
def test_kernels_match_per_token_reference(kernel, activation, bias):
    torch.manual_seed(0)
    num_experts, top_k, hidden, inner, tokens = 6, 2, 32, 16, 9
    spec = MoESpec(RouterSpec(num_experts, top_k), inner, activation=activation, expert_bias=bias)
    bank = ExpertBank(num_experts, ExpertLayout(hidden, inner, torch.float32, bias), "cpu")
    for tensor in bank.parts.values():
        tensor.normal_()
    x_TD = torch.randn(tokens, hidden)
    ids_TK = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    ids_TK[:, 0] = 3  # a popular expert, and experts 0..5 partly unused
    routing = Routing(ids_TK, torch.rand(tokens, top_k))
    plan = dispatch(x_TD, routing, num_experts)
    assert plan.ends_S[-1] == tokens * top_k and bool((plan.ends_S.diff() >= 0).all())
    y_TD = combine(kernel(plan, bank, spec), plan, routing)
    torch.testing.assert_close(y_TD, _reference(x_TD, routing, bank, spec), rtol=1e-5, atol=1e-4)
