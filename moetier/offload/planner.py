"""SlotPlanner: which expert holds which GPU slot, and what a layer's step must load where.

Pure host bookkeeping, shared by the OffloadedExecutor (which then issues the copies) and
`moetier trace simulate` (which only counts), so a simulated policy behaves exactly as it would
at run time. Rules: experts the current round needs are never evicted; a miss takes a free slot,
else the policy's victim among the other holders; when nothing can be evicted the round ends and
the rest of the layer's experts go to the next round.
"""

import heapq
from collections import defaultdict
from collections.abc import Iterator

from moetier.moe.experts import ExpertId
from moetier.offload.cache import EvictionPolicy


class SlotPlanner:
    def __init__(self, num_slots: int, policy: EvictionPolicy):
        if num_slots < 1:
            raise ValueError("the slot pool needs at least one slot")
        self.policy = policy
        self.holder: list[ExpertId | None] = [None] * num_slots  # slot -> expert
        self.slot_of: dict[ExpertId, int] = {}  # expert -> slot
        self.resident: defaultdict[int, set[ExpertId]] = defaultdict(set)  # layer -> its experts in slots
        self.free = list(range(num_slots))  # a heap: the lowest free slot first

    def access(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            self.policy.access(ExpertId(layer, e))

    def plan_round(self, layer: int, experts: list[int], keep: frozenset[ExpertId] = frozenset()
                   ) -> tuple[list[int], list[tuple[int, int, ExpertId | None]]]:
        """Makes as many of `experts` resident as fit beside the hits and `keep`: (hits, loads), each
        load being (expert, slot, evicted expert or None). The bookkeeping is updated as if the loads
        were done."""
        hits, loads = self.start_round(layer, experts, keep)
        return hits, list(loads)

    def start_round(self, layer: int, experts: list[int], keep: frozenset[ExpertId] = frozenset()
                    ) -> tuple[list[int], Iterator[tuple[int, int, ExpertId | None]]]:
        """plan_round with the loads planned one at a time as the caller takes them, so that it can
        start each copy before planning the next; the caller takes them all."""
        hits = [e for e in experts if ExpertId(layer, e) in self.slot_of]
        protected = {ExpertId(layer, e) for e in hits} | keep
        return hits, self._loads(layer, experts, protected)

    def _loads(self, layer: int, experts: list[int], protected: set[ExpertId]
               ) -> Iterator[tuple[int, int, ExpertId | None]]:
        for e in experts:
            expert = ExpertId(layer, e)
            if expert in protected:
                continue
            evicted = None
            if self.free:
                slot = heapq.heappop(self.free)
            else:
                evicted = self.policy.choose(self.resident, protected)
                if evicted is None:
                    break
                slot = self.slot_of.pop(evicted)
                self.resident[evicted.layer].discard(evicted)
                self.policy.evicted(evicted)
            self.holder[slot] = expert
            self.slot_of[expert] = slot
            self.resident[layer].add(expert)
            self.policy.loaded(expert)
            protected.add(expert)
            yield e, slot, evicted
