"""CUDA graphs for decode: one captured forward per batch-size bucket (in a few pieces), replayed each step.

The graphs read static input buffers (token ids, positions, KV slots, block tables, context
lengths); a step copies its inputs in and replays the smallest bucket that holds the batch.
Padding rows point at a scratch KV block, so they never touch a real sequence's cache.

An expert executor that reads the routing on the host (offloading) cannot be captured; for it,
PiecewiseDecodeGraphs captures each bucket's step as one graph per stretch between expert calls
(attention, norms, router, shared experts) and runs the executor eagerly between the replays. For the
offloaded executor each stretch also ends with its predictor's guess for the next MoE layer, and each
expert call gets graphs of its own that the executor replays (OffloadedExecutor.capture_compute): at
GEMV sizes the whole call, once the step's experts are resident; at grouped sizes one round, replayed
for each round of the step. Each stretch writes its routing (and guess) into pinned host memory, where
the executor polls for it (kernels/routing_mailbox.py), and a kernel after it copies the layer's first
missed expert into the slot the executor named before the launch (kernels/first_copy.py; GEMV-sized buckets,
small experts: executor.FIRST_COPY_MAX_BYTES). What stays eager
is the routing read, the slot planning and the other copies.
"""

import torch

from moetier.engine.batch import DecodeMeta, ForwardBatch
from moetier.engine.kv_cache import KVCache
from moetier.engine.scheduler import ScheduledSeq
from moetier.kernels import routing_mailbox
from moetier.kernels.first_copy import FirstMissCopy
from moetier.kernels.routing_mailbox import RoutingMailbox
from moetier.models.transformer import CausalLM
from moetier.moe.grouped import GEMV_MAX_TOKENS
from moetier.moe.layer import MoELayer
from moetier.moe.router import Routing
from moetier.offload.executor import CapturedRound, CapturedStep, OffloadedExecutor, PublishedRouting

_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# A step's graph is captured in this many pieces of consecutive layers, launched back to back: the
# GPU starts on the first while the host launches the rest. (Launching one graph of ~650 kernels,
# the Qwen3-30B-A3B shape's step, took ~0.35 ms of host time; benchmarks/graph_pieces.py.)
GRAPH_PIECES = 4


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_cache: KVCache, max_batch: int, max_blocks_per_seq: int, scratch_block: int):
        self.model = model
        self.kv_cache = kv_cache
        self.scratch_block = scratch_block
        self.buckets = sorted({b for b in _BUCKETS if b < max_batch} | {max_batch})
        device = kv_cache.layers[0][0].device
        block_size = kv_cache.block_size
        # The step's inputs in two device buffers, each filled by one copy from its pinned twin (five
        # pageable copies cost ~0.25 ms of host time per step, the GPU idle meanwhile):
        # rows of [ids | positions | KV slots] (int64), and [context lengths | block tables] (int32),
        # each part contiguous (the kernels index them flat); a step copies the context lengths and
        # its rows of the tables, a prefix of the int32 buffer.
        width = max_blocks_per_seq
        self.host64 = torch.zeros(3, max_batch, dtype=torch.int64).pin_memory()
        self.host32 = torch.zeros(max_batch * (1 + width), dtype=torch.int32).pin_memory()
        self.inputs64 = torch.zeros(3, max_batch, dtype=torch.int64, device=device)
        self.inputs32 = torch.zeros(max_batch * (1 + width), dtype=torch.int32, device=device)
        self.input_ids, self.positions, self.slots = self.inputs64.unbind(0)
        self.ctx_lens, self.tables = self.inputs32[:max_batch], self.inputs32[max_batch:].view(max_batch, width)
        self.slots.fill_(scratch_block * block_size)
        self.tables.fill_(scratch_block)
        self.ctx_lens.fill_(1)
        # Every tensor a graph reads must outlive the capture: a freed one's memory gets reused.
        self.rows = torch.arange(max_batch, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture(device)

    def _batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids_T=self.input_ids[:size],
            positions_T=self.positions[:size],
            slot_mapping_T=self.slots[:size],
            seqs=(),
            logits_indices=self.rows[:size],
            decode=DecodeMeta(self.tables[:size], self.ctx_lens[:size]),
        )

    def _capture(self, device: torch.device) -> None:
        """Per bucket, the step's graph in GRAPH_PIECES pieces of consecutive layers (one pool for all)."""
        layers = self.model.model.layers
        cuts = {round(i * len(layers) / GRAPH_PIECES) for i in range(1, GRAPH_PIECES)}
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            batch = self._batch(size)
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            pieces: list[torch.cuda.CUDAGraph] = []

            def begin_piece(*_) -> None:
                if pieces:
                    pieces[-1].capture_end()
                pieces.append(torch.cuda.CUDAGraph())
                pieces[-1].capture_begin(pool=pool)

            with torch.cuda.stream(stream):
                self.model(batch, self.kv_cache.layers)  # warm-up: kernels compiled, caches filled
                torch.cuda.synchronize(device)
                hooks = [layers[i].register_forward_pre_hook(begin_piece) for i in sorted(cuts)]
                try:
                    begin_piece()
                    self.logits[size] = self.model(batch, self.kv_cache.layers)
                    pieces[-1].capture_end()
                finally:
                    for hook in hooks:
                        hook.remove()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graphs[size] = pieces

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def run(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        size = self._load_inputs(scheduled)
        return self._replay(size, len(scheduled))

    def _replay(self, size: int, n: int) -> torch.Tensor:
        for piece in self.graphs[size]:
            piece.replay()
        return self.logits[size][:n]

    def _load_inputs(self, scheduled: list[ScheduledSeq]) -> int:
        """Copies the step's inputs into the static buffers; returns the bucket that holds it. The
        pinned sources are free to refill: the last step's copies finished before its tokens were read."""
        n = len(scheduled)
        size = next(b for b in self.buckets if b >= n)
        block_size = self.kv_cache.block_size
        width = self.tables.shape[1]
        max_batch = self.max_batch
        ids_B, positions_B, slots_B = self.host64[:, :size].numpy()
        ctx_B = self.host32[:size].numpy()
        tables_BW = self.host32[max_batch : max_batch + size * width].view(size, width).numpy()
        ids_B[n:], positions_B[n:], slots_B[n:] = 0, 0, self.scratch_block * block_size  # padding rows
        ctx_B[:] = 1
        tables_BW[:] = self.scratch_block
        for row, item in enumerate(scheduled):
            seq = item.seq
            pos = seq.num_computed
            ids_B[row] = seq.all_ids[pos]
            positions_B[row] = pos
            slots_B[row] = seq.kv_slot(pos, block_size)
            tables_BW[row, : len(seq.block_ids)] = seq.block_ids
            ctx_B[row] = pos + 1
        self.inputs64.copy_(self.host64, non_blocking=True)
        prefix = max_batch + size * width
        self.inputs32[:prefix].copy_(self.host32[:prefix], non_blocking=True)
        return size


class _ExpertCall:
    """One expert call of a captured step: its inputs (outputs of the graph before it), the static
    buffer the next graph reads its result from, and for the offloaded executor the predictor's guess
    (enqueued by the graph before), where that graph publishes the routing and the guess on the host,
    and what capture_compute captured of the call's expert compute."""

    def __init__(self, layer: int, x_TD: torch.Tensor, routing: Routing, y_TD: torch.Tensor,
                 guess_TK: torch.Tensor | None, published: PublishedRouting | None):
        self.layer, self.x_TD, self.routing, self.y_TD, self.guess_TK = layer, x_TD, routing, y_TD, guess_TK
        self.published = published
        self.compute: CapturedStep | CapturedRound | None = None


class _GraphBreaks:
    """Stands in for the expert executor while a step is captured: at each expert call it publishes the
    routing to the host (with a mailbox), enqueues the predictor's guess (if any) and publishes it too,
    ends the graph being captured, starts the next one, and hands back an (uninitialised) static output.
    The routing is published before the predictor runs: the host plans and copies while it does."""

    sync_free = True

    def __init__(self, pool, predictor, mailbox: RoutingMailbox | None, first_copy: FirstMissCopy | None):
        self.pool = pool
        self.predictor = predictor
        self.mailbox = mailbox
        self.first_copy = first_copy  # with the mailbox: each layer's first miss copied right after its routing
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.calls: list[_ExpertCall] = []

    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self.graphs.append(graph)

    def run(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        routing_region = None if self.mailbox is None else self.mailbox.publish(routing.topk_ids_TK)
        if routing_region is not None and self.first_copy is not None:
            self.first_copy.capture(layer, routing.topk_ids_TK)
        guess_TK = None if self.predictor is None else self.predictor.predict(layer, x_TD)
        published = None
        if routing_region is not None:
            guess_region = None if guess_TK is None else self.mailbox.publish(guess_TK)
            published = PublishedRouting(self.mailbox, routing_region, guess_region)
        self.graphs[-1].capture_end()
        self.begin()
        y_TD = torch.empty_like(x_TD)  # no kernel: the replay fills it before the next graph runs
        self.calls.append(_ExpertCall(layer, x_TD, routing, y_TD, guess_TK, published))
        return y_TD


class PiecewiseDecodeGraphs(DecodeGraphs):
    """Decode graphs around an executor that syncs: per bucket, the graphs between expert calls.
    The executor sees the rows of real sequences only, so padding rows cost no expert copies."""

    def _capture(self, device: torch.device) -> None:
        self.executor = self.model.executor
        self.offloaded = isinstance(self.executor, OffloadedExecutor)
        self.calls: dict[int, list[_ExpertCall]] = {}  # self.graphs[size]: the pieces, in order
        self.mailboxes: dict[int, RoutingMailbox] = {}  # where each size's pieces publish their routing
        pool = torch.cuda.graph_pool_handle()
        # The expert-compute graphs replay between the pieces, not in capture order: in the pieces' pool
        # their temporaries would reuse blocks that a piece freed but the next piece still reads
        # (the residual stream passed between layers).
        compute_pool = torch.cuda.graph_pool_handle()
        moe_layers = [m for m in self.model.modules() if isinstance(m, MoELayer)]
        # made (its kernel compiled) before any capture
        self.first_copy = self.executor.first_miss_copy() if self.offloaded and routing_mailbox.triton else None
        for size in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            batch = self._batch(size)
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self.model(batch, self.kv_cache.layers)  # warm-up with the real executor
                torch.cuda.synchronize(device)
                mailbox = self._mailbox(size, len(moe_layers), device)
                if mailbox is not None:
                    self.mailboxes[size] = mailbox
                breaks = _GraphBreaks(pool, self.executor.predictor if self.offloaded else None, mailbox,
                                      self._first_copy_in(size))
                for layer in moe_layers:
                    layer.executor = breaks
                try:
                    breaks.begin()
                    self.logits[size] = self.model(batch, self.kv_cache.layers)
                    breaks.graphs[-1].capture_end()
                finally:
                    for layer in moe_layers:
                        layer.executor = self.executor
                if self.offloaded:
                    with torch.inference_mode():  # the calls' tensors are the pieces' (inference) outputs
                        for call in breaks.calls:
                            call.compute = self.executor.capture_compute(call.layer, call.x_TD, call.routing,
                                                                         call.y_TD, compute_pool)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graphs[size], self.calls[size] = breaks.graphs, breaks.calls

    def _mailbox(self, size: int, moe_layers: int, device: torch.device) -> RoutingMailbox | None:
        """Room for each MoE layer's routing and guess at this size, for the offloaded executor (which reads
        them on the host) where Triton writes them."""
        if not self.offloaded or routing_mailbox.triton is None:
            return None
        return RoutingMailbox(2 * moe_layers * size * self.executor.spec.top_k, device)

    def _first_copy_in(self, size: int) -> FirstMissCopy | None:
        """The first-miss kernels of this size's pieces: at GEMV sizes, after a mailbox's routing."""
        return self.first_copy if size in self.mailboxes and size <= GEMV_MAX_TOKENS else None

    @torch.inference_mode()  # the pieces' outputs are inference tensors; the executor writes them
    def _replay(self, size: int, n: int) -> torch.Tensor:
        pieces, calls = self.graphs[size], self.calls[size]
        first_copy = self._first_copy_in(size) is not None
        if size in self.mailboxes:
            self.mailboxes[size].arm()  # before the launches that publish into it
        for i, graph in enumerate(pieces):
            if i:
                y_TD = self._run_experts(calls[i - 1], n, size)
                if y_TD is not None:
                    calls[i - 1].y_TD[:n].copy_(y_TD)
                    if n < size:
                        calls[i - 1].y_TD[n:].zero_()  # padding rows: finite values, never read by a real row
            if first_copy and i < len(calls):  # this piece routes calls[i]'s layer
                self.executor.command_first_copy(calls[i].layer, n * self.executor.spec.top_k)
            graph.replay()
        return self.logits[size][:n]

    def _run_experts(self, call: _ExpertCall, n: int, size: int) -> torch.Tensor | None:
        """The executor on the real rows; None when the call's compute graph wrote them (used only for a
        full bucket: padding rows would read slots that no reader event covers)."""
        if n == size:  # the captured tensors as they are (four slices cost ~6 us of host time a layer)
            x_TD, routing, guess_TK = call.x_TD, call.routing, call.guess_TK
        else:
            x_TD, routing = call.x_TD[:n], Routing(call.routing.topk_ids_TK[:n], call.routing.topk_weights_TK[:n])
            guess_TK = None if call.guess_TK is None else call.guess_TK[:n]
        if not self.offloaded:
            return self.executor.run(call.layer, x_TD, routing)
        return self.executor.run(call.layer, x_TD, routing, guess_TK, call.compute if n == size else None,
                                 call.published)
