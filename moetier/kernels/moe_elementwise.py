"""The two elementwise steps around the grouped expert GEMMs, as Triton kernels: SwiGLU on the
[gate | up] rows, and each token's k-weighted sum of its expert outputs.

Their torch.compile'd versions cost 150-300 us of host time per call in eagerly run steps (prefill);
a Triton launch costs a fraction of that. Rounding follows the eager ops: silu(gate) rounded to the
model dtype, then its product with up; each weighted output rounded, then summed in k order, each
partial sum rounded. Legend: A assignments (t*K + k), F expert intermediate, T tokens, K, D hidden.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = f < F
        dt = out_ptr.dtype.element_ty
        gate = tl.load(gate_up_ptr + row * 2 * F + f, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * 2 * F + F + f, mask=ok, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        tl.store(out_ptr + row * F + f, (silu * up).to(dt), mask=ok)

    @triton.jit
    def _weighted_k_sum_kernel(out_ptr, weights_ptr, y_ptr, D, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = d < D
        dt = y_ptr.dtype.element_ty
        y = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(TOP_K):
            w = tl.load(weights_ptr + t * TOP_K + k).to(dt).to(tl.float32)
            term = (tl.load(out_ptr + (t * TOP_K + k) * D + d, mask=ok, other=0.0).to(tl.float32) * w).to(dt)
            y = term.to(tl.float32) if k == 0 else (y + term.to(tl.float32)).to(dt).to(tl.float32)
        tl.store(y_ptr + t * D + d, y.to(dt), mask=ok)


def supported(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda and x.is_contiguous()


def silu_mul(gate_up_A2F: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows of [gate | up] -> [A, F]."""
    rows, width = gate_up_A2F.shape
    out_AF = torch.empty(rows, width // 2, dtype=gate_up_A2F.dtype, device=gate_up_A2F.device)
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(width // 2, _BLOCK))](gate_up_A2F, out_AF, width // 2, BLOCK=_BLOCK)
    return out_AF


def weighted_k_sum(out_AD: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Rows t*K + k weighted by the token's k-th weight and summed in k order -> [T, D]."""
    num_tokens, top_k = topk_weights_TK.shape
    width = out_AD.shape[1]
    y_TD = torch.empty(num_tokens, width, dtype=out_AD.dtype, device=out_AD.device)
    if num_tokens:
        _weighted_k_sum_kernel[(num_tokens, triton.cdiv(width, _BLOCK))](
            out_AD, topk_weights_TK.contiguous(), y_TD, width, TOP_K=top_k, BLOCK=_BLOCK)
    return y_TD
