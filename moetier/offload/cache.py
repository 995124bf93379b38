"""Eviction policies: which resident expert gives up its GPU slot.

One small interface, driven by the runtime (OffloadedExecutor) and by the routing-trace simulator: `access` records that an expert was used; `victim` picks one of the evictable experts
(the caller never offers an expert the current layer needs), or None if the policy will evict none
of them. Policies see expert ids only, never slots or tensors.

The SlotPlanner asks through `choose(resident, protected)`, with the resident experts by layer: the
same answer as `victim` over every resident expert not protected, which costs a pass over all slots
per miss (too slow in Python for pools of a thousand slots), so the layer-aware policy answers it
from heaps and static pinning from its streaming slots alone. `loaded` / `evicted` tell a policy
which experts hold slots.
"""

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping

from moetier.moe.experts import EXPERT_IDS, ExpertId

Resident = Mapping[int, Collection[ExpertId]]  # layer -> its experts that hold slots
_UNUSED = (0.0, -1, 0, None, 0.0)  # LayerAware's use record of an expert not used yet


class EvictionPolicy(ABC):
    @abstractmethod
    def access(self, expert: ExpertId) -> None: ...

    def access_step(self, layer: int, experts: list[int]) -> None:
        """access() for each of a layer step's experts, in order."""
        ids = EXPERT_IDS[layer]
        for e in experts:
            self.access(ids[e])

    @abstractmethod
    def victim(self, candidates: Collection[ExpertId]) -> ExpertId | None: ...

    def choose(self, resident: Resident, protected: Collection[ExpertId]) -> ExpertId | None:
        """victim() over the resident experts that are not protected."""
        return self.victim([e for experts in resident.values() for e in experts if e not in protected])

    def loaded(self, expert: ExpertId) -> None:
        """`expert` now holds a slot."""

    def evicted(self, expert: ExpertId) -> None:
        """`expert` gave up its slot."""


def lazy_heap_top(heap: list[tuple], current: Callable[[tuple], tuple | None], expert_at: int,
                  protected: Collection[ExpertId]) -> ExpertId | None:
    """The expert of the least valid entry of a lazy heap, not protected. `current(entry)` is the
    entry that stands for its expert now: the entry itself while valid, a re-keyed one, or None when
    it is stale; stale entries are dropped or replaced as they surface, protected ones set aside
    and put back. The expert sits at index `expert_at` of an entry."""
    skipped, found = [], None
    while heap:
        entry = heap[0]
        now = current(entry)
        if now is None:
            heapq.heappop(heap)
        elif now is not entry:
            heapq.heapreplace(heap, now)
        elif entry[expert_at] in protected:
            skipped.append(heapq.heappop(heap))
        else:
            found = entry[expert_at]
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
        # an entry (last use, expert) is stale once its expert left or was used again
        def current(entry: tuple) -> tuple | None:
            use, expert = entry
            return entry if expert in self._resident and use == self.last_use.get(expert, 0) else None

        return lazy_heap_top(self._heap, current, -1, protected)


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
    """For layer sweeps, where every token visits the MoE layers in order. A layer step's misses take
    slots, in this order: from the layer's own experts it does not need, from experts marked as weak
    (below), then from the layers just behind it (needed again last), but from those only while the
    layer holds fewer than `borrow` (= top_k) slots. Otherwise the policy declines: the planner ends
    the round and the next one streams the rest of the layer through the slots this one used. Loads
    after the step's own (the executor prefetching the next layer) take slots in the same order, the
    next layer's slots counted against `borrow`.
    Within a layer the least used expert goes first: a count of uses decayed by half every
    `half_life` sweeps (ties: the one used longest ago, then the highest id).

    Why: a wide step (a long prefill, a large batch) needs most of every layer. Evicting the layers
    behind for it flushes the pool every sweep (each layer evicts the previous one's experts), while
    static pinning keeps S - top_k experts through the sweep and streams the rest through top_k
    slots. Here a layer holding top_k slots streams through its own, so the others keep theirs, and
    only layers holding fewer take any; in narrow steps (decode) each layer keeps its most used
    experts, and no slot is set aside for streaming.
    Marks move slots to where routing is skewed: a miss marks the least used resident expert of
    another layer if that was used significantly less (decayed counts, one-sided z-test with z = `z`,
    this sweep's uses left out so that the layers before and after the current one compare fairly).
    Under uniform routing marks are rare and the layout of slots over layers stays put.

    `choose` answers from heaps (per layer, of marked experts, of the least used resident experts),
    stale entries re-keyed or dropped as they surface, so a miss costs a few heap operations."""

    def __init__(self, moe_layers: Iterable[int], borrow: int, half_life: float = 16.0, z: float = 2.0):
        self.layers = tuple(moe_layers)
        self.position = {layer: i for i, layer in enumerate(self.layers)}
        self.borrow = max(1, borrow)  # at least one, or a layer with no slots could never load
        self.current: int | None = None  # position of the layer step in progress
        self._last: tuple[int, int] | None = None  # (position, expert) of the last access
        self._pending = 0  # misses of the current layer step not loaded yet
        self.sweep = 0  # counted when the accesses go back to an earlier (position, expert)
        self._growth = 2 ** (1 / half_life)
        self._weight = 1.0  # growth ** sweep: a use now weighs this much (old ones decay relatively)
        self._z2 = z * z
        # expert -> (decayed count of uses, sweep of the last, -expert, expert, sum of squared weights):
        # ordered as the eviction order within a layer (least used, then used longest ago, then the
        # highest id, so that of the experts a wide step streams through the first ones stay, as
        # static pinning's do), and itself the heap entry (replaced, never changed, by a use).
        self.uses: dict[ExpertId, tuple[float, int, int, ExpertId, float]] = {}
        self._resident: set[ExpertId] = set()
        self._resident_in: dict[int, set[ExpertId]] = {layer: set() for layer in self.layers}
        self.marked: set[ExpertId] = set()  # resident experts any layer's misses may take
        self._heaps: dict[int, list[tuple]] = {layer: [] for layer in self.layers}  # use records
        self._marked_heap: list[tuple] = []  # use records
        self._weakest: list[tuple[float, ExpertId]] = []  # (prior count, expert): resident, unmarked

    def _prior(self, expert: ExpertId) -> tuple[float, float]:
        """The decayed count and its sum of squared weights without this sweep's use."""
        count, sweep, _, _, squares = self.uses[expert]
        if sweep == self.sweep:
            return count - self._weight, squares - self._weight ** 2
        return count, squares

    def _prior_count(self, expert: ExpertId) -> float:
        count, sweep = self.uses[expert][:2]
        return count - self._weight if sweep == self.sweep else count

    def access(self, expert: ExpertId) -> None:
        self.access_step(expert.layer, [expert.expert])

    def access_step(self, layer: int, experts: list[int]) -> None:
        # one loop over the step's experts, the lookups hoisted: the runtime's policy work per needed expert
        ids, position = EXPERT_IDS[layer], self.position[layer]
        uses, marked, resident = self.uses, self.marked, self._resident
        for e in experts:
            expert, at, last = ids[e], (position, e), self._last
            if last is None or position != last[0] or at <= last:  # a new layer step
                self._pending = 0
                if last is not None and at <= last:
                    self.sweep += 1
                    self._weight *= self._growth
                    if self._weight > 1e100:
                        self._rescale()
                        uses = self.uses
            self._last = at
            count, _, _, _, squares = uses.get(expert, _UNUSED)
            w = self._weight
            uses[expert] = (count + w, self.sweep, -e, expert, squares + w * w)
            if expert in marked:  # used after all: an ordinary resident again
                marked.discard(expert)
                self._push_weakest(expert)
            elif expert not in resident:  # a miss (a resident's heap entry is re-keyed when it surfaces)
                self._pending += 1
                self._mark_against(expert)
        if experts:
            self.current = position

    def _mark_against(self, miss: ExpertId) -> None:
        """Marks the least used resident expert (by prior count) if `miss` was used significantly more.
        Only the heap's top is tried: when it belongs to the miss's own layer nothing is marked (the
        layer's own unneeded experts go first anyway)."""
        count, squares = self._prior(miss)
        if count * count <= self._z2 * squares:  # not significant even against an expert never used
            return
        heap = self._weakest
        while heap:
            prior, expert = heap[0]
            if expert not in self._resident or expert in self.marked:
                heapq.heappop(heap)
            elif prior != self._prior_count(expert):  # used since: re-keyed (counts only grow)
                heapq.heapreplace(heap, (self._prior_count(expert), expert))
            else:
                break
        if not heap or heap[0][1].layer == miss.layer:
            return
        weak = heap[0][1]
        weak_count, weak_squares = self._prior(weak)
        excess = count - weak_count
        if excess > 0 and excess * excess > self._z2 * (squares + weak_squares):
            heapq.heappop(heap)
            self.marked.add(weak)
            heapq.heappush(self._marked_heap, self.uses[weak])
            if len(self._marked_heap) > 4 * len(self.marked) + 16:
                self._rebuild(self._marked_heap, self._marked_entries())

    def _rescale(self) -> None:
        """Keeps the weights finite: every count divided by the current weight, the heaps rebuilt."""
        w = self._weight
        self.uses = {e: (count / w, sweep, neg, e, squares / (w * w))
                     for e, (count, sweep, neg, _, squares) in self.uses.items()}
        self._weight = 1.0
        for layer in self.layers:
            self._rebuild(self._heaps[layer], self._layer_entries(layer))
        self._rebuild(self._marked_heap, self._marked_entries())
        self._rebuild(self._weakest, self._weakest_entries())

    # Each heap holds an entry per member, keyed as when pushed (keys only grow, so a stale one is
    # re-keyed when it surfaces), and evicted experts' entries: grown past four entries per member
    # (an expert evicted and loaded again many times before its entry surfaces), it is rebuilt.
    def _layer_entries(self, layer: int) -> list[tuple]:
        return [self.uses[e] for e in self._resident_in[layer]]

    def _marked_entries(self) -> list[tuple]:
        return [self.uses[e] for e in self.marked]

    def _weakest_entries(self) -> list[tuple]:
        return [(self._prior_count(e), e) for e in self._resident if e not in self.marked]

    @staticmethod
    def _rebuild(heap: list[tuple], entries: list[tuple]) -> None:
        heap[:] = entries
        heapq.heapify(heap)

    def loaded(self, expert: ExpertId) -> None:
        layer = expert.layer
        if self._pending and self.position[layer] == self.current:
            self._pending -= 1
        self._resident.add(expert)
        members = self._resident_in[layer]
        members.add(expert)
        record = self.uses.get(expert)
        if record is None:  # prefetched, not used yet
            record = self.uses[expert] = (0.0, -1, -expert.expert, expert, 0.0)
        heap = self._heaps[layer]
        heapq.heappush(heap, record)
        if len(heap) > 4 * len(members) + 16:
            self._rebuild(heap, self._layer_entries(layer))
        self._push_weakest(expert)

    def _push_weakest(self, expert: ExpertId) -> None:
        heapq.heappush(self._weakest, (self._prior_count(expert), expert))
        if len(self._weakest) > 4 * len(self._resident) + 16:
            self._rebuild(self._weakest, self._weakest_entries())

    def evicted(self, expert: ExpertId) -> None:
        self._resident.discard(expert)  # its heap entries go stale
        self._resident_in[expert.layer].discard(expert)
        self.marked.discard(expert)

    def _may_borrow(self) -> bool:
        """Whether the layer the slot is for holds fewer than `borrow` slots. That layer is the current
        one while its step has misses to load; after that, the next one, whose experts the executor
        prefetches (its step's borrowing, begun early)."""
        receiving = self.current if self._pending else (self.current + 1) % len(self.layers)
        return len(self._resident_in[self.layers[receiving]]) < self.borrow

    def victim(self, candidates: Collection[ExpertId]) -> ExpertId | None:
        order = self.uses.__getitem__  # every resident expert has a record (`loaded` makes one)
        if self.current is None:
            return min(candidates, key=order, default=None)
        current = self.layers[self.current]
        own = [e for e in candidates if e.layer == current]
        if own:
            return min(own, key=order)
        marked = [e for e in candidates if e in self.marked]
        if marked:
            return min(marked, key=order)
        if not self._may_borrow():
            return None
        num_layers = len(self.layers)

        def layers_until_needed(e: ExpertId) -> int:  # 0: the next layer of the sweep
            return (self.position[e.layer] - self.current - 1) % num_layers

        return min(candidates, key=lambda e: (-layers_until_needed(e), order(e)), default=None)

    def choose(self, resident: Resident, protected: Collection[ExpertId]) -> ExpertId | None:
        """victim()'s order from the heaps: the current layer by a plain pass (its experts are mostly
        this step's, protected, so that beats popping and re-pushing each from its heap on every
        miss), then the marked experts, then the layers behind, nearest first."""
        if self.current is None:
            return super().choose(resident, protected)
        layers = self.layers
        own = [e for e in resident.get(layers[self.current], ()) if e not in protected]
        if own:
            return min(own, key=self.uses.__getitem__)
        found = self._least(self._marked_heap, self.marked, protected)
        if found is not None or not self._may_borrow():
            return found
        num_layers = len(layers)
        for back in range(1, num_layers):
            layer = layers[(self.current - back) % num_layers]
            found = self._least(self._heaps[layer], self._resident_in[layer], protected)
            if found is not None:
                return found
        return None

    def _least(self, heap: list[tuple], members: Collection[ExpertId], protected: Collection[ExpertId]
               ) -> ExpertId | None:
        """The heap's least record among `members` not protected: entries of non-members are dropped,
        stale ones re-keyed (a use replaces the record by a greater one)."""
        return lazy_heap_top(heap, lambda entry: self.uses[entry[3]] if entry[3] in members else None, 3, protected)


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
        "layer": lambda: LayerAware(moe_layers, top_k),
    }
    return makers[name]()


POLICY_NAMES = ("lru", "lfu", "static", "layer")
