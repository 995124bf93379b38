"""A step's q/k/v after their projection, in one Triton kernel: q/k RMSNorm (per head or over all
heads), qkv clipping, rotary at each token's position, and the new K and V written to their cache
slots; q comes back rotated. Decode and prefill both use it on the GPU.

In torch these are six to eight launches of 1-2 us per layer (two norms, two rotaries, two cache
writes), a sixth of a batch-1 decode step of the Qwen3-30B-A3B shape; eager prefill pays each
torch.compile'd call's 150-300 us of host time instead. One program per (token, part) with part q,
k or v holds that part's heads. Rounding follows the eager torch ops step by step (norm in
fp32, then each product and sum rounded to the model dtype); cos/sin are the accurate (libdevice) ones, as torch's.
Legend: T tokens, H query heads, K kv heads, D head dim, C = (H + 2K) * D.
"""

import torch

from moetier.models.spec import AttentionSpec

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

NORM_NONE, NORM_HEAD, NORM_FULL = 0, 1, 2

if triton is not None:

    @triton.jit
    def _normed(x, w, rstd, dt: tl.constexpr):
        """weight * (x * rstd) as rms_norm rounds it: the normalized value to the model dtype, then the product."""
        return (w * (x * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)

    @triton.jit
    def _qkv_cache_kernel(
        qkv_ptr, positions_ptr, slots_ptr, inv_freq_ptr, q_norm_ptr, k_norm_ptr,
        q_out_ptr, k_cache_ptr, v_cache_ptr,
        stride_qkv, stride_cache_slot, num_heads, num_kv_heads, eps, rope_scaling, clip,
        HEAD_DIM: tl.constexpr, NORM: tl.constexpr, CLIP: tl.constexpr, ROTARY_DIM: tl.constexpr,
        INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)  # 0: q, 1: k, 2: v
        dt = q_out_ptr.dtype.element_ty
        heads = tl.where(part == 0, num_heads, num_kv_heads)
        first = tl.where(part == 0, 0, tl.where(part == 1, num_heads, num_heads + num_kv_heads) * HEAD_DIM)
        norm_ptr = tl.where(part == 0, q_norm_ptr, k_norm_ptr)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        ok = (h < heads) & (d < HEAD_DIM)
        # The rotary partner of each feature: the other half (or the other of an adjacent pair),
        # negated in the first half; features past ROTARY_DIM pass through.
        half: tl.constexpr = ROTARY_DIM // 2
        if INTERLEAVED:
            partner = tl.where(d < ROTARY_DIM, d ^ 1, d)
            sign = tl.where(d % 2 == 0, -1.0, 1.0)
            freq = d // 2
        else:
            partner = tl.where(d < half, d + half, tl.where(d < ROTARY_DIM, d - half, d))
            sign = tl.where(d < half, -1.0, 1.0)
            freq = d % half
        row = qkv_ptr + t * stride_qkv + first + h * HEAD_DIM
        x = tl.load(row + d, mask=ok, other=0.0).to(tl.float32)
        x_p = tl.load(row + partner, mask=ok, other=0.0).to(tl.float32)
        if part < 2:
            if NORM == 2:  # over all heads (OLMoE), before clipping
                rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / (heads * HEAD_DIM) + eps)
                w = tl.load(norm_ptr + h * HEAD_DIM + d, mask=ok, other=0.0).to(tl.float32)
                w_p = tl.load(norm_ptr + h * HEAD_DIM + partner, mask=ok, other=0.0).to(tl.float32)
                x, x_p = _normed(x, w, rstd, dt), _normed(x_p, w_p, rstd, dt)
        if CLIP:
            x, x_p = tl.clamp(x, -clip, clip), tl.clamp(x_p, -clip, clip)
        if part < 2:
            if NORM == 1:  # per head, after clipping
                rstd = tl.rsqrt(tl.sum(x * x, axis=1)[:, None] / HEAD_DIM + eps)
                w = tl.load(norm_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
                w_p = tl.load(norm_ptr + partner, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
                x, x_p = _normed(x, w, rstd, dt), _normed(x_p, w_p, rstd, dt)
            position = tl.load(positions_ptr + t).to(tl.float32)
            angle = position * tl.load(inv_freq_ptr + freq, mask=d < ROTARY_DIM, other=0.0)
            cos = (tl.cos(angle) * rope_scaling).to(dt).to(tl.float32)
            sin = (tl.sin(angle) * rope_scaling).to(dt).to(tl.float32)
            rotated = ((x * cos).to(dt).to(tl.float32) + (sign * x_p * sin).to(dt).to(tl.float32)).to(dt)
            x = tl.where(d < ROTARY_DIM, rotated.to(tl.float32), x)
        if part == 0:
            tl.store(q_out_ptr + t * num_heads * HEAD_DIM + h * HEAD_DIM + d, x.to(dt), mask=ok)
        else:
            slot = tl.load(slots_ptr + t)
            cache_ptr = tl.where(part == 1, k_cache_ptr, v_cache_ptr)
            out = cache_ptr + slot * stride_cache_slot + h * HEAD_DIM + d
            tl.store(out, x.to(cache_ptr.dtype.element_ty), mask=ok)


def supported(qkv_TC: torch.Tensor, spec: AttentionSpec) -> bool:
    return triton is not None and qkv_TC.is_cuda and spec.kind == "gqa"


def norm_rotate_cache(qkv_TC: torch.Tensor, positions_T: torch.Tensor, slot_mapping_T: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, spec: AttentionSpec, inv_freq_R: torch.Tensor,
               rope_scaling: float, q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """Writes k and v into the caches ([blocks, block_size, K, D]); returns the rotated q [T, H, D]."""
    num_tokens = qkv_TC.shape[0]
    h, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    assert qkv_TC.stride(1) == 1 and qkv_TC.shape[1] == (h + 2 * kv) * d
    for cache in (k_cache, v_cache):
        assert cache.stride(0) == cache.shape[1] * cache.stride(1) and cache.stride(1) == kv * d
    q_THD = torch.empty(num_tokens, h, d, dtype=qkv_TC.dtype, device=qkv_TC.device)
    norm = {"none": NORM_NONE, "head": NORM_HEAD, "full": NORM_FULL}[spec.qk_norm]
    q_norm_w = q_norm_w if q_norm_w is not None else inv_freq_R  # unread without a norm
    k_norm_w = k_norm_w if k_norm_w is not None else inv_freq_R
    if num_tokens:
        block_h, block_d = triton.next_power_of_2(max(h, kv)), triton.next_power_of_2(d)
        _qkv_cache_kernel[(num_tokens, 3)](
            qkv_TC, positions_T, slot_mapping_T, inv_freq_R, q_norm_w, k_norm_w,
            q_THD, k_cache, v_cache,
            qkv_TC.stride(0), k_cache.stride(1), h, kv, eps, rope_scaling, spec.clip_qkv or 0.0,
            HEAD_DIM=d, NORM=norm, CLIP=spec.clip_qkv is not None, ROTARY_DIM=spec.rope.rotary_dim,
            INTERLEAVED=spec.rope.interleaved, BLOCK_H=block_h, BLOCK_D=block_d,
            num_warps=4 if block_h * block_d <= 4096 else 8,
        )
    return q_THD
