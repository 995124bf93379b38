"""The default eviction policy ("layer", LayerAware) against the offloading bar: a hit rate at least
static pinning's on the same routing. Hand-worked sweeps, synthetic routing with wide and narrow
steps, and its fast victim choice against the full scan at every call the planner makes."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetier.moe.experts import ExpertId
from moetier.offload.cache import EvictionPolicy, LayerAware, make_policy
from moetier.offload.planner import SlotPlanner
from moetier.trace.simulate import access_events, simulate
from moetier.trace.synthetic import generate


def replay(policy: EvictionPolicy, slots: int, events: list[tuple[int, list[int]]]) -> list[int]:
    """Hits per (step, layer) event, rounds planned as the executor and the simulator plan them."""
    planner, hits = SlotPlanner(slots, policy), []
    for layer, needed in events:
        planner.access(layer, needed)
        remaining, found = needed, 0
        while remaining:
            round_hits, loads = planner.plan_round(layer, remaining)
            assert round_hits or loads, "every round makes progress"
            found += len(round_hits)
            done = set(round_hits) | {e for e, _, _ in loads}
            remaining = [e for e in remaining if e not in done]
        hits.append(found)
    return hits


def stepped(kind: str, layers: int, experts: int, top_k: int, widths: list[int], seed: int, **params):
    """A synthetic trace whose consecutive tokens are grouped into steps of the given widths."""
    trace = generate(kind, layers, experts, top_k, sum(widths), seed=seed, **params)
    return replace(trace, step=np.repeat(np.arange(len(widths)), widths).astype(np.int32))


def bench_like(prompt: int, decode: int, batch: int) -> list[int]:
    """`moetier bench`'s mix: prompts alone, batch-1 decode, a batch's prompts two per step, its decode."""
    return [prompt] * 3 + [1] * decode + [2 * prompt] * (batch // 2) + [batch] * decode


class CheckedLayerAware(LayerAware):
    """Asserts at every call that the heaps' answer is the full scan's."""

    def choose(self, resident, protected):
        found = super().choose(resident, protected)
        assert found == self.victim([e for experts in resident.values() for e in experts if e not in protected])
        return found


@settings(max_examples=150, deadline=None)
@given(layers=st.integers(1, 5), experts=st.integers(2, 8), data=st.data())
def test_wide_sweeps_keep_static_pinnings_hits(layers, experts, data):
    """Steps that need every expert of every layer (long prompts): the old policy evicted the layer
    behind for each of them, flushing the pool every sweep; this one never has fewer hits than
    static pinning."""
    top_k = data.draw(st.integers(1, experts), label="top_k")
    slots = data.draw(st.integers(1, layers * experts), label="slots")
    sweeps = data.draw(st.integers(1, 6), label="sweeps")
    events = [(layer, list(range(experts))) for _ in range(sweeps) for layer in range(layers)]

    def hits(name: str) -> int:
        return sum(replay(make_policy(name, slots, tuple(range(layers)), experts, top_k), slots, events))

    assert hits("layer") >= hits("static")


def test_a_layer_holding_top_k_slots_streams_through_its_own():
    """Two layers of four experts, top-1, four slots, every step needing all eight. Worked by hand:
    layer 0 fills the pool; layer 1 takes one slot (it held none) and streams the rest through it, so
    from the second sweep on layer 0 hits 3 and layer 1 hits the one it kept: 4 a sweep, where static
    pinning (three of layer 0 pinned, one slot streaming both layers' rest) hits 3."""
    events = [(layer, [0, 1, 2, 3]) for _ in range(5) for layer in (0, 1)]
    new = replay(make_policy("layer", 4, (0, 1), 4, top_k=1), 4, events)
    static = replay(make_policy("static", 4, (0, 1), 4, top_k=1), 4, events)
    assert new == [0, 0] + [3, 1] * 4
    assert static == [0, 0] + [3, 0] * 4


def test_marks_move_slots_to_the_layer_that_uses_them():
    """Two layers of eight experts, top-2, ten slots. A long prompt leaves layer 0 with eight slots
    and layer 1 with two; then every step uses expert 0 of layer 0 and experts 0-3 of layer 1. Layer 1
    holds top_k slots, so without marks it streams its four through its two for ever (2 hits a step:
    the two the last round left); with them, layer 0's unused experts are marked once layer 1's misses
    are used significantly more, and layer 1 takes their slots."""
    events = [(0, list(range(8))), (1, list(range(8)))] + [(0, [0]), (1, [0, 1, 2, 3])] * 40

    def last_hits(z: float) -> list[int]:
        return replay(LayerAware((0, 1), 2, z=z), 10, events)[-10:]

    assert last_hits(z=2.0) == [1, 4] * 5
    assert last_hits(z=float("inf")) == [1, 2] * 5


@pytest.mark.parametrize("kind, params", [("uniform", {}), ("lognormal", {"sigma": 1.0}), ("markov", {})])
@pytest.mark.parametrize("layers, experts, top_k, fraction", [(8, 16, 2, 0.25), (12, 64, 8, 0.1), (4, 32, 4, 0.5)])
def test_at_least_static_on_synthetic_routing_with_wide_and_narrow_steps(kind, params, layers, experts, top_k,
                                                                          fraction):
    slots = round(fraction * layers * experts)
    for seed in range(3):
        trace = stepped(kind, layers, experts, top_k, bench_like(64, 30, 8), seed, **params)
        events = access_events(trace)
        assert simulate(trace, "layer", slots, events)[0] >= simulate(trace, "static", slots, events)[0], seed


def test_a_prefetch_borrows_for_the_next_layer_up_to_top_k():
    """Three layers, top-2, six slots: layer 0 holds four, layers 1 and 2 one each. Layer 0's step
    hits all four; the executor then prefetches two guesses for layer 1 (never evicting layer 0's
    experts): layer 1 holds one slot, fewer than top_k, so the first guess takes the layer behind's
    (layer 2's) and the second finds layer 1 at top_k, and waits for its own step."""
    policy = CheckedLayerAware((0, 1, 2), 2)
    planner = SlotPlanner(6, policy)
    for layer, needed in [(0, [0, 1, 2, 3]), (1, [0]), (2, [0]), (0, [0, 1, 2, 3])]:
        planner.access(layer, needed)
        planner.plan_round(layer, needed)
    layer_0 = frozenset(ExpertId(0, e) for e in range(4))
    hits, loads = planner.plan_round(1, [1, 2], keep=layer_0)
    assert hits == [] and [(e, evicted) for e, _, evicted in loads] == [(1, ExpertId(2, 0))]


@settings(max_examples=100, deadline=None)
@given(layers=st.integers(1, 4), experts=st.integers(2, 8), data=st.data())
def test_fast_choice_is_the_full_scan_at_every_call(layers, experts, data):
    """Random routing skewed towards a few experts, steps from one token to many; z 0.5 marks often,
    half_life 0.05 rescales the counts every 17 sweeps."""
    top_k = data.draw(st.integers(1, experts), label="top_k")
    slots = data.draw(st.integers(1, layers * experts), label="slots")
    widths = data.draw(st.lists(st.integers(1, 12), min_size=20, max_size=40), label="widths")
    half_life = data.draw(st.sampled_from([16.0, 0.05]), label="half_life")
    z = data.draw(st.sampled_from([2.0, 0.5]), label="z")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    popularity = rng.dirichlet(np.full(experts, 0.3), size=layers)
    events = []
    for width in widths:
        for layer in range(layers):
            chosen = {int(e) for _ in range(width)
                      for e in rng.choice(experts, top_k, replace=False, p=popularity[layer])}
            events.append((layer, sorted(chosen)))
    replay(CheckedLayerAware(range(layers), top_k, half_life=half_life, z=z), slots, events)
