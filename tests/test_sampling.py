"""Sampler properties: top-k/top-p restrict the support correctly; penalties follow HF semantics."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moetier.engine.sampler import apply_repetition_penalty, restrict_top_k_top_p

logits_strategy = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=40).map(torch.tensor)


@settings(max_examples=200, deadline=None)
@given(logits_strategy, st.integers(0, 45), st.floats(0.01, 1.0))
def test_top_k_top_p_support(logits, top_k, top_p):
    kept = torch.isfinite(restrict_top_k_top_p(logits, top_k, top_p))
    n = int(kept.sum())
    assert n >= 1
    if top_k:
        assert n <= top_k
    # The kept tokens are the most likely ones (ties may go either way).
    assert logits[kept].min() >= logits[~kept].max() if (~kept).any() else True
    # Kept mass reaches top_p within the top-k set, and dropping the least likely kept token would not.
    candidates = torch.sort(logits, descending=True).values[: top_k or len(logits)]
    probs = torch.softmax(candidates, dim=0)
    assert probs[:n].sum() >= top_p - 1e-5 or n == len(candidates)
    assert n == 1 or probs[: n - 1].sum() < top_p + 1e-5


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(50)
    seen = [3, 7, 7, 20, 49]
    ours = apply_repetition_penalty(logits, seen, 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), logits[None].clone())[0]
    assert torch.equal(ours, theirs)
