"""Replayed routing's per-layer gather in one Triton kernel: each token's trace row (cursor + t, cycling),
its K expert ids widened to int64 and its weights to fp32.

In torch that is an arange, an add, a modulo, two index gathers and two casts: seven launches per MoE
layer, each ~1.5 us plus the ~2 us between kernels of a decode graph, all of them between a layer's last
expert copy and the next routing read, where an offloaded decode step's copy engine idles (measured on
the Qwen3-30B-A3B shape at batch 1: ~20 us of a ~260 us gap). A real router has none of them: replay
stands in for the router's decision, not its cost. Legend: T tokens, K experts per token, N trace tokens.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _replay_rows_kernel(ids_NK_ptr, weights_NK_ptr, cursor_ptr, ids_TK_ptr, weights_TK_ptr, T, N,
                            K: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat (token, k)
        mask = i < T * K
        t, k = i // K, i % K
        row = (tl.load(cursor_ptr) + t) % N
        ids = tl.load(ids_NK_ptr + row * K + k, mask=mask, other=0)
        weights = tl.load(weights_NK_ptr + row * K + k, mask=mask, other=0.0)
        tl.store(ids_TK_ptr + i, ids.to(tl.int64), mask=mask)
        tl.store(weights_TK_ptr + i, weights.to(tl.float32), mask=mask)


def supported(ids_NK: torch.Tensor) -> bool:
    return triton is not None and ids_NK.is_cuda


def replay_rows(ids_NK: torch.Tensor, weights_NK: torch.Tensor, cursor: torch.Tensor, num_tokens: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_TK int64, weights_TK fp32) of trace rows cursor .. cursor + T - 1 (mod N): what
    ids_NK[rows].long() and weights_NK[rows].float() give. Both inputs contiguous [N, K]."""
    num_rows, top_k = ids_NK.shape
    assert ids_NK.is_contiguous() and weights_NK.is_contiguous() and weights_NK.shape == ids_NK.shape
    ids_TK = torch.empty(num_tokens, top_k, dtype=torch.int64, device=ids_NK.device)
    weights_TK = torch.empty(num_tokens, top_k, dtype=torch.float32, device=ids_NK.device)
    block = 256
    if num_tokens:
        _replay_rows_kernel[(triton.cdiv(num_tokens * top_k, block),)](
            ids_NK, weights_NK, cursor, ids_TK, weights_TK, num_tokens, num_rows, K=top_k, BLOCK=block, num_warps=2)
    return ids_TK, weights_TK
