"""Replayed routing drives the MoE layers from a trace: the same routing shape is required, and
replaying a recorded trace through the same steps reproduces its expert choices exactly."""

import numpy as np
import pytest

from checkpoints import make_checkpoint
from moetier import LLM, MoetierError, SamplingParams
from moetier.trace.recorder import attach_recorder, engine_trace
from moetier.trace.replay import replay_routing, routing_trace_for
from moetier.trace.synthetic import generate

PROMPTS = [list(range(5, 40)), list(range(60, 72))]


def _recorded(llm: LLM, replay=None):
    recorder = attach_recorder(llm.engine)
    if replay is not None:
        replay_routing(llm.engine, replay)
    llm.generate(PROMPTS, SamplingParams(max_tokens=6, ignore_eos=True))
    recorder.flush()
    return engine_trace(llm.engine, recorder)


def test_replaying_a_recorded_trace_reproduces_its_routing(tmp_path):
    make_checkpoint("qwen3_moe", tmp_path)
    original = _recorded(LLM(str(tmp_path), dtype="float32", max_model_len=64))
    # Another model of the same routing shape (different weights) driven by the trace.
    make_checkpoint("qwen3_moe", tmp_path / "other", seed=1)
    replayed = _recorded(LLM(str(tmp_path / "other"), dtype="float32", max_model_len=64), replay=original)
    assert np.array_equal(replayed.expert_ids, original.expert_ids)
    np.testing.assert_allclose(replayed.weights, original.weights)
    # Without the replay the other model routes differently.
    assert not np.array_equal(_recorded(LLM(str(tmp_path / "other"), dtype="float32", max_model_len=64)).expert_ids,
                              original.expert_ids)


def test_replay_needs_the_same_routing_shape(tmp_path):
    make_checkpoint("qwen3_moe", tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=64)
    wrong = generate("uniform", 3, 16, 2, 32)  # 16 experts, the model has 8
    with pytest.raises(MoetierError, match="does not match the model"):
        replay_routing(llm.engine, wrong)
    with pytest.raises(MoetierError, match="use router, replay:FILE or synthetic"):
        routing_trace_for(llm.engine, "synthetic:nonsense")
    synthetic = routing_trace_for(llm.engine, "synthetic:lognormal")
    assert (len(synthetic.moe_layers), synthetic.num_experts, synthetic.top_k) == (3, 8, 2)
    replay_routing(llm.engine, synthetic)
    [out] = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4
