"""RMSNorm, optionally after a residual add, in one Triton kernel: one program per row.

The torch.compile'd versions (models/norm.py) cost 150-300 us of host time per call when steps run
eagerly (prefill), two calls per layer; a Triton launch costs a fraction of that. Rounding follows
the eager ops: the sum rounded to the model dtype, the normalized row rounded, then the weight
product rounded. Legend: T rows, D features.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, sum_ptr, out_ptr, D, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        dt = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * D + d, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(residual_ptr + row * D + d, mask=ok, other=0.0).to(tl.float32)).to(dt)
            tl.store(sum_ptr + row * D + d, x, mask=ok)
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(weight_ptr + d, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * D + d, (w * (x * rstd).to(dt).to(tl.float32)).to(dt), mask=ok)


def supported(x_TD: torch.Tensor, weight_D: torch.Tensor) -> bool:
    return (triton is not None and x_TD.is_cuda and x_TD.dim() == 2 and x_TD.is_contiguous()
            and x_TD.dtype == weight_D.dtype)


def rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float,
             residual_TD: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(x + residual or None without one, rms_norm of that) -> both [T, D] in x's dtype."""
    num_rows, width = x_TD.shape
    out_TD = torch.empty_like(x_TD)
    sum_TD = torch.empty_like(x_TD) if residual_TD is not None else None
    if num_rows:
        block = triton.next_power_of_2(width)
        _rms_norm_kernel[(num_rows,)](
            x_TD, residual_TD.contiguous() if residual_TD is not None else x_TD, weight_D,
            sum_TD if sum_TD is not None else out_TD, out_TD, width, eps,
            HAS_RESIDUAL=residual_TD is not None, BLOCK_D=block, num_warps=max(1, min(8, block // 512)),
        )
    return sum_TD, out_TD
