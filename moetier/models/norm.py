"""RMSNorm computed in fp32, as the HF reference implementations do (optionally fused with a residual add)."""

import torch

from moetier.kernels import rms_norm as triton_norm
from moetier.kernels.fuse import fused


@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@fused
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + residual, rms_norm(x + residual)) in one pass."""
    total = x + residual
    total32 = total.float()
    total32 = total32 * torch.rsqrt(total32.pow(2).mean(-1, keepdim=True) + eps)
    return total, weight * total32.to(x.dtype)


class RMSNorm(torch.nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_norm.supported(x, self.weight):
            return triton_norm.rms_norm(x, self.weight, self.eps)[1]
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, the norm of that); on the GPU one Triton kernel for rows of hidden states."""
        if triton_norm.supported(x, self.weight):
            return triton_norm.rms_norm(x, self.weight, self.eps, residual)
        return add_rms_norm(x, residual, self.weight, self.eps)
