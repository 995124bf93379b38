"""Our fp32 logits and greedy tokens equal transformers' for every GQA family and both expert layouts."""

import pytest

from checkpoints import FAMILY_CONFIGS, make_checkpoint
from moetier import LLM
from parity import assert_batched_equals_one_by_one, assert_greedy_matches, assert_logits_match

PROMPTS = [[5, 17, 42, 99, 7, 250, 3], list(range(10, 51)), [300, 4]]


@pytest.fixture(scope="module", params=[(f, fused) for f in FAMILY_CONFIGS for fused in (False, True)],
                ids=lambda p: f"{p[0]}-{'fused' if p[1] else 'per_expert'}")
def pair(request, tmp_path_factory):
    family, fused = request.param
    path = tmp_path_factory.mktemp(family)
    reference = make_checkpoint(family, path, fused=fused)
    return LLM(str(path), dtype="float32", max_model_len=128), reference


def test_logits_match_transformers(pair):
    llm, reference = pair
    for ids in PROMPTS:
        assert_logits_match(llm, reference, ids)


def test_greedy_tokens_match_transformers(pair):
    llm, reference = pair
    assert_greedy_matches(llm, reference, PROMPTS[1])


def test_batched_generation_equals_one_by_one(pair):
    llm, _ = pair
    assert_batched_equals_one_by_one(llm, PROMPTS)
