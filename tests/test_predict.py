"""Next-layer prediction and prefetch (CPU): predicted copies change no value, are used, and are as
many as the measured copy window holds; the gate predictor predicts on the trained model."""

import pytest
import torch
from checkpoints import FAMILY_CONFIGS, make_checkpoint

from moetier import LLM, SamplingParams
from moetier.models.registry import family_for
from moetier.moe.experts import ExpertId
from moetier.moe.router import Routing
from moetier.offload import executor as executor_module
from moetier.offload.copy_engine import CpuEvent, DelayedCopyEngine
from moetier.offload.executor import OffloadedExecutor
from moetier.offload.prefetch import PrefetchWindow

PROMPTS = [[5, 17, 42, 99, 7, 250, 3], list(range(10, 51)), [300, 4]]

pytestmark = pytest.mark.usefixtures("one_thread")


def _outputs(llm: LLM) -> tuple[list[torch.Tensor], list[list[int]]]:
    logits = [llm.score(ids) for ids in PROMPTS]
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))
    return logits, [out.token_ids for out in outs]


# 3 MoE layers of 8 experts, top-2. Guesses copy into free slots only: the two spare slots the
# planner frees after each layer step (kept by pools of at least 32 slots, set here for tiny ones).
# The layer-aware policy lets a layer borrow slots only up to top_k: from about 3 slots a layer (9)
# narrow steps fit in one round; the pools are still tiny: most steps run in rounds, and the next
# step's rounds and the spare slots' refills evict what the guesses loaded.
@pytest.mark.parametrize("slots", [9, 10, 12])
def test_predicted_prefetch_is_exact_and_used(slots, tmp_path, monkeypatch):
    """Every guess prefetched, whatever its precision and the window: slow copies into spare slots of
    tiny pools still give resident's bits."""
    make_checkpoint("qwen3_moe", tmp_path)
    ref_logits, ref_tokens = _outputs(LLM(str(tmp_path), dtype="float32", max_model_len=128))
    monkeypatch.setattr(executor_module, "PREDICTION_MIN_PRECISION", 0.0)
    monkeypatch.setattr(PrefetchWindow, "depth", lambda self, precision: 1000)
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=128, expert_slots=slots, predictor="gate")
    llm.engine.executor.planner.spare = 2
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
    # one copy's time (1 ms here), from the copies after each layer's first (timed from its end)
    assert stats["expert_copy_s"] == pytest.approx(0.001, rel=0.5)


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
    """Markers at given times, in the order they are made; `late` leaves copy-stream markers pending."""

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


def _layer(window: PrefetchWindow, copies: int, first: bool = False) -> None:
    window.measure()  # before the routing read, as the executor does
    window.times_step()
    window.copies_start(None)
    window.window_ends(first_layer=first)
    window.copies_issued(copies)


def test_prefetch_window_is_measured_window_over_copy_time():
    # markers per layer: copies start, compute now (only when the layer before was timed and in the same
    # step), copies end
    clock = _Clock([0.0, 3.0, 10.0, 10.0, 12.0, 20.0, 20.0, 25.0, 30.0, 30.0, 31.0, 100.0, 101.0, 110.0, 110.0, 111.0])
    window = PrefetchWindow(clock, sample_every=1)
    _layer(window, 3, first=True)  # 3 copies from 0 to 3: 1 each
    assert window.depth(1.0) == 0  # nothing measured yet: no guess copied
    _layer(window, 1)  # its copies start at 10 (the window of the layer before: 3 -> 10), end at 12
    assert (window.copy_s, window.window_s) == (1.0, None)
    clock.late = True  # this layer's copies have not ended when the next routing is read
    _layer(window, 1)
    assert window.copy_s == pytest.approx(1.1) and window.window_s == 7.0
    # depth: the 6 copies of 1.1 that fit 7, and a seventh when its 0.4 of window beats 1.1 (1 - p)
    assert (window.depth(0.5), window.depth(0.9)) == (6, 7)
    clock.late = False
    _layer(window, 1)  # the late copy time stays out; the window 12 -> 20 comes in
    assert window.copy_s == pytest.approx(1.1) and window.window_s == pytest.approx(0.9 * 7 + 0.1 * 8)
    _layer(window, 1, first=True)  # a new step: no window across the lm_head and sampling (31 -> 100)
    _layer(window, 1)
    assert window.window_s == pytest.approx(0.9 * 7 + 0.1 * 8) and window.copy_s == pytest.approx(0.9 * 1.09 + 0.1)


def test_prefetch_window_times_one_layer_step_in_sample_every():
    """Only a timed step makes markers: its copies start and end, and the next step closes its window."""
    # step 0: start, end, step 1: now (steps 1 and 2 untimed); step 3: start, end, step 4: now
    clock = _Clock([0.0, 2.0, 5.0, 20.0, 21.0, 30.0, 99.0])
    window = PrefetchWindow(clock, sample_every=3)
    for copies in (2, 1, 1, 1, 1):
        _layer(window, copies)
    window.measure()
    assert window.copy_s == pytest.approx(1.0) and window.window_s == pytest.approx(0.9 * 3 + 0.1 * 9)
    assert next(clock.times) == 99.0  # no other marker made


class _Fixed:
    """Guesses the same experts for every next layer, and counts its calls."""

    def __init__(self, experts: list[int]):
        self.experts = experts
        self.calls = 0

    def predict(self, layer, x_TD):
        self.calls += 1
        return torch.tensor([self.experts])


def test_wrong_guesses_stop_prefetching_and_are_probed_again():
    """Guesses that are never right: prefetching stops after a few, the predictor then runs one
    layer step in PREDICTION_PROBE_EVERY; once its guesses come right, prefetching resumes."""
    config = FAMILY_CONFIGS["qwen3_moe"]().to_dict() | {"architectures": ["Qwen3MoeForCausalLM"]}
    spec = family_for(config).read_spec(config)  # 8 experts, top-2
    executor = OffloadedExecutor(spec, torch.float32, "cpu", 8, "layer", DelayedCopyEngine())
    executor.planner.spare = 2  # what guesses copy into (a pool this small keeps none of its own)
    executor.window.depth = lambda precision: 8
    wrong = _Fixed([6, 7])
    executor.predictor = wrong
    x_TD = torch.zeros(1, spec.hidden_size)
    routing = Routing(torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))
    layer_steps = 40 * len(spec.moe_layer_ids)
    for _ in range(40):
        for layer in spec.moe_layer_ids:
            executor.run(layer, x_TD, routing)
    assert executor.precision < executor_module.PREDICTION_MIN_PRECISION
    assert wrong.calls < layer_steps / executor_module.PREDICTION_PROBE_EVERY + 12
    loads = executor.prefetch_loads
    assert loads <= 2 * 12  # only the first guesses, while the running precision fell below the bar
    # Right guesses of experts that are not resident (those decide): each step routes every layer
    # to the next of four pairs, and the guess for the next layer is that pair.
    right = _Fixed([0, 1])
    executor.predictor = right
    for step in range(40):
        pair = [2 * (step % 4), 2 * (step % 4) + 1]
        right.experts = pair
        for layer in spec.moe_layer_ids:
            executor.run(layer, x_TD, Routing(torch.tensor([pair]), torch.tensor([[0.5, 0.5]])))
    assert executor.precision >= executor_module.PREDICTION_MIN_PRECISION
    assert right.calls > layer_steps / 2  # predicting every layer step again
    assert executor.prefetch_used > loads  # and its copies are used


def test_guesses_copy_into_free_slots_only():
    """A guess never evicts a cached expert: it copies into free slots (the spare ones the planner keeps
    for the next step's first misses) and stops when there are none, however deep the window."""
    config = FAMILY_CONFIGS["qwen3_moe"]().to_dict() | {"architectures": ["Qwen3MoeForCausalLM"]}
    spec = family_for(config).read_spec(config)  # 8 experts, top-2
    executor = OffloadedExecutor(spec, torch.float32, "cpu", 6, "layer", DelayedCopyEngine())
    executor.window.depth = lambda precision: 8
    first, second = spec.moe_layer_ids[:2]
    executor._plan_and_copy(first, [0, 1, 2, 3])  # 4 of the 6 slots
    executor._prefetch_guess(first, [5, 4, 6], window=True)
    assert executor.prefetch_loads == 2  # the first choices first, into the 2 free slots
    assert {ExpertId(second, 5), ExpertId(second, 4)} <= executor.planner.slot_of.keys()
    cached = dict(executor.planner.slot_of)
    executor._prefetch_guess(first, [6, 7], window=True)
    assert executor.prefetch_loads == 2 and executor.planner.slot_of == cached
