"""The expert kernels: a grouped GEMM over all slots of a bank (torch's grouped_mm), sync-free;
for decode-sized batches on the GPU, a per-assignment GEMV that needs no dispatch at all.

Legend: A sorted assignments, D hidden, F expert intermediate, S slots.
Where grouped_mm cannot run (CUDA below sm80, or a dtype it lacks there) and on the CPU (where
torch's grouped_mm has a large fixed cost per call), a per-slot loop over the same packed
weights computes the same function; it reads the offsets on the host.
"""

import functools

import torch
import torch.nn.functional as F

from moetier.kernels import expert_gemv, moe_elementwise
from moetier.kernels.fuse import fused
from moetier.models.spec import MoESpec
from moetier.moe.dispatch import Dispatch
from moetier.moe.experts import ExpertBank


@functools.cache
def grouped_mm_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch's grouped_mm runs on this GPU (probed once with a tiny problem). bf16 only: for
    other dtypes it falls back to a loop that reads the offsets on the host, which graphs cannot hold."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return False
    try:
        x = torch.ones(4, 16, dtype=dtype, device=device)
        w = torch.ones(2, 16, 16, dtype=dtype, device=device)
        F.grouped_mm(x, w, offs=torch.tensor([2, 4], dtype=torch.int32, device=device))
        torch.cuda.synchronize(device)
        return True
    except RuntimeError:
        return False


def _activation(gate_up_A2F: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    if spec.activation == "silu" and moe_elementwise.supported(gate_up_A2F):
        return moe_elementwise.silu_mul(gate_up_A2F)
    return _activation_fused(gate_up_A2F, spec)


@fused
def _activation_fused(gate_up_A2F: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    gate_AF, up_AF = gate_up_A2F.chunk(2, dim=-1)
    if spec.activation == "silu":
        return F.silu(gate_AF) * up_AF
    # GPT-OSS: clamped gate and up, sigmoid-weighted gate, (up + 1)
    gate_AF = gate_AF.clamp(max=spec.swiglu_limit)
    up_AF = up_AF.clamp(-spec.swiglu_limit, spec.swiglu_limit)
    return (up_AF + 1) * (gate_AF * torch.sigmoid(gate_AF * spec.swiglu_alpha))


def grouped_experts(plan: Dispatch, bank: ExpertBank, spec: MoESpec) -> torch.Tensor:
    """Every sorted row through its slot's gated MLP: [A, D] -> [A, D]."""
    parts = bank.parts
    x_AD = plan.x_sorted_AD
    gate_up_A2F = F.grouped_mm(x_AD, parts["gate_up"].transpose(-2, -1), offs=plan.ends_S)
    if spec.expert_bias:
        gate_up_A2F = gate_up_A2F + parts["gate_up_bias"][plan.slots_sorted_A]
    out_AD = F.grouped_mm(_activation(gate_up_A2F, spec), parts["down"].transpose(-2, -1), offs=plan.ends_S)
    if spec.expert_bias:
        out_AD = out_AD + parts["down_bias"][plan.slots_sorted_A]
    return out_AD


def looped_experts(plan: Dispatch, bank: ExpertBank, spec: MoESpec) -> torch.Tensor:
    """Same function, one slot at a time (host reads the offsets)."""
    parts = bank.parts
    out_AD = torch.empty_like(plan.x_sorted_AD)
    start = 0
    for slot, end in enumerate(plan.ends_S.tolist()):
        if end == start:
            continue
        rows = slice(start, end)
        bias = parts["gate_up_bias"][slot] if spec.expert_bias else None
        act_NF = _activation(F.linear(plan.x_sorted_AD[rows], parts["gate_up"][slot], bias), spec)
        bias = parts["down_bias"][slot] if spec.expert_bias else None
        out_AD[rows] = F.linear(act_NF, parts["down"][slot], bias)
        start = end
    return out_AD


# Up to this many tokens, reading each assignment's expert directly beats grouping by expert.
GEMV_MAX_TOKENS = 4


def gemv_supported(spec: MoESpec, device: torch.device) -> bool:
    return device.type == "cuda" and expert_gemv.triton is not None and spec.activation == "silu" and not spec.expert_bias


def gemv_experts(x_TD: torch.Tensor, slots_A: torch.Tensor, bank: ExpertBank,
                 out_AD: torch.Tensor | None = None) -> torch.Tensor:
    """Rows t*K + k: the k-th expert of token t applied to it. [T, D] -> [T*K, D]. Rows whose slot is
    negative are skipped (left as they are in out_AD, if given)."""
    top_k = slots_A.shape[0] // x_TD.shape[0]
    gate_up_A2F = expert_gemv.expert_gemv(x_TD, bank.parts["gate_up"], slots_A, rows_per_input=top_k)
    return expert_gemv.expert_gemv(gate_up_A2F, bank.parts["down"], slots_A, rows_per_input=1, swiglu=True,
                                   out_AN=out_AD)
