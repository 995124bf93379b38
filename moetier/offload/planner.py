"""SlotPlanner: which expert holds which GPU slot, and what a layer's step must load where.

Pure host bookkeeping, shared by the OffloadedExecutor (which then issues the copies) and
`moetier trace simulate` (which only counts), so a simulated policy behaves exactly as it would
at run time. Rules: experts the current round needs are never evicted; a miss takes a free slot,
else the policy's victim among the other holders; when nothing can be evicted the round ends and
the rest of the layer's experts go to the next round.

Spare slots: after each layer step the planner evicts the policy's victims until `spare` slots are
free, so that the next step's first misses need no choice: the executor books them into free slots
and starts their copies right after the routing read (claim_free), before the policy hears of the
step. The copy engine idles from the end of one layer's copies until the next layer's first copy
starts, and everything the host does in between stands in that gap (measured on the H100 at batch-1
decode: 100-150 us of host work per layer before its first copy without spares, 60-90 us with two,
next to 170-230 us per expert copy; benchmarks/first_copy_probe.py).

Rounds: a layer step that needs more experts than it may hold streams them through its slots in rounds.
Each round after the first is planned while the one before still waits for its copies (next_round):
beside that round's experts, which it may not evict, and at most half as wide as the step's first round,
so the layer streams through two sets of slots, one copying while the other computes. Planned after the round
before computed, a round's copies would wait for that compute, and the copy engine would idle through it
(on the H100, ~0.7 ms per round of a Qwen3-30B-A3B prefill: benchmarks/gpu_tail_probe.py --prefill).
"""

import heapq
import itertools
from collections import defaultdict
from collections.abc import Iterator

from moetier.moe.experts import EXPERT_IDS, ExpertId
from moetier.offload.cache import EvictionPolicy

# The executor's and the simulator's spare slots: two first copies cover the host's planning of the rest.
SPARE_SLOTS = 2


def spare_slots(num_slots: int, num_experts: int) -> int:
    """SPARE_SLOTS, at most a sixteenth of the pool (each spare slot is one expert fewer cached), and
    none when the pool holds all `num_experts` (every MoE layer's): then a miss is a first use, and
    evictions to keep slots spare would only add misses."""
    return min(SPARE_SLOTS, num_slots // 16) if num_slots < num_experts else 0


class SlotPlanner:
    def __init__(self, num_slots: int, policy: EvictionPolicy, spare: int = 0):
        if num_slots < 1:
            raise ValueError("the slot pool needs at least one slot")
        self.policy = policy
        self.spare = spare
        self.holder: list[ExpertId | None] = [None] * num_slots  # slot -> expert
        self.slot_of: dict[ExpertId, int] = {}  # expert -> slot
        self.resident: defaultdict[int, set[ExpertId]] = defaultdict(set)  # layer -> its experts in slots
        self.free = list(range(num_slots))  # a heap: the lowest free slot first
        self._claimed: dict[ExpertId, int] = {}  # booked by claim_free, not yet told to the policy

    def claim_free(self, layer: int, experts: list[int]) -> list[tuple[int, int]]:
        """Books the first misses of `experts` into free slots (the lowest first), exactly where the
        step's start_round would put them, without telling the policy: a free slot is taken before any
        is evicted, so no choice depends on it. (expert, slot) pairs; access() and start_round() for
        the same experts must follow, and start_round hands them back among its loads."""
        claimed, ids = [], EXPERT_IDS[layer]
        for e in experts:
            if not self.free:
                break
            expert = ids[e]
            if expert not in self.slot_of:
                slot = heapq.heappop(self.free)
                self._book(expert, slot)
                self._claimed[expert] = slot
                claimed.append((e, slot))
        return claimed

    def slots_of(self, layer: int, experts: list[int]) -> list[int]:
        """The slots of `experts` (each booked)."""
        ids, slot_of = EXPERT_IDS[layer], self.slot_of
        return [slot_of[ids[e]] for e in experts]

    def access(self, layer: int, experts: list[int]) -> None:
        self.policy.access_step(layer, experts)

    def plan_round(self, layer: int, experts: list[int], keep: frozenset[ExpertId] = frozenset()
                   ) -> tuple[list[int], list[tuple[int, int, ExpertId | None]]]:
        """Makes as many of `experts` resident as fit beside the hits and `keep`: (hits, loads), each
        load being (expert, slot, evicted expert or None). The bookkeeping is updated as if the loads
        were done."""
        hits, loads = self.start_round(layer, experts, keep)
        return hits, list(loads)

    def start_round(self, layer: int, experts: list[int], keep: frozenset[ExpertId] = frozenset(),
                    limit: int | None = None, evict: bool = True
                    ) -> tuple[list[int], Iterator[tuple[int, int, ExpertId | None]]]:
        """plan_round with the loads planned one at a time as the caller takes them, so that it can
        start each copy before planning the next; the caller takes them all. At most `limit` loads; without
        `evict`, only as many as there are free slots (a speculative load then costs no cached expert)."""
        # by the layer's few resident experts, not an ExpertId per expert asked for (a round of a wide step
        # asks for a hundred, nearly none resident)
        held = {x.expert for x in self.resident[layer] if x not in self._claimed}
        hits = [e for e in experts if e in held]
        ids = EXPERT_IDS[layer]
        protected = {ids[e] for e in hits} | keep | self._claimed.keys()
        return hits, itertools.islice(self._loads(layer, experts, protected, evict), limit)

    def next_round(self, layer: int, experts: list[int], unread: list[int], width: int
                   ) -> tuple[list[int], Iterator[tuple[int, int, ExpertId | None]]]:
        """start_round for a round after the step's first, which held `width` experts, while the `unread`
        experts (of the round before) wait for their compute: those kept, at most half the width (the
        layer streams through two sets of slots). Neither hits nor loads when nothing fits beside them:
        the caller computes that round first and plans again with nothing unread."""
        ids = EXPERT_IDS[layer]
        keep = frozenset(ids[e] for e in unread)
        hits, loads = self.start_round(layer, experts, keep, limit=max(1, (width + 1) // 2))
        loads = _peeked(loads)
        return hits, iter(()) if loads is None else loads

    def plan_step(self, layer: int, needed: list[int]
                  ) -> Iterator[tuple[list[int], list[tuple[int, int, ExpertId | None]]]]:
        """A layer step's rounds as the executor plans its wide steps, for callers that only count (the
        simulator): (hits, loads) per round, each after the first planned beside the loads of the round
        before (next_round; the first round's hits compute apart, before its loads have arrived)."""
        hits, loads = self.plan_round(layer, needed)
        width, remaining = len(hits) + len(loads), needed
        while hits or loads:
            yield hits, loads
            unread = [e for e, _, _ in loads]
            done = set(hits).union(unread)
            remaining = [e for e in remaining if e not in done]
            if not remaining:
                return
            hits, loads = self.next_round(layer, remaining, unread, width)
            loads = list(loads)
            if not hits and not loads:  # the executor computes the round before, then plans again
                hits, loads = self.next_round(layer, remaining, [], width)
                loads = list(loads)
        raise RuntimeError("no expert could be made resident (the pool has no slot)")

    def end_step(self, protected: set[ExpertId]) -> list[tuple[int, ExpertId]]:
        """After a layer step: evicts the policy's victims (never `protected`) until `spare` slots are
        free, or the policy declines. (slot, evicted) pairs."""
        released = []
        while len(self.free) < self.spare:
            evicted = self.policy.choose(self.resident, protected)
            if evicted is None:
                break
            released.append((self.release(evicted), evicted))
        return released

    def release(self, expert: ExpertId) -> int:
        """Evicts `expert`, its slot free again; returns the slot."""
        slot = self._evict(expert)
        self.holder[slot] = None
        heapq.heappush(self.free, slot)
        return slot

    def _loads(self, layer: int, experts: list[int], protected: set[ExpertId], evict: bool = True
               ) -> Iterator[tuple[int, int, ExpertId | None]]:
        ids = EXPERT_IDS[layer]
        for e in experts:
            expert = ids[e]
            claimed = self._claimed.pop(expert, None)
            if claimed is not None:  # the first misses, in free slots: the policy hears of them now
                self.policy.loaded(expert)
                yield e, claimed, None
                continue
            if expert in protected:
                continue
            evicted = None
            if self.free:
                slot = heapq.heappop(self.free)
            else:
                evicted = self.policy.choose(self.resident, protected) if evict else None
                if evicted is None:
                    break
                slot = self._evict(evicted)
            self._book(expert, slot)
            self.policy.loaded(expert)
            protected.add(expert)
            yield e, slot, evicted

    def _book(self, expert: ExpertId, slot: int) -> None:
        self.holder[slot] = expert
        self.slot_of[expert] = slot
        self.resident[expert.layer].add(expert)

    def _evict(self, expert: ExpertId) -> int:
        """Takes `expert` out of its slot; returns the slot."""
        slot = self.slot_of.pop(expert)
        self.resident[expert.layer].discard(expert)
        self.policy.evicted(expert)
        return slot


def _peeked(items: Iterator) -> Iterator | None:
    """`items` unchanged, or None when it is empty (its first item is taken to know)."""
    first = next(items, None)
    return None if first is None else itertools.chain([first], items)
