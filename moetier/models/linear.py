"""Projections of the attention and router: F.linear, except a single token's on the GPU.

At batch 1 cuBLAS reaches 45-75% of the HBM bandwidth on these shapes (o_proj of the Qwen3-30B-A3B
shape: 1.5 of ~3 TB/s; a router's 0.1), the Triton GEMV of the experts 75-90%
(benchmarks/gemv_sweep.py). fp32 stays on cuBLAS: the parity tests hold it to transformers' results.
"""

import torch
import torch.nn.functional as F

from moetier.kernels import expert_gemv


def linear(x_TD: torch.Tensor, weight_ND: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    if (x_TD.shape[0] == 1 and bias_N is None and x_TD.is_cuda and expert_gemv.triton is not None
            and x_TD.dtype in (torch.bfloat16, torch.float16) and x_TD.stride(-1) == 1):
        return expert_gemv.dense_gemv(x_TD, weight_ND)
    return F.linear(x_TD, weight_ND, bias_N)
