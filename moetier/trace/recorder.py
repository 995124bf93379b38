"""RoutingRecorder: observes every MoE layer's Routing through fixed device buffers.

Legend: L MoE layers, R staging rows (the most tokens one step can hold), K experts per token,
T tokens of the current step, N recorded tokens.

During a step each MoE layer calls the recorder with its Routing; the recorder copies the top-k
ids and weights into rows [0, T) of its layer's staging buffer (device work only, no host sync, the
same tensors every step, so it is captured by and replays with the decode CUDA graphs). After the
step the runner calls `end_step(scheduled)`: the real rows are cloned on the device (one copy per
step, padding rows of a graph bucket dropped) and the step's token attribution (sequence id,
position, phase) is built from the schedule per sequence, not per token. Clones are moved to the
host every `flush_every` steps, and when the trace is taken. Recording never changes outputs: it
only reads the routing.
"""

import numpy as np
import torch

from moetier.trace.format import DECODE, PREFILL, RoutingTrace, expert_id_dtype


class RoutingRecorder:
    def __init__(self, moe_layers: tuple[int, ...], num_experts: int, top_k: int, max_rows: int,
                 device: torch.device | str, flush_every: int = 64):
        self.moe_layers = tuple(moe_layers)
        self.num_experts, self.top_k, self.max_rows = num_experts, top_k, max_rows
        self.flush_every = flush_every
        self._index = {layer: i for i, layer in enumerate(self.moe_layers)}
        id_dtype = torch.from_numpy(np.zeros(0, expert_id_dtype(num_experts))).dtype
        self.ids_LRK = torch.zeros(len(self.moe_layers), max_rows, top_k, dtype=id_dtype, device=device)
        self.weights_LRK = torch.zeros(len(self.moe_layers), max_rows, top_k, dtype=torch.float16, device=device)
        self._rows_T = 0  # rows the layers wrote this step (graph buckets include padding rows)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # device clones, not yet on the host
        self._ids: list[np.ndarray] = []  # host chunks [L, n, K]
        self._weights: list[np.ndarray] = []
        self._meta: list[tuple[np.ndarray, ...]] = []  # per step: seq_id, position, phase, step
        self._seq_ids: dict[str, int] = {}
        self.num_steps = 0

    def __call__(self, layer: int, routing) -> None:
        """The MoELayer observer: device copies into the staging rows, nothing else."""
        ids_TK = routing.topk_ids_TK
        rows_T = ids_TK.shape[0]
        if rows_T > self.max_rows:
            raise ValueError(f"a step of {rows_T} tokens exceeds the recorder's {self.max_rows} staging rows")
        i = self._index[layer]
        self.ids_LRK[i, :rows_T].copy_(ids_TK)
        self.weights_LRK[i, :rows_T].copy_(routing.topk_weights_TK)
        self._rows_T = rows_T

    def end_step(self, scheduled) -> None:
        """After the model ran `scheduled` (a list of ScheduledSeq, in row order, before the engine
        advances num_computed): keeps its real rows and their attribution."""
        counts = [item.num_new_tokens for item in scheduled]
        rows = sum(counts)
        if rows == 0:
            return
        self._pending.append((self.ids_LRK[:, :rows].clone(), self.weights_LRK[:, :rows].clone()))
        seq_ids = [self._seq_ids.setdefault(item.seq.request_id, len(self._seq_ids)) for item in scheduled]
        starts = np.array([item.seq.num_computed for item in scheduled], dtype=np.int64)
        prompt_lens = np.array([len(item.seq.prompt_ids) for item in scheduled], dtype=np.int64)
        counts_arr = np.array(counts, dtype=np.int64)
        offsets = np.repeat(np.cumsum(counts_arr) - counts_arr, counts_arr)
        position = np.repeat(starts, counts_arr) + np.arange(rows) - offsets
        phase = np.where(position < np.repeat(prompt_lens, counts_arr), PREFILL, DECODE).astype(np.uint8)
        self._meta.append((np.repeat(np.array(seq_ids, dtype=np.int32), counts_arr), position.astype(np.int32),
                           phase, np.full(rows, self.num_steps, dtype=np.int32)))
        self.num_steps += 1
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Moves the device clones to the host (between steps)."""
        for ids, weights in self._pending:
            self._ids.append(ids.cpu().numpy())
            self._weights.append(weights.cpu().numpy())
        self._pending.clear()

    @property
    def num_tokens(self) -> int:
        return sum(len(m[0]) for m in self._meta)

    def trace(self, model_id: str, num_layers: int, expert_bytes: int = 0) -> RoutingTrace:
        self.flush()
        L, K = len(self.moe_layers), self.top_k

        def cat(parts, shape, dtype):
            return np.concatenate(parts, axis=1) if parts else np.zeros(shape, dtype)

        meta = [np.concatenate([m[j] for m in self._meta]) if self._meta else np.zeros(0, np.int32) for j in range(4)]
        return RoutingTrace(
            model_id=model_id,
            num_layers=num_layers,
            moe_layers=np.array(self.moe_layers, dtype=np.int32),
            num_experts=self.num_experts,
            top_k=K,
            expert_bytes=expert_bytes,
            seq_id=meta[0].astype(np.int32),
            position=meta[1].astype(np.int32),
            phase=meta[2].astype(np.uint8),
            step=meta[3].astype(np.int32),
            expert_ids=cat(self._ids, (L, 0, K), expert_id_dtype(self.num_experts)),
            weights=cat(self._weights, (L, 0, K), np.float16),
        )


def attach_recorder(engine) -> RoutingRecorder:
    """A recorder sized for the engine's largest step, observing every MoE layer of its model."""
    spec = engine.source.spec
    config = engine.config
    recorder = RoutingRecorder(tuple(spec.moe_layer_ids), spec.moe.num_experts, spec.moe.top_k,
                               max(config.max_num_batched_tokens, config.max_num_seqs), engine.resolved.device)
    engine.runner.attach_recorder(recorder)
    return recorder


def engine_trace(engine, recorder: RoutingRecorder) -> RoutingTrace:
    layout = getattr(engine.executor, "layout", None)
    return recorder.trace(
        model_id=engine.config.model or engine.source.model_dir.name,
        num_layers=engine.source.spec.num_layers,
        expert_bytes=layout.slot_bytes if layout is not None else 0,
    )
