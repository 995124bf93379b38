"""OffloadedExecutor: routed experts live in the host store; a pool of S GPU slots shared by all
MoE layers caches them. Same kernel, same dispatch and same k-ordered sum as ResidentExecutor,
so its outputs are bitwise identical.

Legend: T tokens, K experts per token, A = T*K assignments, D hidden, E experts, S slots.

Per MoE layer: one wait for the GPU reads the experts the step needs (in graphed decode a poll of the
pinned memory the step's graph writes them into, kernels/routing_mailbox.py; else a copy and a stream
sync); the first misses start copying into the planner's spare slots at once, before any other host
work (planner.py); hits use their slots; each other miss takes a free slot or the policy's victim
(never an expert this layer needs), the copy into it starts after the slot's last reader, and compute
waits for the copies on the device. After the step the planner frees spare slots again for the next
layer. Overlap: with more tokens than the decode GEMV takes, the hits compute first while the misses
stream in; when a layer needed nearly every expert (a long prompt under spread routing), the next MoE
layer's experts start copying behind its own into slots this layer does not need. If the layer
needs more experts than there are slots (or the policy declines to evict), it runs in rounds, each
planned and copying while the one before waits for its copies (planner.py: two sets of slots). Rounds
write their assignment rows into one [A + 1, D] buffer (a dump row last) and one k-ordered sum
follows, the same sum the resident combine ends with; they pick their rows on the device, so the
layer's only host sync stays the routing read (but for the looped fallback kernel, which reads its
offsets on the host anyway). In full decode buckets each round replays a captured graph.
Otherwise a predictor (offload/predict.py) guesses the next MoE layer's experts, its guess read with
the routing (graphed, published after it and read once this layer's copies are issued), and those not
resident start copying behind this layer's misses, into free slots only, so the copy engine keeps working
through the next layer's attention, router and routing read without a cached expert evicted; the guesses
are scored against what that layer then needs, and prefetching pauses while fewer than half were right.
"""

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from moetier.kernels.first_copy import FirstMissCopy
from moetier.kernels.routing_mailbox import Region, RoutingMailbox
from moetier.kernels.slot_lookup import lookup_slots
from moetier.models.spec import ModelSpec
from moetier.moe.dispatch import combine, dispatch, dispatch_round, weighted_k_sum
from moetier.moe.executor import expert_kernels
from moetier.moe.experts import EXPERT_IDS, ExpertId, ExpertLayout, ExpertWeights
from moetier.moe.grouped import GEMV_MAX_TOKENS, gemv_experts, grouped_experts
from moetier.moe.router import Routing
from moetier.offload.cache import EvictionPolicy, make_policy
from moetier.offload.copy_engine import CopyEngine, Event, make_copy_engine
from moetier.offload.planner import SlotPlanner, spare_slots
from moetier.offload.predict import Predictor
from moetier.offload.prefetch import PrefetchWindow, running_average
from moetier.offload.slots import SlotPool
from moetier.offload.store import ExpertStore

# The next layer is prefetched whole when this one needed at least 7/8 of its experts.
PREFETCH_NUMERATOR, PREFETCH_DENOMINATOR = 7, 8
# The hits compute while the misses stream in (two rounds) from this many tokens. Rounds select their
# rows on the device, so this no longer waits for prefill-sized steps (it was 128 while a round read
# its row count on the host, a sync that idled the copy engine: ~3 ms per layer at batch-8 decode of
# OLMoE-1B-7B on the H100). Up to GEMV_MAX_TOKENS the hits' GEMV is short next to the misses' copies,
# and a second round's launches cost host time the step waits for: no overlap there.
OVERLAP_MIN_TOKENS = GEMV_MAX_TOKENS + 1
# Predicted experts are copied ahead (as many as fit the copy engine's idle window, prefetch.py)
# while the running precision of the guesses that were not resident is at least this: each wrong
# one costs a copy and the spare slot the next step's first miss would have copied into. (Right guesses
# are mostly resident already when the cache hits often: measured on the dummy Qwen3-30B-A3B at batch 1,
# 0.74 of all guesses right and 0.19 of those copied.)
PREDICTION_MIN_PRECISION = 0.5
# Below it, one layer step in this many still predicts (and is scored), so a run whose routing
# becomes predictable turns prefetching back on; the others skip the predictor's kernels.
PREDICTION_PROBE_EVERY = 8
# A captured GEMV-sized step with at least this many loads computes its other experts while the last copy
# streams in (_replay_step). With fewer, the copies are short next to the extra replay's and table's
# host time.
SPLIT_MIN_LOADS = 3
# In graphed decode at GEMV sizes, the GPU copies each layer's first miss itself (kernels/first_copy.py) when
# an expert is at most this large: its kernel reads pinned memory at ~43 GB/s against the copy engine's ~54,
# and starts ~45 us sooner (the host's poll, booking and copy call, on the device H100:
# benchmarks/zero_copy_rate.py, first_copy_probe.py), so it lands a lone miss sooner up to
# 45 us * 43 * 54 / (54 - 43) GB/s = 9.5 MB (a Qwen3-30B-A3B expert is 9.4 MB, an OLMoE-1B-7B one 12.6).
# At larger batch sizes a step's hits compute while its misses stream in, and the kernel, on the compute
# stream, would hold them back.
FIRST_COPY_MAX_BYTES = 9_500_000
# Up to this many routed ids (decode steps) a Python set finds the distinct ones faster than np.unique.
DISTINCT_BY_SET_MAX = 256


class OffloadedExecutor:
    sync_free = False  # reads the routing on the host every MoE layer

    def __init__(self, model_spec: ModelSpec, dtype: torch.dtype, device: torch.device | str, num_slots: int,
                 eviction: str | EvictionPolicy = "layer", copy_engine: CopyEngine | None = None,
                 host_experts: int | None = None, prefetch_next_layer: bool = True, disk_key: str | None = None,
                 predictor: Predictor | None = None):
        device = torch.device(device)
        self.spec = model_spec.moe
        self.layout = ExpertLayout(model_spec.hidden_size, self.spec.intermediate_size, dtype, self.spec.expert_bias)
        self.moe_layers = tuple(model_spec.moe_layer_ids)
        self.next_layer = dict(zip(self.moe_layers, self.moe_layers[1:]))  # the MoE layer after each but the last
        self.store = ExpertStore(self.layout, self.moe_layers, self.spec.num_experts, host_experts=host_experts,
                                 disk_key=disk_key)
        self.pool = SlotPool(num_slots, self.layout, self.moe_layers, self.spec.num_experts, device)
        policy = (
            eviction if isinstance(eviction, EvictionPolicy)
            else make_policy(eviction, num_slots, self.moe_layers, self.spec.num_experts, self.spec.top_k)
        )
        self.planner = SlotPlanner(num_slots, policy, spare_slots(num_slots, len(self.moe_layers) * self.spec.num_experts))
        self.copy_engine = copy_engine or make_copy_engine(device)
        self.kernel, self.gemv = expert_kernels(self.spec, dtype, device)
        self.hits: Counter[int] = Counter()
        self.misses: Counter[int] = Counter()
        self.bytes_copied = 0
        self.copy_wait_s = 0.0  # measured on the timed layer steps (one in window.sample_every), scaled
        self._timed = False  # the layer step in progress is timed
        self.routing_sync_s = 0.0  # host time blocked reading the routing (includes the GPU catching up)
        self.tokens = 0  # tokens through the first MoE layer
        self.prefetch_next_layer = prefetch_next_layer
        self.prefetched: set[ExpertId] = set()  # loaded ahead of their layer, not used yet
        self.prefetch_loads = 0
        self.prefetch_used = 0
        self.predictor = predictor  # may be set after the model is built (it reads the model's routers)
        # (MoE layer, the experts predicted for it, those of them not resident when predicted)
        self.guess: tuple[int, list[int], list[int]] | None = None
        self.precision = PREDICTION_MIN_PRECISION  # running, of the non-resident guesses: starts by trying
        self.guessed_experts = 0
        self.guessed_right = 0
        self.needed_when_guessed = 0
        self._calls = 0
        self.window = PrefetchWindow(self.copy_engine)
        self._ids_host = torch.empty(0, dtype=torch.int64)  # pinned on CUDA: where the routing lands
        self.gpu_first_copy = True  # in graphed decode, the GPU copies each layer's first miss itself
        self._first_copy: FirstMissCopy | None = None
        self._gpu_slot: tuple[int, int] | None = None  # (layer, slot) its first-miss kernel was told to fill
        self.gpu_first_copies = 0
        # tokens -> the (table, output) that the captured rounds of that size share
        self._round_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def expert_weights(self) -> ExpertWeights:
        return self.store

    def run(self, layer: int, x_TD: torch.Tensor, routing: Routing, guess_TK: torch.Tensor | None = None,
            compute: "CapturedStep | CapturedRound | None" = None, published: "PublishedRouting | None" = None
            ) -> torch.Tensor | None:
        """The routed experts' output for the step, or None when `compute` wrote it. From piecewise decode
        graphs: `guess_TK`, the predictor's guess that the graph before already enqueued, `compute`,
        what capture_compute() captured for these very tensors: at GEMV sizes graphs of the whole step, one
        replayed when its experts all fit (both when split at its last copy); else a graph of one round,
        replayed for every round; and `published`, where that graph writes the routing and the guess on
        the host."""
        captured = compute if isinstance(compute, CapturedRound) else None
        self._fold_in_timings()
        if not self._predicting():
            guess_TK = None
        elif guess_TK is None:
            guess_TK = self.predictor.predict(layer, x_TD)
            if guess_TK is not None:
                published = None  # an eager guess: it comes over with the routing
        started = time.perf_counter()
        needed, guess_host = self._read_routing(routing.topk_ids_TK, guess_TK, published)  # the layer's one wait
        self.routing_sync_s += time.perf_counter() - started
        self.copy_engine.reads_complete()  # the GPU has passed every read marked before this layer's launch
        # The first misses copy into the spare slots before the rest of the host work (planner.py).
        claimed = self.planner.claim_free(layer, needed)
        by_gpu = self._copied_by_gpu(layer, claimed)
        self._timed = self.window.times_step()  # the step's first copy and its copy stalls are timed
        first_copy = self._copy_claimed(layer, claimed[by_gpu:], timed=self._timed)
        self.window.copies_start(first_copy)
        self.window.window_ends(first_layer=layer == self.moe_layers[0])
        if layer == self.moe_layers[0]:
            self.tokens += x_TD.shape[0]
        self.planner.access(layer, needed)
        hits, loads = self._plan_and_copy(layer, needed, copied=len(claimed))
        self.window.copies_issued(len(loads) - by_gpu - (first_copy is not None))
        self._score_guess(layer, needed)
        ready = sorted(hits + loads)
        fits = len(ready) == len(needed)
        step_graphs = compute if isinstance(compute, CapturedStep) else None
        split = fits and step_graphs is not None and len(loads) >= SPLIT_MIN_LOADS
        overlap = bool(hits and loads) and x_TD.shape[0] >= OVERLAP_MIN_TOKENS and not split
        if fits and not overlap:
            if captured is not None:  # reads its own round table, not the layer's
                self._captured_round(captured, layer, ready, x_TD)
                y_TD = weighted_k_sum(captured.out_A1D[:-1], routing.topk_weights_TK)
            elif step_graphs is not None:
                self._replay_step(step_graphs, layer, [hits + loads[:-1], loads[-1:]] if split else [ready])
                y_TD = None
            else:
                # The slot table goes up before the wait, so its copy runs on the idle compute stream beside
                # the experts' copies, not after them on the way to the next layer's routing read.
                self.pool.device_table(layer)
                self._wait_for_copies(layer, ready)
                y_TD = self._compute_all(layer, x_TD, routing)
            self._mark_read(layer, ready)
        else:
            rounds = [sorted(hits), sorted(loads)] if overlap else [ready]
            done = set(ready)
            y_TD, unread = self._compute_in_rounds(layer, x_TD, routing, rounds, [e for e in needed if e not in done],
                                                   len(ready), captured)
        ids = EXPERT_IDS[layer]
        for _, evicted in self.planner.end_step({ids[e] for e in needed}):
            self.pool.release(evicted)
            self.prefetched.discard(evicted)
        if guess_TK is not None and published is not None:
            guess_host = published.guess_on_host(*guess_TK.shape)
        # Behind the compute, which need not wait for it; never into the slots of experts it may still be
        # reading (in rounds, the last round's: the others computed while its copies ran).
        self._prefetch_next(layer, x_TD.shape[0], needed, _first_seen(guess_host), needed if fits else unread,
                            window=fits)
        return y_TD

    def _prefetch_next(self, layer: int, tokens: int, needed: list[int], guessed: list[int], unread: list[int],
                       window: bool) -> None:
        if not self._prefetch_after(layer, tokens, needed, unread):
            self._prefetch_guess(layer, guessed, window)

    def _compute_in_rounds(self, layer: int, x_TD: torch.Tensor, routing: Routing, rounds: list[list[int]],
                           remaining: list[int], width: int, captured: "CapturedRound | None" = None
                           ) -> tuple[torch.Tensor, list[int]]:
        """The output and the last round's experts. Rounds, their copies started: the hits compute while
        the misses stream in (overlap); the `remaining` experts, for which the pool had no slot yet,
        follow in further rounds of at most half the `width` of the first. Each is planned and starts
        copying before the round ahead of it computes, beside that round's experts, if any slot is left
        beside them (planner.next_round), else after. With `captured`, each round replays its graph
        (capture_compute)."""
        # one row per assignment, and a dump row for the writes of the rows outside a round
        out_A1D = captured.out_A1D if captured else torch.empty(
            routing.topk_ids_TK.numel() + 1, x_TD.shape[1], dtype=x_TD.dtype, device=x_TD.device)
        rounds = deque(rounds)
        while rounds:
            experts = rounds.popleft()
            if remaining and not rounds:
                remaining = self._plan_next_round(layer, remaining, experts, width, rounds)
            if captured is not None:
                self._captured_round(captured, layer, experts, x_TD)
            else:
                slots_E = self._round_slots(layer, experts, x_TD)  # uploaded before the wait, as in run()
                self._wait_for_copies(layer, experts)
                self._compute_round(x_TD, routing, slots_E, out_A1D)
            self._mark_read(layer, experts)
            if remaining and not rounds:
                remaining = self._plan_next_round(layer, remaining, [], width, rounds)
        return weighted_k_sum(out_A1D[:-1], routing.topk_weights_TK), experts

    def _captured_round(self, captured: "CapturedRound", layer: int, experts: list[int], x_TD: torch.Tensor) -> None:
        """A round through its captured graph (into captured.out_A1D): the round's table into the graph's
        input, the wait for its copies, one replay."""
        self._round_slots(layer, experts, x_TD, into=captured.slots_E)
        self._wait_for_copies(layer, experts)
        captured.graph.replay()

    def _replay_step(self, captured: "CapturedStep", layer: int, parts: list[list[int]]) -> None:
        """The step's captured graphs, one per part of its experts (in copy order), each replayed once the part's
        copies landed, over a table that maps that part alone. Two parts split the step at its last copy: of
        the experts' GEMVs only one expert's then stands between the layer's last copy and the next layer's
        routing read, where the copy engine idles. Each graph computes the rows of the experts its table maps
        (the others keep the replay's before) and then the weighted sum: the last replay's is the step's.
        The tables are pinned host rows the graphs read (kernels/slot_lookup.py): written here, not uploaded."""
        for graph, table_E, experts in zip(captured.graphs, captured.tables_E, parts):
            if experts:
                self.pool.write_table(table_E, layer, experts, absent=-1)
                self._wait_for_copies(layer, experts)
                graph.replay()

    def _plan_next_round(self, layer: int, remaining: list[int], unread: list[int], width: int, rounds: deque
                         ) -> list[int]:
        """Plans the next round of `remaining` beside the `unread` experts and starts its copies; appends
        it to `rounds` unless nothing fitted. Returns the experts still to plan."""
        self.window.discard()  # the layer's copy timings now include waits for compute
        hits, loads = self._plan_and_copy(layer, remaining, next_round=(unread, width))
        if not hits and not loads:
            return remaining
        rounds.append(sorted(hits + loads))
        done = set(hits + loads)
        return [e for e in remaining if e not in done]

    def _read_routing(self, topk_ids_TK: torch.Tensor, guess_TK: torch.Tensor | None,
                      published: "PublishedRouting | None") -> tuple[list[int], np.ndarray | None]:
        """The distinct experts of the step, ascending, and the guess for the next layer on the host
        (k-major), if any. Published by a graph, the routing is polled from pinned memory, and the guess,
        published after it, is left for later (PublishedRouting.guess_on_host). Else, on CUDA, both come
        over in small copies to pinned memory and one stream sync (a device unique would sort and sync
        twice)."""
        if published is not None:
            return _distinct(published.mailbox.read(published.routing, topk_ids_TK.numel())), None
        # k-major: every token's first choice, then every second choice, ...
        parts = [topk_ids_TK.reshape(-1)] + ([] if guess_TK is None else [guess_TK.t().reshape(-1)])
        if not topk_ids_TK.is_cuda:
            hosts = [part.numpy() for part in parts]
        else:
            count = sum(part.numel() for part in parts)
            if self._ids_host.numel() < count:
                self._ids_host = torch.empty(2 * count, dtype=torch.int64, pin_memory=True)
            hosts, offset = [], 0
            for part in parts:
                host = self._ids_host[offset : offset + part.numel()]
                host.copy_(part, non_blocking=True)
                hosts.append(host.numpy())
                offset += part.numel()
            torch.cuda.current_stream(topk_ids_TK.device.index).synchronize()  # an int: the fast path
        return _distinct(hosts[0]), hosts[1] if len(hosts) > 1 else None

    # --- planning and copies ----------------------------------------------------------------

    def first_miss_copy(self) -> FirstMissCopy | None:
        """The kernels that copy each layer's first miss in graphed decode (kernels/first_copy.py), made once;
        None where they cannot run (no Triton, no pinned arena, slots not of whole 16-byte lines) or would not
        help (experts over FIRST_COPY_MAX_BYTES)."""
        if self.layout.slot_bytes > FIRST_COPY_MAX_BYTES:
            return None
        if self._first_copy is None and FirstMissCopy.supported(self.pool.bank.bytes_SB, self.store.arena.chunks):
            buffers = {layer: [self.store.buffers.get(ExpertId(layer, e)) for e in range(self.spec.num_experts)]
                       for layer in self.moe_layers}
            self._first_copy = FirstMissCopy(buffers, self.store.arena.chunks, self.pool.bank.bytes_SB)
        return self._first_copy

    def command_first_copy(self, layer: int, count: int) -> None:
        """Before the launch of the graph that routes `layer` over `count` ids: its kernel is to copy the
        first missed expert into the lowest free slot, where claim_free will book it (or nothing: with
        `gpu_first_copy` off, no free slot, or one whose last copy may still be landing)."""
        free, filled = self.planner.free, self.pool.filled
        slot = free[0] if free and self.gpu_first_copy else -1
        if slot >= 0 and filled[slot] is not None and not filled[slot].query():
            slot = -1
        self._first_copy.command(layer, slot, count, self.pool.host_tables[layer])
        self._gpu_slot = (layer, slot)

    def _copied_by_gpu(self, layer: int, claimed: list[tuple[int, int]]) -> int:
        """1 if the first claimed miss was copied by the layer's first-miss kernel (it is then resident once
        the compute stream gets past that kernel), else 0."""
        commanded, self._gpu_slot = self._gpu_slot, None
        if commanded is None or commanded[0] != layer or commanded[1] < 0 or not claimed:
            return 0
        e, slot = claimed[0]
        if slot != commanded[1]:
            raise RuntimeError(f"layer {layer}: the first miss was booked into slot {slot}, the GPU copied it into "
                               f"{commanded[1]}")
        expert = EXPERT_IDS[layer][e]
        if expert not in self.store.buffers:  # on disk: the kernel copied nothing
            return 0
        self.pool.assign(slot, expert, None, None)
        self.gpu_first_copies += 1
        return 1

    def _copy_claimed(self, layer: int, claimed: list[tuple[int, int]], timed: bool) -> Event | None:
        """Starts the copies of the misses claim_free booked into free slots; the first one's event, a timing
        one if `timed`: the layer's other copies are timed from it (PrefetchWindow.copies_start)."""
        if not claimed:
            return None
        ids = EXPERT_IDS[layer]
        with self.copy_engine.issuing():
            for i, (e, slot) in enumerate(claimed):
                self._copy_into(ids[e], slot, None, timed=timed and i == 0)
        return self.pool.filled[claimed[0][1]]

    def _copy_into(self, expert: ExpertId, slot: int, evicted: ExpertId | None, timed: bool = False) -> None:
        filled = self.store.copy_in(expert, self.pool.slot_bytes_S[slot], self.copy_engine, self.pool.last_read[slot],
                                    timed)
        self.pool.assign(slot, expert, evicted, filled)

    def _plan_and_copy(self, layer: int, experts: list[int], keep: frozenset[ExpertId] = frozenset(),
                       prefetch: bool = False, copied: int = 0, next_round: tuple[list[int], int] | None = None,
                       evict: bool = True) -> tuple[list[int], list[int]]:
        """Plans as many of `experts` as fit beside the hits (never evicting `keep`; without `evict`, into
        free slots only) and starts the copies of the misses: (hits, loads). The first `copied` loads are
        the claimed ones, copying already. With `next_round` (unread experts, width), a round after the
        step's first (planner.next_round)."""
        if next_round is None:
            hits, planned = self.planner.start_round(layer, experts, keep, evict=evict)
        else:
            hits, planned = self.planner.next_round(layer, experts, *next_round)
        loaded, ids = [], EXPERT_IDS[layer]
        with self.copy_engine.issuing():
            for e, slot, evicted in planned:  # each copy starts before the next load is planned
                if len(loaded) >= copied:
                    self._copy_into(ids[e], slot, evicted)
                    self.prefetched.discard(evicted)
                loaded.append(e)
        self.bytes_copied += len(loaded) * self.layout.slot_bytes
        if prefetch:
            self.prefetched.update(ids[e] for e in loaded)
            return hits, loaded
        # A prefetched expert counts as the miss it was when first used; its copy is not counted twice.
        early = [e for e in hits if ids[e] in self.prefetched] if self.prefetched else []
        self.prefetched.difference_update(ids[e] for e in early)
        self.hits[layer] += len(hits) - len(early)
        self.misses[layer] += len(loaded) + len(early)
        self.prefetch_used += len(early)
        return hits, loaded

    def _prefetch_after(self, layer: int, tokens: int, needed: list[int], unread: list[int]) -> bool:
        """When this layer's step of `tokens` needed (nearly) every expert, as a long prompt's does under
        spread routing, the next MoE layer's step will too: its copies start now, behind this layer's, into
        slots other than those of the `unread` experts (this layer's, which its compute may still
        read), so they run while it computes. Routing that concentrates on
        a few experts (measured on the dummy Qwen3-30B-A3B: 29 of 128 per layer for a 512-token
        prompt) prefetches nothing, rather than four times the bytes it needs; nor does a step too
        narrow for the next one to need every expert (_spread_enough). True if it prefetched."""
        nxt = self.next_layer.get(layer)
        if nxt is None or not self.prefetch_next_layer:
            return False
        num_experts = self.spec.num_experts
        if len(needed) * PREFETCH_DENOMINATOR < PREFETCH_NUMERATOR * num_experts:
            return False
        if not _spread_enough(tokens, num_experts, self.spec.top_k):
            return False
        ids = EXPERT_IDS[layer]
        keep = frozenset(ids[e] for e in unread)
        _, loaded = self._plan_and_copy(nxt, list(range(num_experts)), keep, prefetch=True)
        self.prefetch_loads += len(loaded)
        return True

    def _prefetch_guess(self, layer: int, guessed: list[int], window: bool) -> None:
        """Starts the copies of the predicted next-layer experts that are not resident (the first
        choices first; with `window`, as many as fit the copy engine's idle window), behind this layer's
        own, into free slots only: the spare slots the planner keeps for the next step's first misses,
        which a right guess is one of. Evicting for a guess would cost a cached expert that the step
        without it keeps: on uniform routing, batch-8 decode of a Mixtral-8x7B shape with 55 slots fell from
        static pinning's hit rate to 0.004 below it (benchmarks/prefetch_hit_rate.py). Remembers the
        guess to score it. (The window is measured on steps that fit in one pass; a step in rounds has
        none of its own.)"""
        nxt = self.next_layer.get(layer)
        if not guessed or nxt is None:
            return
        ids, slot_of = EXPERT_IDS[nxt], self.planner.slot_of
        missing = [e for e in guessed if ids[e] not in slot_of]
        self.guess = (nxt, guessed, missing)
        if not self.prefetch_next_layer or self.precision < PREDICTION_MIN_PRECISION:
            return
        if window:
            missing = missing[: self.window.depth(self.precision)]
        if missing:
            _, loaded = self._plan_and_copy(nxt, missing, prefetch=True, evict=False)
            self.prefetch_loads += len(loaded)

    def _predicting(self) -> bool:
        if self.predictor is None:
            return False
        self._calls += 1
        return self.precision >= PREDICTION_MIN_PRECISION or self._calls % PREDICTION_PROBE_EVERY == 0

    def _score_guess(self, layer: int, needed: list[int]) -> None:
        """Scores the guess made for this layer (if any) against what it needs: all of it for the
        stats, its non-resident part for the running precision that gates prefetching."""
        if self.guess is None or self.guess[0] != layer:
            return
        (_, guessed, missing), self.guess = self.guess, None
        needed_set = set(needed)
        right = len(needed_set.intersection(guessed))
        self.guessed_experts += len(guessed)
        self.guessed_right += right
        self.needed_when_guessed += len(needed)
        if missing:
            share = len(needed_set.intersection(missing)) / len(missing)
            self.precision = running_average(self.precision, share)

    def _wait_for_copies(self, layer: int, experts: list[int]) -> None:
        pending, filled = [], self.pool.filled
        for slot in self.planner.slots_of(layer, experts):
            if filled[slot] is not None:
                pending.append(filled[slot])
                filled[slot] = None
        self.copy_engine.wait(pending, timed=self._timed)

    def _fold_in_timings(self) -> None:
        """The copy timings and compute stalls whose events have completed, folded into their figures before
        the routing read, where the host would wait anyway: not between a layer's routing read and the
        launch of the next layer's graph, where a host late for the GPU holds it back (at batch 1, the host
        time of that stretch nears a layer's copy time on a slow host)."""
        self.window.measure()
        self.copy_wait_s += self.copy_engine.stall_seconds() * self.window.sample_every

    def _mark_read(self, layer: int, experts: list[int]) -> None:
        slots = self.planner.slots_of(layer, experts)
        event = self.copy_engine.mark_read([self.pool.slot_bytes_S[s] for s in slots])
        last_read = self.pool.last_read
        for slot in slots:
            last_read[slot] = event

    # --- compute: the resident kernels over the pool's bank -----------------------------------

    def _compute_all(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        bank, slot_of_expert_E = self.pool.bank, self.pool.device_table(layer)
        if self._gemv_sized(x_TD):
            return self._gemv_all(slot_of_expert_E, x_TD, routing)
        plan = dispatch(x_TD, routing, bank.num_slots, slot_of_expert_E)
        return combine(self.kernel(plan, bank, self.spec), plan, routing)

    def _gemv_sized(self, x_TD: torch.Tensor) -> bool:
        """Whether the step's experts run through the decode GEMV (else the grouped kernel)."""
        return self.gemv and x_TD.shape[0] <= GEMV_MAX_TOKENS

    def _gemv_all(self, table_E: torch.Tensor, x_TD: torch.Tensor, routing: Routing,
                  out_AD: torch.Tensor | None = None) -> torch.Tensor:
        """Every assignment through the slot of its expert in table_E (on the device or pinned: as it stands
        when the kernels run; into out_AD, if given, where the rows of experts the table lacks keep their
        values)."""
        slots_A = lookup_slots(table_E, routing.topk_ids_TK.reshape(-1))
        return weighted_k_sum(gemv_experts(x_TD, slots_A, self.pool.bank, out_AD), routing.topk_weights_TK)

    def capture_compute(self, layer: int, x_TD: torch.Tensor, routing: Routing, y_TD: torch.Tensor,
                        pool) -> "CapturedStep | CapturedRound | None":
        """For piecewise decode graphs, on their capture stream, over these static tensors. At GEMV sizes two
        graphs of _gemv_all into y_TD, each over one of the layer's pinned replay tables, their rows in a
        static buffer, which run() replays when every expert the step needs is resident: one replay instead of
        the slot lookup, two GEMV launches and the k-weighted sum (at batch 1 the host, not the copy engine,
        set the pace: benchmarks/host_time_offload.py); both, when it splits the step at its last copy. At
        grouped sizes a graph of one round (_compute_round) from a static slot table into a static output,
        which run() replays for each round of the step: its dozen launches cost ~0.5-0.9 ms of host time a
        round on the device H100, a replay one launch (torch ops took 15-230 us of host time each
        there, more while the GPU was busy: benchmarks/round_op_costs.py). None where the expert kernel
        reads its offsets on the host (the looped fallback: fp32, or no grouped_mm), which no graph holds."""
        if not self._gemv_sized(x_TD):
            return self._capture_round(x_TD, routing, pool) if self.kernel is grouped_experts else None
        _, out_A1D = self._shared_buffers(x_TD, routing)
        tables = self.pool.replay_tables[layer]
        graphs = tuple(_captured(lambda t=table_E: y_TD.copy_(self._gemv_all(t, x_TD, routing, out_A1D[:-1])), pool)
                       for table_E in tables)
        return CapturedStep(graphs, tuple(table_E.numpy() for table_E in tables))

    def _capture_round(self, x_TD: torch.Tensor, routing: Routing, pool) -> "CapturedRound":
        """A graph of _compute_round over these static tensors. Its table and output are shared by every
        layer's graph at this size: the layers' rounds run one after another on one stream."""
        slots_E, out_A1D = self._shared_buffers(x_TD, routing)
        graph = _captured(lambda: self._compute_round(x_TD, routing, slots_E, out_A1D), pool)
        return CapturedRound(graph, slots_E, out_A1D)

    def _shared_buffers(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """The round table and the [A + 1, D] output that the captured graphs of this step size share."""
        tokens = x_TD.shape[0]
        if tokens not in self._round_buffers:
            self._round_buffers[tokens] = (
                torch.full((self.spec.num_experts,), self.pool.num_slots, dtype=torch.int64, device=x_TD.device),
                torch.empty(routing.topk_ids_TK.numel() + 1, x_TD.shape[1], dtype=x_TD.dtype, device=x_TD.device))
        return self._round_buffers[tokens]

    def _round_slots(self, layer: int, experts: list[int], x_TD: torch.Tensor, into: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """The round's expert -> slot table on the device (a new tensor, or copied `into` one): its experts'
        slots, and for every other expert slot -1 (skipped by the GEMV) or S (past the pool, left out by the
        grouped kernel)."""
        return self.pool.table_of(layer, experts, -1 if self._gemv_sized(x_TD) else self.pool.num_slots, into)

    def _compute_round(self, x_TD: torch.Tensor, routing: Routing, slots_E: torch.Tensor, out_A1D: torch.Tensor
                       ) -> None:
        """The assignments of the round's experts through their slots (slots_E: _round_slots), written to
        their rows of out_A1D ([A + 1, D]); the other rows are left as they are. No host sync (no size that
        depends on the routing): the other rows go to slot -1, which the GEMV skips, or to slot S, past the
        pool, sorted last, where the grouped kernel's offsets leave them out, and their results go to the
        last row of out_A1D, a dump."""
        bank = self.pool.bank
        if self._gemv_sized(x_TD):  # the GEMV skips the rows of slot -1
            gemv_experts(x_TD, slots_E[routing.topk_ids_TK.reshape(-1)], bank, out_A1D[:-1])
            return
        plan, rows_A = dispatch_round(x_TD, routing, self.pool.num_slots, slots_E)
        out_A1D[rows_A] = self.kernel(plan, bank, self.spec)

    # --- stats ------------------------------------------------------------------------------

    def stats(self) -> dict:
        self._fold_in_timings()
        hits, misses = sum(self.hits.values()), sum(self.misses.values())
        return {
            "executor": "offloaded",
            "num_slots": self.pool.num_slots,
            "slot_bytes": self.layout.slot_bytes,
            "host_store_bytes": self.store.nbytes,
            "host_arena_reserved_bytes": self.store.arena.reserved_bytes,
            "disk_experts": self.store.disk_experts,
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "bytes_copied": self.bytes_copied,
            # compute standing still for copies (device time on CUDA), sampled as the copy timings are
            "copy_wait_s": self.copy_wait_s,
            "disk_bytes_read": self.store.disk_bytes_read,
            "disk_read_s": self.store.disk_read_s,
            "disk_direct_io": self.store.disk.direct if self.store.disk is not None else None,
            "routing_sync_s": self.routing_sync_s,
            "tokens": self.tokens,
            "prefetch_loads": self.prefetch_loads,  # copies started a layer ahead (whole layer or predicted)
            "prefetch_used": self.prefetch_used,  # of those, used by their layer (counted as its misses)
            "gpu_first_copies": self.gpu_first_copies,  # misses copied by the GPU's first-miss kernel
            "miss_bytes": misses * self.layout.slot_bytes,  # what the steps needed copied (prefetches used included)
            "guessed_experts": self.guessed_experts,  # predicted for a layer, and of those used by it
            "guessed_right": self.guessed_right,
            # Of the experts predicted for a layer, the share it used (precision), and of those it
            # used, the share predicted (recall).
            "prediction_precision": self.guessed_right / self.guessed_experts if self.guessed_experts else None,
            "prediction_recall": self.guessed_right / self.needed_when_guessed if self.needed_when_guessed else None,
            # The copy engine's idle window per layer and one expert's copy time (running averages).
            "prefetch_window_s": self.window.window_s,
            "expert_copy_s": self.window.copy_s,
            "slot_occupancy": sum(h is not None for h in self.planner.holder) / self.pool.num_slots,
            "layers": {layer: {"hits": self.hits[layer], "misses": self.misses[layer]} for layer in self.moe_layers},
        }


def _spread_enough(tokens: int, num_experts: int, top_k: int) -> bool:
    """Whether a step of `tokens` under spread routing leaves fewer than half an expert of a layer unused
    on average (each expert missed by a token with chance 1 - top_k / num_experts): only then is a whole
    layer worth copying ahead. A 512-token prompt is; batch-8 decode of Mixtral-8x7B (8 experts, top-2)
    leaves 0.8 unused, and copying them costs cached experts and copy time."""
    return num_experts * (1 - top_k / num_experts) ** tokens < 0.5


def _distinct(ids: np.ndarray) -> list[int]:
    """The distinct ids, ascending. A decode step's few through a Python set (0.5 against np.unique's 2.6
    us for 8 ids on the CI machine), host time between the routing read and the layer's first copy."""
    return sorted(set(ids.tolist())) if len(ids) <= DISTINCT_BY_SET_MAX else np.unique(ids).tolist()


def _first_seen(guess: np.ndarray | None) -> list[int]:
    """The distinct experts of a k-major guess, in the order first seen (the tokens' first choices first)."""
    if guess is None:
        return []
    _, first_at = np.unique(guess, return_index=True)
    return guess[np.sort(first_at)].tolist()


def _captured(work: Callable[[], object], pool) -> torch.cuda.CUDAGraph:
    """A graph of `work` in the memory pool `pool`, after one eager warm-up run (kernels compiled outside
    the capture)."""
    work()
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin(pool=pool)
    work()
    graph.capture_end()
    return graph


@dataclass(frozen=True)
class PublishedRouting:
    """Where a captured decode step's graph writes one MoE layer's routing ids ([T, K] row-major) and the
    predictor's guess for the next layer (if any) on the host."""
    mailbox: RoutingMailbox
    routing: Region
    guess: Region | None

    def guess_on_host(self, tokens: int, top_k: int) -> np.ndarray:
        """The guess of the first `tokens` rows, k-major (every token's first choice first)."""
        return self.mailbox.read(self.guess, tokens * top_k).reshape(tokens, top_k).T.ravel()


@dataclass(frozen=True)
class CapturedStep:
    """A GEMV-sized step's expert compute captured for one decode bucket and layer (capture_compute), once per
    pinned replay table of the layer: replaying graphs[i] computes the rows of the experts tables_E[i] (the
    table's numpy view, written by the host) maps, then the step's weighted sum."""
    graphs: tuple[torch.cuda.CUDAGraph, ...]
    tables_E: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class CapturedRound:
    """A round's expert compute captured for one decode bucket and layer (capture_compute): replaying
    `graph` computes the rows of the experts `slots_E` maps to slots into `out_A1D` ([A + 1, D])."""
    graph: torch.cuda.CUDAGraph
    slots_E: torch.Tensor
    out_A1D: torch.Tensor
