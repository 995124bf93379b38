"""Sliding-window perplexity: each token is scored once, with up to `window` tokens of context.

Windows advance by `stride`; a window scores only the tokens that the previous one did not, so
every scored token after the first window sees at least window - stride tokens of context.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Perplexity:
    tokens_scored: int
    mean_nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def sliding_window_perplexity(
    score: Callable[[list[int]], torch.Tensor], token_ids: list[int], window: int, stride: int
) -> Perplexity:
    """score(ids) returns teacher-forced logits [len(ids), vocab]."""
    if not 0 < stride <= window:
        raise ValueError("need 0 < stride <= window")
    total_nll, count, scored_until = 0.0, 0, 1  # token 0 has no context and is never scored
    begin = 0
    while scored_until < len(token_ids):
        end = min(begin + window, len(token_ids))
        logits_LV = score(token_ids[begin:end])
        targets_L = torch.tensor(token_ids[begin + 1 : end])
        nll_L = torch.nn.functional.cross_entropy(logits_LV[:-1].float(), targets_L, reduction="none")
        fresh_L = nll_L[scored_until - begin - 1 :]
        total_nll += float(fresh_L.sum())
        count += fresh_L.numel()
        scored_until = end
        begin = min(begin + stride, scored_until - 1)  # the next target always has a token of context
    return Perplexity(count, total_nll / max(count, 1))
