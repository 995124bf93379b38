"""Eviction policies: which resident expert gives up its GPU slot.

One small interface, driven by the runtime (OffloadedExecutor) and by the routing-trace simulator: `access` records that an expert was used; `victim` picks one of the evictable experts
(the caller never offers an expert the current layer needs), or None if the policy will evict none
of them. Policies see expert ids only, never slots or tensors.

The SlotPlanner asks through `choose(resident, protected)`, with the resident experts by layer: the
same answer as `victim` over every resident expert not protected, which costs a pass over all slots
per miss (too slow in Python for pools of a thousand slots), so the layer-aware and static policies
answer it from a layer's or the streaming slots' experts alone. `loaded` / `evicted` tell a policy
which experts hold slots.
"""

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping

from moetier.moe.experts import ExpertId

Resident = Mapping[int, Collection[ExpertId]]  # layer -> its experts that hold slots


class EvictionPolicy(ABC):
    @abstractmethod
    def access(self, expert: ExpertId) -> None: ...

    @abstractmethod
    def victim(self, candidates: Collection[ExpertId]) -> ExpertId | None: ...

    def choose(self, resident: Resident, protected: Collection[ExpertId]) -> ExpertId | None:
        """victim() over the resident experts that are not protected."""
        return self.victim([e for experts in resident.values() for e in experts if e not in protected])

    def loaded(self, expert: ExpertId) -> None:
        """`expert` now holds a slot."""

    def evicted(self, expert: ExpertId) -> None:
        """`expert` gave up its slot."""


def least_recent(heap: list[tuple], resident: Collection[ExpertId], last_use: Mapping[ExpertId, int],
                 protected: Collection[ExpertId]) -> ExpertId | None:
    """The top of a lazy heap of (last use, ..., expert) entries that is resident, used last at that
    entry's time and not protected: stale entries (evicted since, or used again later) are dropped,
    protected ones set aside and put back."""
    skipped, found = [], None
    while heap:
        entry = heap[0]
        use, expert = entry[0], entry[-1]
        if expert not in resident or use != last_use.get(expert, 0):
            heapq.heappop(heap)
        elif expert in protected:
            skipped.append(heapq.heappop(heap))
        else:
            found = expert
            break
    for entry in skipped:
        heapq.heappush(heap, entry)
    return found


class LRU(EvictionPolicy):
    """Evicts the candidate used least recently (never-used first, then by id). `choose` keeps a heap
    of (last use, expert) with stale entries dropped as they surface, so a miss costs a few heap
    operations rather than a pass over every slot."""

    def __init__(self):
        self._clock = itertools.count(1)
        self.last_use: dict[ExpertId, int] = {}
        self._resident: set[ExpertId] = set()
        self._heap: list[tuple[int, ExpertId]] = []

    def access(self, expert: ExpertId) -> None:
        self.last_use[expert] = next(self._clock)
        if expert in self._resident:
            heapq.heappush(self._heap, (self.last_use[expert], expert))

    def victim(self, candidates: Collection[ExpertId]) -> ExpertId | None:
        return min(candidates, key=lambda e: (self.last_use.get(e, 0), e), default=None)

    def loaded(self, expert: ExpertId) -> None:
        self._resident.add(expert)
        heapq.heappush(self._heap, (self.last_use.get(expert, 0), expert))

    def evicted(self, expert: ExpertId) -> None:
        self._resident.discard(expert)  # its heap entries go stale

    def choose(self, resident: Resident, protected: Collection[ExpertId]) -> ExpertId | None:
        return least_recent(self._heap, self._resident, self.last_use, protected)


class LFU(EvictionPolicy):
    """Evicts the candidate used least often over the whole run (ties: least recently used)."""

    def __init__(self):
        self.lru = LRU()
        self.uses: Counter[ExpertId] = Counter()

    def access(self, expert: ExpertId) -> None:
        self.uses[expert] += 1
        self.lru.access(expert)

    def victim(self, candidates: Collection[ExpertId]) -> ExpertId | None:
        return min(candidates, key=lambda e: (self.uses[e], self.lru.last_use.get(e, 0), e), default=None)


class StaticPinning(EvictionPolicy):
    """A fixed set of experts is never evicted once loaded; the others stream through the remaining
    slots by LRU. The pinned set must leave at least one slot for streaming."""

    def __init__(self, pinned: Iterable[ExpertId]):
        self.pinned = frozenset(pinned)
        self.lru = LRU()
        self.streaming: set[ExpertId] = set()  # resident experts that are not pinned

    def access(self, expert: ExpertId) -> None:
        self.lru.access(expert)

    def victim(self, candidates: Collection[ExpertId]) -> ExpertId | None:
        return self.lru.victim([e for e in candidates if e not in self.pinned])

    def choose(self, resident: Resident, protected: Collection[ExpertId]) -> ExpertId | None:
        return self.lru.victim([e for e in self.streaming if e not in protected])

    def loaded(self, expert: ExpertId) -> None:
        if expert not in self.pinned:
            self.streaming.add(expert)

    def evicted(self, expert: ExpertId) -> None:
        self.streaming.discard(expert)


class LayerAware(EvictionPolicy):
    """For layer sweeps, where every token visits the MoE layers in order: evicts the candidate whose
    layer comes round again last (the layers just behind the current one, the current layer's own
    unneeded experts first), the least recently used within a layer. LRU keeps exactly the wrong
    experts when the pool holds less than one sweep's worth: the ones used longest ago are needed next.

    `choose` keeps a heap per layer of (last use, -expert, expert), stale entries dropped as they
    surface (as LRU does), so a miss costs a few heap operations in the first layer with a candidate
    rather than a pass over that layer's slots (benchmarks/planner_speed.py: 9.3 -> 4.4 us per needed
    expert on the OLMoE donor in 69 slots)."""

    def __init__(self, moe_layers: Iterable[int]):
        self.layers = tuple(moe_layers)
        self.position = {layer: i for i, layer in enumerate(self.layers)}
        self.current: int | None = None
        self.lru = LRU()  # the clock and last uses only: its own heap stays empty (no `loaded` calls)
        self._resident: set[ExpertId] = set()
        self._heaps: dict[int, list[tuple[int, int, ExpertId]]] = {layer: [] for layer in self.layers}
        self._resident_in: Counter[int] = Counter()  # layer -> its resident experts

    def access(self, expert: ExpertId) -> None:
        self.current = self.position[expert.layer]
        self.lru.access(expert)
        if expert in self._resident:
            self._push(expert)

    def loaded(self, expert: ExpertId) -> None:
        self._resident.add(expert)
        self._resident_in[expert.layer] += 1
        self._push(expert)

    def evicted(self, expert: ExpertId) -> None:
        self._resident.discard(expert)  # its heap entries go stale
        self._resident_in[expert.layer] -= 1

    def _push(self, expert: ExpertId) -> None:
        heap = self._heaps[expert.layer]
        heapq.heappush(heap, (self.lru.last_use.get(expert, 0), -expert.expert, expert))
        if len(heap) > 4 * self._resident_in[expert.layer] + 16:  # hits alone never pop: compact
            heap[:] = [(use, neg, e) for use, neg, e in heap
                       if e in self._resident and use == self.lru.last_use.get(e, 0)]
            heapq.heapify(heap)

    def victim(self, candidates: Collection[ExpertId]) -> ExpertId | None:
        if self.current is None:
            return self.lru.victim(candidates)
        num_layers = len(self.position)

        def layers_until_needed(e: ExpertId) -> int:  # 0: the next layer of the sweep
            return (self.position[e.layer] - self.current - 1) % num_layers

        return max(candidates, key=lambda e: (layers_until_needed(e), -self.lru.last_use.get(e, 0), e), default=None)

    def choose(self, resident: Resident, protected: Collection[ExpertId]) -> ExpertId | None:
        """The layers in victim order, each one's heap alone: the first layer with a candidate has it."""
        if self.current is None:
            return super().choose(resident, protected)
        layers, last_use = self.layers, self.lru.last_use
        # The current layer first (needed again last): its experts are mostly this step's, protected,
        # so a plain pass over them beats popping and re-pushing each from its heap on every miss.
        own = [e for e in resident.get(layers[self.current], ()) if e not in protected]
        if own:
            return min(own, key=lambda e: (last_use.get(e, 0), -e.expert))
        num_layers = len(layers)
        for back in range(1, num_layers):  # then the ones behind it
            heap = self._heaps[layers[(self.current - back) % num_layers]]
            found = least_recent(heap, self._resident, last_use, protected)
            if found is not None:
                return found
        return None


def first_experts(moe_layers: Iterable[int], num_experts: int, count: int) -> list[ExpertId]:
    """The first `count` experts in (layer, expert) order."""
    every = (ExpertId(layer, e) for layer in moe_layers for e in range(num_experts))
    return list(itertools.islice(every, max(0, count)))


def make_policy(name: str, num_slots: int, moe_layers: tuple[int, ...], num_experts: int, top_k: int) -> EvictionPolicy:
    """By name; `static` pins the first num_slots - top_k experts, leaving top_k slots to stream."""
    makers: dict[str, Callable[[], EvictionPolicy]] = {
        "lru": LRU,
        "lfu": LFU,
        "static": lambda: StaticPinning(first_experts(moe_layers, num_experts, num_slots - top_k)),
        "layer": lambda: LayerAware(moe_layers),
    }
    return makers[name]()


POLICY_NAMES = ("lru", "lfu", "static", "layer")
