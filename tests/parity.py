"""Shared parity checks against a transformers reference model (fp32, margin-aware)."""

import torch

from moetier import LLM, SamplingParams

LOGIT_RTOL = 1e-4
TIE_MARGIN = 1e-5


def assert_logits_match(llm: LLM, reference: torch.nn.Module, ids: list[int]) -> None:
    ours = llm.score(ids)
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].float()
    err = (ours - theirs).abs().max().item()
    assert err <= LOGIT_RTOL * theirs.abs().max().item(), f"max logit error {err}"


def reference_greedy(reference: torch.nn.Module, ids: list[int], steps: int) -> list[tuple[int, float]]:
    """Greedy continuation by plain teacher forcing: (token, top-2 margin) per step."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = reference(torch.tensor([ids])).logits[0, -1].float()
            top2 = torch.topk(logits, 2)
            out.append((int(top2.indices[0]), float(top2.values[0] - top2.values[1])))
            ids.append(out[-1][0])
    return out


def assert_greedy_matches(llm: LLM, reference: torch.nn.Module, ids: list[int], steps: int = 16) -> None:
    [output] = llm.generate([ids], SamplingParams(max_tokens=steps, ignore_eos=True))
    expected = reference_greedy(reference, ids, steps)
    for step, (ours, (theirs, margin)) in enumerate(zip(output.token_ids, expected)):
        if ours != theirs:
            assert margin < TIE_MARGIN, f"greedy token {step} differs ({ours} vs {theirs}) with margin {margin}"
            return  # a near-tie: the continuations may legitimately diverge from here
    assert len(output.token_ids) == steps


def assert_batched_equals_one_by_one(llm: LLM, prompts: list[list[int]], steps: int = 12) -> None:
    params = SamplingParams(max_tokens=steps, ignore_eos=True)
    batched = llm.generate(prompts, params)
    for ids, out in zip(prompts, batched):
        [alone] = llm.generate([ids], params)
        assert out.token_ids == alone.token_ids
