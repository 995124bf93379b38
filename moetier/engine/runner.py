"""Runner: owns the device, the model and the KV cache; turns a schedule into logits.

On CUDA with a GQA model, pure decode steps use the paged-decode kernel and replay CUDA graphs:
whole steps when the expert executor needs no host sync, else the pieces between its calls;
everything else (prefill chunks, mixed steps, CPU) runs the model eagerly.
"""

import contextlib
import gc
from collections.abc import Iterator

import torch

from moetier.engine.batch import DecodeMeta, ForwardBatch, SeqSlice
from moetier.engine.cuda_graphs import DecodeGraphs, PiecewiseDecodeGraphs
from moetier.engine.kv_cache import KVCache
from moetier.engine.scheduler import ScheduledSeq
from moetier.kernels import paged_decode
from moetier.models.transformer import CausalLM
from moetier.moe.layer import MoELayer


def _is_decode(scheduled: list[ScheduledSeq]) -> bool:
    return all(item.num_new_tokens == 1 and item.samples for item in scheduled)


class Runner:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        device: torch.device,
        max_batch: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        cuda_graphs: bool,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.decode_kernel = (
            device.type == "cuda" and model.spec.attention.kind == "gqa" and paged_decode.triton is not None
        )
        self.graphs = None
        self._graph_args = (max_batch, max_blocks_per_seq, scratch_block)
        if cuda_graphs and self.decode_kernel:
            self.graphs = self._capture_graphs()
        self.recorder = None  # a routing recorder: MoE layers write to it, run() closes each step

    def attach_recorder(self, recorder) -> None:
        """Makes every MoE layer report its routing to `recorder` (a MoELayer observer with an
        end_step(scheduled) method; None: to none); decode graphs are captured again so that they include it."""
        for module in self.model.modules():
            if isinstance(module, MoELayer):
                module.observer = recorder
        self.recorder = recorder
        self.recapture_graphs()

    def recapture_graphs(self) -> None:
        """After the model's step changed (an observer or a routing override was attached)."""
        if self.graphs is not None:
            # The old graphs' pools go back before the new ones are taken: under a budget's
            # allocator cap there may be no room for both.
            self.graphs = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.graphs = self._capture_graphs()

    def _capture_graphs(self) -> DecodeGraphs:
        graphs = DecodeGraphs if self.model.executor.sync_free else PiecewiseDecodeGraphs
        with _collector_settled():
            return graphs(self.model, self.kv_cache, *self._graph_args)

    def prepare(self, scheduled: list[ScheduledSeq], all_logits: bool = False) -> ForwardBatch:
        block_size = self.kv_cache.block_size
        input_ids, positions, slots, logits_rows, slices = [], [], [], [], []
        for item in scheduled:
            seq, start = item.seq, item.seq.num_computed
            q_start = len(input_ids)
            new_positions = range(start, start + item.num_new_tokens)
            input_ids.extend(seq.all_ids[start : start + item.num_new_tokens])
            positions.extend(new_positions)
            slots.extend(seq.kv_slot(p, block_size) for p in new_positions)
            if all_logits:
                logits_rows.extend(range(q_start, q_start + item.num_new_tokens))
            elif item.samples:
                logits_rows.append(q_start + item.num_new_tokens - 1)
            block_table = torch.tensor(seq.block_ids, dtype=torch.int64, device=self.device)
            slices.append(SeqSlice(q_start, item.num_new_tokens, start + item.num_new_tokens, block_table))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=self.device)  # noqa: E731
        decode = None
        if self.decode_kernel and not all_logits and _is_decode(scheduled):
            width = max(len(item.seq.block_ids) for item in scheduled)
            tables = [item.seq.block_ids + [0] * (width - len(item.seq.block_ids)) for item in scheduled]
            decode = DecodeMeta(
                torch.tensor(tables, dtype=torch.int32, device=self.device),
                torch.tensor([s.ctx_len for s in slices], dtype=torch.int32, device=self.device),
            )
        return ForwardBatch(
            input_ids_T=as_tensor(input_ids),
            positions_T=as_tensor(positions),
            slot_mapping_T=as_tensor(slots),
            seqs=tuple(slices),
            logits_indices=as_tensor(logits_rows),
            decode=decode,
        )

    def run(self, scheduled: list[ScheduledSeq], all_logits: bool = False) -> torch.Tensor:
        """Logits [rows, vocab] in fp32: one row per sampling sequence, or every row if all_logits."""
        if self.graphs is not None and not all_logits and _is_decode(scheduled) and len(scheduled) <= self.graphs.max_batch:
            logits = self.graphs.run(scheduled)
        else:
            logits = self.model(self.prepare(scheduled, all_logits), self.kv_cache.layers)
        if self.recorder is not None:
            self.recorder.end_step(scheduled)
        return logits


@contextlib.contextmanager
def _collector_settled() -> Iterator[None]:
    """Python's cycle collector off while graphs are captured (after one collection): objects it would free
    meanwhile, such as an old engine's CUDA events, call CUDA functions that a capture forbids, and the
    capture fails (seen on the device H100 with several offloaded engines made in one process). After the
    capture every object alive leaves the collector's generations (gc.freeze), so a full collection in the
    decode loop scans only what came since, not the ~200k objects of torch, transformers and the model: else
    one pauses a decode step ~220 ms every ~100 steps (benchmarks/step_times.py on the device H100). Unfrozen
    before the collection, so that an engine dropped since the last capture is collected then."""
    gc.unfreeze()
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
