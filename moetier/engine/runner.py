"""Runner: owns the device, the model and the KV cache; turns a schedule into logits."""

import torch

from moetier.engine.batch import ForwardBatch, SeqSlice
from moetier.engine.kv_cache import KVCache
from moetier.engine.scheduler import ScheduledSeq
from moetier.models.transformer import CausalLM


class Runner:
    def __init__(self, model: CausalLM, kv_cache: KVCache, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device

    def prepare(self, scheduled: list[ScheduledSeq], all_logits: bool = False) -> ForwardBatch:
        block_size = self.kv_cache.block_size
        input_ids, positions, slots, logits_rows, slices = [], [], [], [], []
        for item in scheduled:
            seq, start = item.seq, item.seq.num_computed
            q_start = len(input_ids)
            new_positions = range(start, start + item.num_new_tokens)
            input_ids.extend(seq.all_ids[start : start + item.num_new_tokens])
            positions.extend(new_positions)
            slots.extend(seq.block_ids[p // block_size] * block_size + p % block_size for p in new_positions)
            if all_logits:
                logits_rows.extend(range(q_start, q_start + item.num_new_tokens))
            elif item.samples:
                logits_rows.append(q_start + item.num_new_tokens - 1)
            block_table = torch.tensor(seq.block_ids, dtype=torch.int64, device=self.device)
            slices.append(SeqSlice(q_start, item.num_new_tokens, start + item.num_new_tokens, block_table))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=self.device)  # noqa: E731
        return ForwardBatch(
            input_ids_T=as_tensor(input_ids),
            positions_T=as_tensor(positions),
            slot_mapping_T=as_tensor(slots),
            seqs=tuple(slices),
            logits_indices=as_tensor(logits_rows),
        )

    def run(self, scheduled: list[ScheduledSeq], all_logits: bool = False) -> torch.Tensor:
        """Logits [rows, vocab] in fp32: one row per sampling sequence, or every row if all_logits."""
        return self.model(self.prepare(scheduled, all_logits), self.kv_cache.layers)
