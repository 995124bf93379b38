"""Next-layer prediction and prefetch (CPU): predicted copies change no value, are used, and are as
many as the measured copy window holds; the gate predictor predicts on the trained model."""

import pytest
import torch
from checkpoints import make_checkpoint

from moetier import LLM, SamplingParams
from moetier.offload import executor as executor_module
from moetier.offload.copy_engine import CpuEvent, DelayedCopyEngine
from moetier.offload.prefetch import PrefetchWindow

PROMPTS = [[5, 17, 42, 99, 7, 250, 3], list(range(10, 51)), [300, 4]]

pytestmark = pytest.mark.usefixtures("one_thread")


def _outputs(llm: LLM) -> tuple[list[torch.Tensor], list[list[int]]]:
    logits = [llm.score(ids) for ids in PROMPTS]
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))
    return logits, [out.token_ids for out in outs]


@pytest.mark.parametrize("slots", [4, 6, 12])
def test_predicted_prefetch_is_exact_and_used(slots, tmp_path, monkeypatch):
    """Every guess prefetched, whatever its precision and the window: slow copies into tiny pools,
    where a prefetch evicts what a later round or layer needs, still give resident's bits."""
    make_checkpoint("qwen3_moe", tmp_path)
    ref_logits, ref_tokens = _outputs(LLM(str(tmp_path), dtype="float32", max_model_len=128))
    monkeypatch.setattr(executor_module, "PREDICTION_MIN_PRECISION", 0.0)
    monkeypatch.setattr(PrefetchWindow, "depth", lambda self: 1000)
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=128, expert_slots=slots, predictor="gate")
    copies = DelayedCopyEngine(0.001)
    llm.engine.executor.copy_engine = copies
    llm.engine.executor.window.copy_engine = copies
    logits, tokens = _outputs(llm)
    assert all(torch.equal(a, b) for a, b in zip(logits, ref_logits)) and tokens == ref_tokens
    assert copies.violations == []
    stats = llm.stats()
    assert stats["prefetch_loads"] > 0 and stats["prefetch_used"] > 0
    assert 0 < stats["prediction_precision"] <= 1 and 0 < stats["prediction_recall"] <= 1
    assert stats["bytes_copied"] == (stats["misses"] - stats["prefetch_used"] + stats["prefetch_loads"]) * stats["slot_bytes"]


def test_gate_predictor_predicts_the_trained_model():
    """The next layer's router on this layer's input names most of the next layer's experts on the
    trained model (measured 0.76 at 8 of 32 experts x 4: chance is 0.125); without a predictor
    nothing is guessed or prefetched."""
    prompt = "The history of the city begins"
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    guessed = LLM(None, dtype="float32", expert_slots=24, predictor="gate")
    plain = LLM(None, dtype="float32", expert_slots=24, predictor="none")
    assert guessed.generate(prompt, params)[0].token_ids == plain.generate(prompt, params)[0].token_ids
    stats = guessed.stats()
    assert stats["prediction_precision"] > 0.6 and stats["prediction_recall"] > 0.6
    assert stats["prefetch_used"] > 0.6 * stats["prefetch_loads"] > 0
    assert plain.stats()["prediction_precision"] is None and plain.stats()["prefetch_loads"] == 0


class _Clock:
    """Markers at given times; `late` makes the next copy-end marker still pending."""

    def __init__(self, times):
        self.times = iter(times)
        self.late = False

    def marker(self, on_copies: bool):
        event = CpuEvent(done=True)
        event.time = next(self.times)
        if on_copies and self.late:
            event.query = lambda: False
        return event

    def elapsed(self, start, end) -> float:
        return end.time - start.time


def test_prefetch_window_is_measured_window_over_copy_time():
    clock = _Clock([0.0, 3.0, 10.0, 20.0, 22.0, 30.0, 40.0, 41.0, 42.0])
    window = PrefetchWindow(clock)
    assert window.depth() == 0  # nothing measured yet: no guess copied
    # layer l: 3 copies from 0 to 3 (1 each), the next routing at 10: a window of 7 copies
    start = window.copies_start()
    window.copies_issued(start, 3)
    window.routing_issued()
    window.measure()
    assert (window.copy_s, window.window_s, window.depth()) == (1.0, 7.0, 7)
    # one copy of 2, the routing 8 after: running averages
    start = window.copies_start()
    window.copies_issued(start, 1)
    window.routing_issued()
    window.measure()
    assert window.copy_s == pytest.approx(1.1) and window.window_s == pytest.approx(7.1)
    # copies still running when the routing is known: a window of 0, no copy time learned
    clock.late = True
    start = window.copies_start()
    window.copies_issued(start, 1)
    window.routing_issued()
    window.measure()
    assert window.copy_s == pytest.approx(1.1) and window.window_s == pytest.approx(0.9 * 7.1)
    assert window.depth() == int(0.9 * 7.1 / 1.1)
