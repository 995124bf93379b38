"""The functions fused by torch.compile on the GPU trace whole (no graph breaks) and compute the same."""

import pytest
import torch

from checkpoints import make_checkpoint
from moetier import LLM
from moetier.kernels import fuse


@pytest.mark.parametrize("family,slots", [("qwen3_moe", None), ("qwen2_moe", None), ("qwen3_moe", 3)])
def test_fused_functions_trace_fullgraph_and_match_eager(family, slots, tmp_path, monkeypatch, caplog):
    """slots: offloaded, the layers' steps in rounds (whose own dispatch runs eagerly) among the fused functions."""
    make_checkpoint(family, tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=64, expert_slots=slots)
    ids = list(range(5, 30))
    eager = llm.score(ids)
    monkeypatch.setattr(fuse, "cpu_backend", "aot_eager")
    torch._dynamo.reset()
    traced = llm.score(ids)
    assert "unfused" not in caplog.text  # a graph break would have fallen back to eager
    torch.testing.assert_close(traced, eager, rtol=0, atol=1e-5)
