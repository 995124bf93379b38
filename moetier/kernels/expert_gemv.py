"""Decode-sized expert GEMV in Triton: each (token, k) assignment reads its expert's rows directly.

For a handful of tokens, grouping by expert (sort, offsets, grouped GEMM) costs more than it saves:
each assignment's expert is read once anyway. This kernel needs no dispatch at all: program
(a, n-block) computes rows n of W[slot[a]] @ x[token[a]], optionally applying the SwiGLU
activation to a [gate | up] input as it loads it. Accumulation is fp32. An assignment whose slot is
negative is skipped, its output row left as it was: an offloaded layer computes its experts in
rounds, as their copies land, into one output.
Legend: A assignments, N output rows, K input features, S slots.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _expert_gemv_kernel(
        x_ptr, w_ptr, slot_ptr, out_ptr,
        stride_x, stride_ws, stride_wn, stride_out,
        N, K, rows_per_input,
        SWIGLU: tl.constexpr, DENSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        a = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        slot = 0 if DENSE else tl.load(slot_ptr + a).to(tl.int64)
        if slot < 0:  # not this round's
            return
        x_row = x_ptr + (a // rows_per_input).to(tl.int64) * stride_x
        w_rows = w_ptr + slot * stride_ws + n[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            if SWIGLU:  # the input row is [gate (K) | up (K)]: act = silu(gate) * up, rounded like torch's
                gate = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
                up = tl.load(x_row + K + k, mask=k_ok, other=0.0)
                silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
                xin = (silu * up).to(tl.float32)
            else:
                xin = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_rows + k[None, :], mask=(n[:, None] < N) & k_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * xin[None, :], axis=1)
        tl.store(out_ptr + a.to(tl.int64) * stride_out + n, acc.to(out_ptr.dtype.element_ty), mask=n < N)


# (BLOCK_N, BLOCK_K, warps, stages) by whether the input is a [gate | up] pair (the down projection), from
# benchmarks/gemv_sweep.py --compare on the H100 at the Qwen3-30B-A3B and OLMoE shapes. One tile serves
# every call (its sum order is the tile's: resident and offloaded steps stay bitwise equal), so it is chosen
# for three uses: batch 1 and batch 8 with every row computed, and one row of 8 (an offloaded step's last
# expert, computed after its copy lands, between the copy engine and the next layer's routing). gate_up:
# 19.3 / 132.7 / 7.4 us at Qwen3 (the 8-row, 256-wide tile before: 21.0 / 134.9 / 12.1); down: 11.6 / 68.7 /
# 5.0 (the 4-row, 2-warp one: 11.3 / 68.8 / 6.8).
_TILES = {False: (2, 1024, 4, 1), True: (8, 256, 4, 3)}


def expert_gemv(x_RK: torch.Tensor, w_SNK: torch.Tensor, slots_A: torch.Tensor, rows_per_input: int,
                swiglu: bool = False, out_AN: torch.Tensor | None = None) -> torch.Tensor:
    """out[a] = W[slots[a]] @ input(x[a // rows_per_input]) -> [A, N], for the rows whose slot is not
    negative (into out_AN if given); input is silu(gate)*up if swiglu."""
    num_assignments = slots_A.shape[0]
    n, k = w_SNK.shape[1], w_SNK.shape[2]
    assert w_SNK.stride(2) == 1 and x_RK.stride(-1) == 1, "rows must be contiguous"
    assert x_RK.shape[-1] == (2 * k if swiglu else k)
    if out_AN is None:
        out_AN = torch.empty(num_assignments, n, dtype=x_RK.dtype, device=x_RK.device)
    assert out_AN.shape == (num_assignments, n) and out_AN.stride(1) == 1
    block_n, block_k, warps, stages = _TILES[swiglu]
    _expert_gemv_kernel[(num_assignments, triton.cdiv(n, block_n))](
        x_RK, w_SNK, slots_A, out_AN,
        x_RK.stride(0), w_SNK.stride(0), w_SNK.stride(1), out_AN.stride(0),
        n, k, rows_per_input,
        SWIGLU=swiglu, DENSE=False, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out_AN


def dense_gemv(x_1K: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x @ W.T for one token -> [1, N]: the same kernel over a single matrix, one row per program
    so that even a router's 128 rows spread over the GPU (tile from benchmarks/gemv_sweep.py --dense)."""
    n, k = w_NK.shape
    assert x_1K.shape == (1, k) and x_1K.stride(-1) == 1 and w_NK.stride(1) == 1
    out_1N = torch.empty(1, n, dtype=x_1K.dtype, device=x_1K.device)
    _expert_gemv_kernel[(1, n)](
        x_1K, w_NK, x_1K, out_1N,
        x_1K.stride(0), 0, w_NK.stride(0), out_1N.stride(0),
        n, k, 1,
        SWIGLU=False, DENSE=True, BLOCK_N=1, BLOCK_K=1024, num_warps=4, num_stages=3,
    )
    return out_1N
