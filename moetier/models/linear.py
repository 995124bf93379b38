"""The attention and router projections: F.linear, except a single token's on the GPU.

At batch 1 the Triton GEMV (one row per program) beats cuBLAS on every decode projection measured
on the H100 (benchmarks/gemv_sweep.py --dense, us): Qwen3-30B-A3B qkv 9.2 vs 9.9, o_proj 7.8 vs
10.8, router 2.2 vs 4.8; OLMoE-1B-7B qkv 10.6 vs 11.9, o_proj 4.9 vs 6.4, router 2.0 vs 4.6.
fp32 stays on cuBLAS: the parity tests hold it to transformers' results.
"""

import torch
import torch.nn.functional as F

from moetier.kernels import expert_gemv


def linear(x_TD: torch.Tensor, weight_ND: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    if (x_TD.shape[0] == 1 and bias_N is None and x_TD.is_cuda and expert_gemv.triton is not None
            and x_TD.dtype in (torch.bfloat16, torch.float16) and x_TD.stride(-1) == 1):
        return expert_gemv.dense_gemv(x_TD, weight_ND)
    return F.linear(x_TD, weight_ND, bias_N)
