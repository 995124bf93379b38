"""Paged-attention decode in Triton: one query token per sequence against its paged K/V.

Split-K ("flash decoding"): grid (sequence, kv head, split); each program runs an online softmax
over its share of the context for the G query heads of one kv head, and a second kernel merges
the splits (and the attention sinks, if any) into the output, one program per (sequence, head).
No host sync, so it runs inside CUDA graphs.
Legend: B sequences, H query heads, K kv heads, G = H / K, D head dim, N cache blocks, P splits.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference attention serves every step there
    triton = None


if triton is not None:

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, m_ptr, l_ptr, acc_ptr,
        stride_qb, stride_qh,
        stride_kn, stride_ks, stride_kh,
        stride_vn, stride_vs, stride_vh,
        stride_tb,
        scale, window,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(ctx_ptr + b)
        lo = 0
        if window > 0:
            lo = tl.maximum(ctx - window, 0)
        per_split = tl.cdiv(tl.cdiv(ctx - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = lo + split * per_split
        end = tl.minimum(start + per_split, ctx)

        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        heads = kv_head * G + g
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=(g[:, None] < G) & (d[None, :] < D), other=0.0,
        )
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        for tile in range(0, tl.cdiv(end - start, BLOCK_N)):
            pos = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = pos < end
            block = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
            row = pos % BLOCK_SIZE
            kv_mask = valid[:, None] & (d[None, :] < D)
            k = tl.load(k_ptr + block[:, None] * stride_kn + row[:, None] * stride_ks + kv_head * stride_kh + d[None, :],
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            v = tl.load(v_ptr + block[:, None] * stride_vn + row[:, None] * stride_vs + kv_head * stride_vh + d[None, :],
                        mask=kv_mask, other=0.0)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            m_i = m_new
        row_ids = (b * tl.num_programs(1) * G + heads) * NUM_SPLITS + split
        tl.store(m_ptr + row_ids, m_i, mask=g < G)
        tl.store(l_ptr + row_ids, l_i, mask=g < G)
        tl.store(acc_ptr + row_ids[:, None] * D + d[None, :], acc, mask=(g[:, None] < G) & (d[None, :] < D))

    @triton.jit
    def _merge_splits_kernel(
        m_ptr, l_ptr, acc_ptr, sinks_ptr, out_ptr, num_heads,
        NUM_SPLITS: tl.constexpr, P_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, SINKS: tl.constexpr,
    ):
        """One (sequence, head): softmax-merges its splits' partial results into the output row, in
        the output dtype; a sink adds to the denominator only."""
        row = tl.program_id(0).to(tl.int64)  # b * num_heads + h
        p = tl.arange(0, P_PAD)
        d = tl.arange(0, D_PAD)
        m = tl.load(m_ptr + row * NUM_SPLITS + p, mask=p < NUM_SPLITS, other=float("-inf"))
        l = tl.load(l_ptr + row * NUM_SPLITS + p, mask=p < NUM_SPLITS, other=0.0)
        acc = tl.load(acc_ptr + (row * NUM_SPLITS + p[:, None]) * D + d[None, :],
                      mask=(p[:, None] < NUM_SPLITS) & (d[None, :] < D), other=0.0)
        m_max = tl.max(m, axis=0)
        if SINKS:
            sink = tl.load(sinks_ptr + row % num_heads).to(tl.float32)
            m_max = tl.maximum(m_max, sink)
        weight = tl.exp(m - m_max)
        denominator = tl.sum(l * weight, axis=0)
        if SINKS:
            denominator += tl.exp(sink - m_max)
        out = tl.sum(acc * weight[:, None], axis=0) / denominator
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


_TARGET_PROGRAMS = 256  # about two per SM on an H100
_TILE_TOKENS = 64  # context tokens per loop iteration (several cache blocks)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def paged_decode(
    q_BHD: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables_BM: torch.Tensor,
    ctx_lens_B: torch.Tensor,
    scale: float,
    window: int | None = None,
    sinks_H: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention output [B, H, D] in q's dtype. k_cache/v_cache: [N, block_size, K, D]."""
    num_seqs, num_heads, head_dim = q_BHD.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_splits is None:  # enough programs to fill the GPU at small batch, few splits at large
        num_splits = max(1, min(32, _TARGET_PROGRAMS // (num_seqs * num_kv_heads)))
    group = num_heads // num_kv_heads
    rows = num_seqs * num_heads * num_splits
    m_R = torch.empty(rows, dtype=torch.float32, device=q_BHD.device)
    l_R = torch.empty_like(m_R)
    acc_RD = torch.empty(rows, head_dim, dtype=torch.float32, device=q_BHD.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q_BHD, k_cache, v_cache, block_tables_BM, ctx_lens_B, m_R, l_R, acc_RD,
        q_BHD.stride(0), q_BHD.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables_BM.stride(0),
        scale, window or 0,
        G=group, G_PAD=max(16, _next_pow2(group)), D=head_dim, D_PAD=max(16, _next_pow2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_N=max(_TILE_TOKENS, block_size), NUM_SPLITS=num_splits,
        # fp32 models get exact fp32 products (tl.dot would use TF32); bf16/fp16 use the tensor cores
        PRECISION="ieee" if q_BHD.dtype == torch.float32 else "tf32",
    )
    out_BHD = torch.empty(num_seqs, num_heads, head_dim, dtype=q_BHD.dtype, device=q_BHD.device)
    _merge_splits_kernel[(num_seqs * num_heads,)](
        m_R, l_R, acc_RD, sinks_H if sinks_H is not None else m_R, out_BHD,
        num_heads, NUM_SPLITS=num_splits, P_PAD=_next_pow2(num_splits), D=head_dim,
        D_PAD=max(16, _next_pow2(head_dim)), SINKS=sinks_H is not None,
    )
    return out_BHD
