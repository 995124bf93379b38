"""Sliding-window perplexity scores every token exactly once, whatever the window and stride."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moetier.eval.perplexity import sliding_window_perplexity


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 60), st.integers(2, 20), st.integers(1, 20), st.integers(0, 1000))
def test_bigram_model_perplexity_is_window_invariant(length, window, stride, seed):
    stride = min(stride, window)
    gen = torch.Generator().manual_seed(seed)
    vocab = 7
    table_VV = torch.randn(vocab, vocab, generator=gen)  # logits depend only on the current token
    ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
    result = sliding_window_perplexity(lambda x: table_VV[torch.tensor(x)], ids, window, stride)
    expected = torch.nn.functional.cross_entropy(table_VV[torch.tensor(ids[:-1])], torch.tensor(ids[1:]))
    assert result.tokens_scored == length - 1
    assert abs(result.mean_nll - float(expected)) < 1e-5
