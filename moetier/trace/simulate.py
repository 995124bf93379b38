"""Replays a routing trace through the runtime's eviction policies (`moetier trace simulate`).

The policies are the objects of moetier.offload.cache, built by the same `make_policy` the
OffloadedExecutor uses, and slots are planned by the executor's own SlotPlanner (offload/planner.py):
- one pool of S slots shared by every MoE layer, S = round(fraction * layers * experts), at least 1;
- per (step, MoE layer) the needed experts are the distinct ids the step's tokens chose; the policy
  sees `access` for each of them (ascending) before any slot is planned;
- a needed expert already resident is a hit; each other one takes a free slot or the policy's victim
  among the resident experts this layer does not need (a hit or an expert just loaded is never
  evicted); if the policy returns no victim, the rest go to further rounds, as the executor's rounds
  do (SlotPlanner.plan_step): each at most half as wide as the first, planned beside the round before,
  whose loads it may not evict, or after it when nothing fits beside them;
- after each (step, layer) the policy's victims are evicted until SPARE_SLOTS slots are free (unless
  every expert fits), as the executor does (the next step's first misses copy before any planning);
  Belady's optimum keeps none.
Belady's optimum uses the same pool with an offline policy that evicts the candidate whose next use
is farthest in the future: when every (step, layer) needs at most S experts, no policy has fewer
misses. When some need more (large prefill steps with a small pool), the executor's rounds fix the
load order and Belady's rule is only a heuristic: its rows are then marked as not a bound. The
bound is over policies that always name a victim when there are candidates (LRU, LFU): a policy
that declines (StaticPinning when only pinned experts are evictable) splits a layer into rounds,
which can keep an expert that Belady, loading the layer in one round, must evict. StaticPinning
never declines while each layer step needs at most top_k experts (e.g. batch-1 decode).
"""

import itertools
import math
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, replace

import numpy as np

from moetier.moe.experts import ExpertId
from moetier.offload.cache import EvictionPolicy, make_policy
from moetier.offload.planner import SlotPlanner, spare_slots
from moetier.trace.format import DECODE, PREFILL, RoutingTrace

BELADY = "belady"


def access_events(trace: RoutingTrace) -> list[tuple[int, list[int]]]:
    """Per (step, MoE layer) in execution order: (layer, the distinct experts it needs, ascending)."""
    events = []
    if trace.num_tokens == 0:
        return events
    bounds = np.r_[0, np.flatnonzero(np.diff(trace.step)) + 1, trace.num_tokens]
    layers = trace.moe_layers.tolist()
    for lo, hi in itertools.pairwise(bounds.tolist()):
        for i, layer in enumerate(layers):
            events.append((layer, np.unique(trace.expert_ids[i, lo:hi]).tolist()))
    return events


class Belady(EvictionPolicy):
    """Belady's rule: evicts the candidate used again farthest in the future (never again first), the
    offline optimum for one expert per request. With a set of experts per layer step it is a strong
    reference, not a strict bound (the OLMoE donor at 10% cached: 0.081 against static pinning's
    0.088). Built from the whole access sequence; must see exactly its accesses, in order."""

    def __init__(self, events: list[tuple[int, list[int]]]):
        self.uses: dict[ExpertId, deque[int]] = {}
        for t, (layer, experts) in enumerate(events):
            for e in experts:
                self.uses.setdefault(ExpertId(layer, e), deque()).append(t)

    def access(self, expert: ExpertId) -> None:
        self.uses[expert].popleft()  # that use is now; the front is the next one

    def victim(self, candidates: Collection[ExpertId]) -> ExpertId | None:
        def next_use(e: ExpertId) -> tuple[float, ExpertId]:
            future = self.uses.get(e)
            return (future[0] if future else math.inf, e)
        return max(candidates, key=next_use, default=None)


def _replay(planner: SlotPlanner, events) -> tuple[int, int]:
    """(hits, misses) of the runtime's slot planning over the trace's per-layer step events."""
    hits = misses = 0
    for layer, needed in events:
        planner.access(layer, needed)
        for round_hits, loads in planner.plan_step(layer, needed):
            hits, misses = hits + len(round_hits), misses + len(loads)
        planner.end_step({ExpertId(layer, e) for e in needed})
    return hits, misses


@dataclass
class SimResult:
    policy: str
    cache_fraction: float
    num_slots: int
    hits: int
    misses: int
    miss_bytes_per_token: float
    bound: bool = True  # for belady: whether it is the optimum (no event needs more than num_slots)

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0


def slots_for(trace: RoutingTrace, fraction: float) -> int:
    return max(1, round(fraction * len(trace.moe_layers) * trace.num_experts))


def simulate(trace: RoutingTrace, policy: str, num_slots: int, events=None) -> tuple[int, int]:
    """(hits, misses) of `policy` (a make_policy name, or "belady") with a pool of num_slots."""
    events = access_events(trace) if events is None else events
    if policy == BELADY:
        chosen: EvictionPolicy = Belady(events)
    else:
        chosen = make_policy(policy, num_slots, tuple(trace.moe_layers.tolist()), trace.num_experts, trace.top_k)
    # The optimum keeps no slot spare (spares serve the host's timing, not the hit rate): it bounds those that do.
    spare = 0 if policy == BELADY else spare_slots(num_slots, len(trace.moe_layers) * trace.num_experts)
    return _replay(SlotPlanner(num_slots, chosen, spare), events)


def select_phase(trace: RoutingTrace, phase: str) -> RoutingTrace:
    """The trace's prefill or decode tokens only ("all": unchanged)."""
    if phase == "all":
        return trace
    keep = trace.phase == (PREFILL if phase == "prefill" else DECODE)
    fields = {k: getattr(trace, k)[keep] for k in ("seq_id", "position", "phase", "step")}
    return replace(trace, **fields, expert_ids=trace.expert_ids[:, keep], weights=trace.weights[:, keep])


def simulate_grid(trace: RoutingTrace, policies: list[str], fractions: list[float]) -> list[SimResult]:
    events = access_events(trace)
    widest = max((len(needed) for _, needed in events), default=0)
    results = []
    for fraction in fractions:
        slots = slots_for(trace, fraction)
        for policy in [*policies, BELADY]:
            hits, misses = simulate(trace, policy, slots, events)
            per_token = misses * trace.expert_bytes / trace.num_tokens if trace.num_tokens else 0.0
            results.append(SimResult(policy, fraction, slots, hits, misses, per_token, policy != BELADY or widest <= slots))
    return results


def results_markdown(trace: RoutingTrace, results: list[SimResult]) -> str:
    lines = [
        (f"Replay of {trace.num_tokens} tokens ({trace.model_id}; {len(trace.moe_layers)} MoE layers x "
         f"{trace.num_experts} experts, top-{trace.top_k}; {trace.expert_bytes} bytes per expert). "
         "Belady: evicts the expert used furthest ahead, the offline optimum when each request is one "
         "expert; with a set of experts per layer step it is a reference, not a strict bound."), "",
        "| cache fraction | slots | policy | hit rate | misses | miss MiB / token |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        name = r.policy if r.bound else f"{r.policy} (not a bound: a layer step needs > {r.num_slots} experts)"
        lines.append(f"| {r.cache_fraction:g} | {r.num_slots} | {name} | {r.hit_rate:.4f} | {r.misses} | "
                     f"{r.miss_bytes_per_token / 2**20:.4f} |")
    return "\n".join(lines) + "\n"
