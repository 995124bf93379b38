"""Router scores and top-k in one Triton kernel: one program per token holds its E logits.

torch's softmax, topk (a radix select plus a sort) and gather are five or six launches of ~1-5 us
each per MoE layer, most of a decode step's small-kernel time (profile of the Qwen3-30B-A3B
shape at batch 1: 13.5 us per layer). Here the top-k is K passes of max over the row, ties
going to the lowest expert id; weights are the chosen scores (softmax first) or a softmax of the
chosen logits (GPT-OSS), then normalized and scaled as router.py does. fp32 math throughout.
Legend: T tokens, E experts, K experts per token.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _softmax_topk_kernel(
        logits_ptr, ids_ptr, weights_ptr, stride_logits, E, routed_scaling,
        TOP_K: tl.constexpr, SOFTMAX_FIRST: tl.constexpr, NORM_TOPK: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)
        logits = tl.load(logits_ptr + t * stride_logits + e, mask=e < E, other=float("-inf")).to(tl.float32)
        if SOFTMAX_FIRST:
            p = tl.exp(logits - tl.max(logits, axis=0))
            choice = p / tl.sum(p, axis=0)
        else:
            choice = logits
        k = tl.arange(0, BLOCK_K)
        ids = tl.zeros([BLOCK_K], tl.int64)
        values = tl.full([BLOCK_K], float("-inf"), tl.float32)
        for i in tl.static_range(TOP_K):
            best = tl.argmax(choice, axis=0, tie_break_left=True)
            ids = tl.where(k == i, best, ids)
            values = tl.where(k == i, tl.max(choice, axis=0), values)
            choice = tl.where(e == best, float("-inf"), choice)
        if SOFTMAX_FIRST:
            weights = tl.where(k < TOP_K, values, 0.0)
            if NORM_TOPK:
                weights = weights / (tl.sum(weights, axis=0) + 1e-20)
            weights = weights * routed_scaling
        else:
            p = tl.exp(values - tl.max(values, axis=0))  # -inf padding -> 0
            weights = p / tl.sum(p, axis=0)
        tl.store(ids_ptr + t * TOP_K + k, ids, mask=k < TOP_K)
        tl.store(weights_ptr + t * TOP_K + k, weights, mask=k < TOP_K)


def supported(logits_TE: torch.Tensor, scoring: str, num_groups: int, correction_bias: bool) -> bool:
    return (triton is not None and logits_TE.is_cuda and scoring in ("softmax", "topk_softmax")
            and num_groups == 1 and not correction_bias)


def softmax_topk(logits_TE: torch.Tensor, top_k: int, softmax_first: bool, norm_topk: bool,
                 routed_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids_TK int64, topk_weights_TK fp32), the k order by descending score."""
    num_tokens, num_experts = logits_TE.shape
    assert logits_TE.stride(1) == 1
    ids_TK = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits_TE.device)
    weights_TK = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits_TE.device)
    if num_tokens:
        _softmax_topk_kernel[(num_tokens,)](
            logits_TE, ids_TK, weights_TK, logits_TE.stride(0), num_experts, routed_scaling,
            TOP_K=top_k, SOFTMAX_FIRST=softmax_first, NORM_TOPK=norm_topk,
            BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=max(2, triton.next_power_of_2(top_k)),
            num_warps=1 if num_experts <= 256 else 4,
        )
    return ids_TK, weights_TK
