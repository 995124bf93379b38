"""Reference paged attention: write new K/V into cache blocks, attend per sequence.

Plain torch, fp32 scores; the fast path (FlexAttention/Triton decode) must match it.
Shapes: L new query tokens of one sequence, C context tokens, H query heads, K kv heads.
"""

import torch
import torch.nn.functional as F

from moetier.engine.batch import SeqSlice


def write_kv(cache_NB_: torch.Tensor, slot_mapping_T: torch.Tensor, new_T_: torch.Tensor) -> None:
    """cache [num_blocks, block_size, ...] gets each new token's entry at its flat slot."""
    cache_NB_.view(-1, *cache_NB_.shape[2:]).index_copy_(0, slot_mapping_T, new_T_.to(cache_NB_.dtype))


def gather_kv(cache_NB_: torch.Tensor, seq: SeqSlice) -> torch.Tensor:
    """One sequence's cached entries in position order: [ctx_len, ...]."""
    return cache_NB_[seq.block_table].flatten(0, 1)[: seq.ctx_len]


def causal_mask(q_len: int, ctx_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[L, C] True where query j (at position ctx_len - q_len + j) may see key c."""
    q_pos_L = torch.arange(ctx_len - q_len, ctx_len, device=device)
    k_pos_C = torch.arange(ctx_len, device=device)
    mask_LC = k_pos_C[None, :] <= q_pos_L[:, None]
    if window is not None:
        mask_LC &= k_pos_C[None, :] > q_pos_L[:, None] - window
    return mask_LC


def attend(
    q_LHD: torch.Tensor,
    k_CKD: torch.Tensor,
    v_CKV: torch.Tensor,
    mask_LC: torch.Tensor | None,
    scale: float,
    sinks_H: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped-query attention of one sequence; returns [L, H, V] in q's dtype.

    mask_LC None means plain causal over a context that is exactly the L new tokens."""
    if sinks_H is None:
        out_1HLV = F.scaled_dot_product_attention(
            q_LHD.transpose(0, 1)[None], k_CKD.transpose(0, 1)[None], v_CKV.transpose(0, 1)[None],
            attn_mask=mask_LC, is_causal=mask_LC is None, scale=scale, enable_gqa=True,
        )
        return out_1HLV[0].transpose(0, 1)
    # A per-head sink logit joins the softmax but contributes no value (GPT-OSS).
    group = q_LHD.shape[1] // k_CKD.shape[1]
    q_HLD = q_LHD.float().transpose(0, 1)
    k_HCD = k_CKD.float().transpose(0, 1).repeat_interleave(group, dim=0)
    v_HCV = v_CKV.float().transpose(0, 1).repeat_interleave(group, dim=0)
    scores_HLC = torch.matmul(q_HLD, k_HCD.transpose(1, 2)) * scale
    if mask_LC is None:
        mask_LC = causal_mask(q_LHD.shape[0], k_CKD.shape[0], None, q_LHD.device)
    scores_HLC = scores_HLC.masked_fill(~mask_LC, float("-inf"))
    sink_HL1 = sinks_H.float()[:, None, None].expand(-1, scores_HLC.shape[1], 1)
    probs_HLC = torch.softmax(torch.cat([scores_HLC, sink_HL1], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs_HLC, v_HCV).transpose(0, 1).to(q_LHD.dtype)


def sequence_mask(q_len: int, ctx_len: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """The mask for attend(): None (plain causal, fast kernels) when nothing is cached and no window applies."""
    if q_len == ctx_len and window is None:
        return None
    return causal_mask(q_len, ctx_len, window, device)
