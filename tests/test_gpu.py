"""The same engine on a CUDA GPU: fp32 logits agree with transformers there, bf16 runs end to end."""

import pytest
import torch

from checkpoints import FAMILY_CONFIGS, make_checkpoint
from moetier import LLM, SamplingParams
from parity import LOGIT_RTOL, assert_greedy_matches

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_cuda_fp32_matches_transformers(family, tmp_path):
    reference = make_checkpoint(family, tmp_path).cuda()
    llm = LLM(str(tmp_path), dtype="float32", device="cuda", max_model_len=128)
    ids = list(range(10, 60))
    with torch.no_grad():
        theirs = reference(torch.tensor([ids], device="cuda")).logits[0].float()
    err = (llm.score(ids) - theirs).abs().max().item()
    assert err <= LOGIT_RTOL * theirs.abs().max().item()
    assert_greedy_matches(llm, reference.cpu(), ids)


def test_cuda_bf16_batched_generation(tmp_path):
    make_checkpoint("qwen3_moe", tmp_path)
    llm = LLM(str(tmp_path), dtype="bfloat16", device="cuda", max_model_len=128)
    outputs = llm.generate([[5, 6, 7], list(range(10, 40))], SamplingParams(max_tokens=16, ignore_eos=True))
    assert [len(o.token_ids) for o in outputs] == [16, 16]
    assert llm.engine.executor.banks[0].bytes_SB.is_cuda
