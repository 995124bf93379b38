"""Routing traces: recording (never changes outputs), the .npz format, hand-worked analysis, and the
simulator (the runtime's policies; LRU against a reference; Belady as the bound)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moetier.errors import MoetierError
from moetier.llm import LLM
from moetier.offload.planner import spare_slots
from moetier.sampling_params import SamplingParams
from moetier.trace.analyze import analyze, summary_markdown, write_report
from moetier.trace.format import RoutingTrace, load_trace
from moetier.trace.record import record, text_windows
from moetier.trace.recorder import attach_recorder
from moetier.trace.simulate import BELADY, access_events, simulate, simulate_grid


def make_trace(ids_LNK, seq_id, position, step=None, phase=None, num_experts=4, expert_bytes=100) -> RoutingTrace:
    ids = np.asarray(ids_LNK, dtype=np.uint8)
    n = ids.shape[1]
    return RoutingTrace(
        model_id="hand", num_layers=ids.shape[0], moe_layers=np.arange(ids.shape[0], dtype=np.int32),
        num_experts=num_experts, top_k=ids.shape[2], expert_bytes=expert_bytes,
        seq_id=np.asarray(seq_id, np.int32), position=np.asarray(position, np.int32),
        phase=np.asarray(phase if phase is not None else [0] * n, np.uint8),
        step=np.asarray(step if step is not None else range(n), np.int32),
        expert_ids=ids, weights=np.ones(ids.shape, np.float16),
    ).validate()


# --- recording ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm():
    return LLM(None)


def test_recording_changes_no_logits_and_attributes_tokens(llm):
    ids = llm.engine.require_tokenizer().encode("def add(a, b):\n    return a + b\n" * 4, add_special_tokens=False)
    prompts = [ids[:20], ids[5:17]]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    before_logits = llm.score(ids[:40])
    before_tokens = [o.token_ids for o in llm.generate(prompts, params)]
    recorder = attach_recorder(llm.engine)
    assert torch.equal(llm.score(ids[:40]), before_logits)
    assert recorder.num_tokens == 40
    assert [o.token_ids for o in llm.generate(prompts, params)] == before_tokens
    trace = recorder.trace("tiny", llm.engine.source.spec.num_layers).validate()
    spec = llm.engine.source.spec
    assert trace.expert_ids.shape == (len(spec.moe_layer_ids), 40 + 20 + 12 + 2 * 3, spec.moe.top_k)
    gen = slice(40, None)  # the generate call: two prefills, then 3 batched decode steps
    for seq, prompt_len in ((1, 20), (2, 12)):
        mine = trace.seq_id[gen] == seq
        assert trace.position[gen][mine].tolist() == list(range(prompt_len + 3))
        assert trace.phase[gen][mine].tolist() == [0] * prompt_len + [1] * 3
    assert np.all(np.diff(trace.step) >= 0)
    # Weights are the router's: each token's k weights sum to 1 (norm_topk), stored in fp16.
    np.testing.assert_allclose(trace.weights.astype(np.float32).sum(-1), 1.0, atol=1e-2)
    for layer in llm.engine.runner.model.modules():  # leave the shared engine unobserved
        if hasattr(layer, "observer"):
            layer.observer = None
    llm.engine.runner.recorder = None


def test_record_text_windows(llm):
    assert text_windows(list(range(10)), 4, 9) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    ids = llm.engine.require_tokenizer().encode("import os\nprint(os.getcwd())\n" * 10, add_special_tokens=False)
    trace = record(llm, text_windows(ids, 16, 48), generate=2)
    assert trace.num_tokens == 48 + 3 * 2 and int(trace.phase.sum()) == 6
    for layer in llm.engine.runner.model.modules():
        if hasattr(layer, "observer"):
            layer.observer = None
    llm.engine.runner.recorder = None


# --- format -------------------------------------------------------------------------------------

def test_save_load_roundtrip_and_errors(tmp_path):
    trace = make_trace([[[0], [3]], [[1], [2]]], [0, 0], [0, 1], phase=[0, 1])
    trace.save(tmp_path / "t.npz")
    back = load_trace(tmp_path / "t.npz")
    for key in ("seq_id", "position", "phase", "step", "expert_ids", "weights", "moe_layers"):
        np.testing.assert_array_equal(getattr(back, key), getattr(trace, key))
        assert getattr(back, key).dtype == getattr(trace, key).dtype
    assert (back.model_id, back.num_experts, back.top_k, back.expert_bytes) == ("hand", 4, 1, 100)

    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(MoetierError, match="not a readable"):
        load_trace(tmp_path / "junk.npz")
    with pytest.raises(MoetierError, match="no such file"):
        load_trace(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(MoetierError, match="not a moetier routing trace"):
        load_trace(tmp_path / "other.npz")
    with np.load(tmp_path / "t.npz") as z:
        arrays = dict(z)
    bad = dict(arrays, expert_ids=np.full_like(arrays["expert_ids"], 7))
    np.savez(tmp_path / "range.npz", **bad)
    with pytest.raises(MoetierError, match=r"expert ids must lie in \[0, 4\)"):
        load_trace(tmp_path / "range.npz")
    np.savez(tmp_path / "dtype.npz", **dict(arrays, weights=arrays["weights"].astype(np.float32)))
    with pytest.raises(MoetierError, match="weights must be float16"):
        load_trace(tmp_path / "dtype.npz")
    np.savez(tmp_path / "missing_key.npz", **{k: v for k, v in arrays.items() if k != "phase"})
    with pytest.raises(MoetierError, match="missing phase"):
        load_trace(tmp_path / "missing_key.npz")


# --- analysis: hand-worked ----------------------------------------------------------------------

def hand_trace() -> RoutingTrace:
    """Sequence 0: layer-0 experts 0,1,0,0,2 and layer-1 experts 1,2,1,1,3 at positions 0..4;
    sequence 1: layer 0: 1,3 and layer 1: 0,0. Stored interleaved, as a batched run would."""
    order = [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (0, 3), (0, 4)]  # (seq, position)
    l0 = {0: [0, 1, 0, 0, 2], 1: [1, 3]}
    l1 = {0: [1, 2, 1, 1, 3], 1: [0, 0]}
    ids = [[[l0[s][p]] for s, p in order], [[l1[s][p]] for s, p in order]]
    return make_trace(ids, [s for s, _ in order], [p for _, p in order])


def test_popularity_locality_affinity_hand_worked():
    stats = analyze(hand_trace())
    s0 = stats.layers[0]
    # Counts 3, 2, 1, 1 of 7 assignments.
    np.testing.assert_allclose(s0.load_E, [3 / 7, 2 / 7, 1 / 7, 1 / 7])
    want_entropy = -(3 / 7 * math.log2(3 / 7) + 2 / 7 * math.log2(2 / 7) + 2 / 7 * math.log2(1 / 7))
    assert s0.entropy_bits == pytest.approx(want_entropy)
    assert s0.max_over_mean == pytest.approx(3 / (7 / 4))
    # Seq 0: (t0, e0) next at t2 (d=2); (t2, e0) next at t3 (d=1); the others never again
    # (e1 of seq 0 is not continued by seq 1's e1). w=1: pairs with >= 1 later token: seq 0 t0..t3
    # and seq 1 t0; only (t2, e0) reused -> 1/5. w=4: only seq 0 t0 qualifies, reused -> 1.
    assert s0.reuse_within[1] == pytest.approx(1 / 5)
    assert s0.reuse_within[4] == pytest.approx(1.0)
    assert math.isnan(s0.reuse_within[16])
    assert s0.mean_reuse_distance == pytest.approx(1.5)
    # Pairs (a at 0, b at 1): (0,1) x3, (1,2), (2,3), (1,0), (3,0).
    want = np.zeros((4, 4))
    want[0, 1] = 1.0
    want[1, 2] = want[1, 0] = 0.5
    want[2, 3] = want[3, 0] = 1.0
    np.testing.assert_allclose(stats.affinity[0], want)
    # Top-1 mass weighted by layer-0 load 3,2,1,1: (3*1 + 2*0.5 + 1 + 1) / 7.
    assert stats.affinity_mass[0][1] == pytest.approx(6 / 7)
    assert stats.affinity_mass[0][4] == pytest.approx(1.0)


def test_affinity_rows_with_top2():
    # One token, layer 0 chooses {0, 1}, layer 1 chooses {2, 3}: P(b | a) = 1/2 for b in {2, 3}.
    stats = analyze(make_trace([[[0, 1]], [[2, 3]]], [0], [0]))
    np.testing.assert_allclose(stats.affinity[0][:2], [[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]])
    assert stats.affinity_mass[0][1] == pytest.approx(0.5)


def test_next_layer_prediction_held_out():
    # Four sequences; layer 1 always takes layer 0's expert + 1: fitted on sequences 0-1, it names
    # every expert of sequences 2-3.
    first = [0, 1, 2, 3, 1, 2, 3, 0]
    cycle = make_trace([[[e] for e in first], [[(e + 1) % 4] for e in first]], [0, 0, 1, 1, 2, 2, 3, 3], [0, 1] * 4)
    assert analyze(cycle).predicted == [1.0]
    # Top-2: fitted on {0,1} -> {2,3}, so a held-out {0,1} is predicted {2,3}; it took {2,0}: half right.
    half = make_trace([[[0, 1], [0, 1]], [[2, 3], [2, 0]]], [0, 1], [0, 0])
    stats = analyze(half)
    assert stats.predicted == [0.5]
    assert "| 0 -> 1 | 0.500 | 1.000 | 0.500 |" in summary_markdown(half, stats)
    assert math.isnan(analyze(make_trace([[[0]], [[1]]], [0], [0])).predicted[0])  # one sequence: no held-out


def test_coactivation_clusters_hand_worked():
    # Tokens choose {0,1}, {0,1}, {2,3}, {2,3}, {0,2}: pairs 0-1 twice, 2-3 twice, 0-2 once.
    trace = make_trace([[[0, 1], [0, 1], [2, 3], [2, 3], [0, 2]]], [0] * 5, range(5))
    stats = analyze(trace)
    # P(partner | a): 0 -> 1 (2/3), 1 -> 0 (1), 2 -> 3 (2/3), 3 -> 2 (1); weighted by 3, 2, 3, 2 of 10.
    assert stats.partner_share[0] == pytest.approx(0.8)
    groups = stats.clusters[0]  # 2 groups for 4 experts
    assert groups.labels_E[0] == groups.labels_E[1] != groups.labels_E[2] == groups.labels_E[3]
    assert groups.within_share == pytest.approx(4 / 5) and groups.random_share == pytest.approx(4 / 12)
    assert "| 0 | 0.800 | 0.800 | 0.333 | 2, 2 |" in summary_markdown(trace, stats)
    top1 = analyze(hand_trace())
    assert top1.clusters == [None, None] and all(math.isnan(m) for m in top1.partner_share)


def test_write_report(tmp_path):
    paths = write_report(hand_trace(), tmp_path / "report")
    assert [p.name for p in paths] == ["summary.md", "popularity.png", "locality.png", "affinity.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert "| 0 -> 1 | 0.857 | 1.000 |" in paths[0].read_text()


# --- simulation ---------------------------------------------------------------------------------

def reference_lru(trace: RoutingTrace, slots: int) -> tuple[int, int]:
    """Plain LRU stack, least recent first; a layer's needed experts are never evicted for it and
    become the most recent, in ascending id order; after each layer step the least recent others
    leave until the planner's spare slots are free."""
    keep = slots - spare_slots(slots, len(trace.moe_layers) * trace.num_experts)
    stack, hits, misses = [], 0, 0
    for layer, needed in access_events(trace):
        keys = [(layer, e) for e in needed]
        for key in keys:
            if key in stack:
                hits += 1
            else:
                misses += 1
                if len(stack) == slots:
                    stack.remove(next(k for k in stack if k not in keys))
                stack.append(key)
        stack = [k for k in stack if k not in keys] + keys
        while len(stack) > keep and stack[0] not in keys:
            stack.pop(0)
    return hits, misses


@st.composite
def random_traces(draw):
    layers, experts = draw(st.integers(1, 3)), draw(st.integers(2, 8))
    top_k = draw(st.integers(1, min(3, experts)))
    n = draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    skew = rng.dirichlet(np.full(experts, 0.5))
    ids = np.stack([[rng.choice(experts, top_k, replace=False, p=skew) for _ in range(n)] for _ in range(layers)])
    step = np.sort(rng.integers(0, max(1, n // 2), n))
    trace = make_trace(ids, np.zeros(n), np.arange(n), step=step, num_experts=experts)
    widest = max(len(needed) for _, needed in access_events(trace))
    slots = draw(st.integers(widest, layers * experts))
    return trace, slots


@settings(max_examples=150, deadline=None)
@given(random_traces())
def test_simulated_lru_equals_reference(case):
    trace, slots = case
    assert simulate(trace, "lru", slots) == reference_lru(trace, slots)


@settings(max_examples=150, deadline=None)
@given(random_traces())
def test_belady_bounds_every_policy(case):
    trace, slots = case
    best_hits, best_misses = simulate(trace, BELADY, slots)
    widest = max(len(needed) for _, needed in access_events(trace))
    # StaticPinning may decline to evict (only pinned candidates), which splits a layer into rounds:
    # a different, less constrained game; with at most top_k experts per layer step it never declines.
    for policy in ("lru", "lfu", "static") if widest <= trace.top_k else ("lru", "lfu"):
        hits, misses = simulate(trace, policy, slots)
        assert hits + misses == best_hits + best_misses
        assert best_hits >= hits, policy


def test_simulation_hand_worked():
    # One layer, 3 experts, 2 slots, one token per step: 0, 1, 2, 0, 1.
    trace = make_trace([[[0], [1], [2], [0], [1]]], [0] * 5, range(5), num_experts=3)
    assert simulate(trace, "lru", 2) == (0, 5)  # the cyclic pattern defeats LRU
    assert simulate(trace, BELADY, 2) == (1, 4)  # at 2, evict 1 (next use 4) and keep 0 (next use 3)
    assert simulate(trace, "static", 2) == (1, 4)  # 2 slots - top-1: expert 0 pinned; 1, 2 stream
    [lru, lfu, belady] = [r for r in simulate_grid(trace, ["lru", "lfu"], [0.7]) if r.num_slots == 2]
    assert (lru.policy, lfu.policy, belady.policy) == ("lru", "lfu", "belady") and belady.bound
    assert lru.miss_bytes_per_token == pytest.approx(5 * 100 / 5)


def test_cli_trace_end_to_end(tmp_path, capsys):
    from moetier.cli import main

    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 20)
    out = tmp_path / "t.npz"
    assert main(["trace", "record", "--text", str(text), "--max-tokens", "64", "--window", "32",
                 "--generate", "2", "--out", str(out)]) == 0
    assert load_trace(out).num_tokens == 64 + 2 * 2
    assert main(["trace", "analyze", str(out), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "summary.md").exists()
    assert main(["trace", "simulate", str(out), "--cache-fraction", "0.25,0.5", "--policy", "lru,static"]) == 0
    table = capsys.readouterr().out
    assert "| 0.25 | 64 | lru |" in table and "belady" in table
    assert main(["trace", "simulate", str(out), "--policy", "fifo"]) == 2
