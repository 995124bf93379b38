"""SlotPool: the GPU tier. One ExpertBank of S slots shared by every MoE layer, the per-layer
expert -> slot tables on the device for dispatch (with their host mirrors, and pinned ones that captured
steps read), and per slot the events that order refills: the copy that filled it and the last kernel that
read it. Which expert goes where is decided by the SlotPlanner (offload/planner.py).
"""

from collections.abc import Callable

import numpy as np
import torch

from moetier.moe.experts import ExpertBank, ExpertId, ExpertLayout
from moetier.offload.copy_engine import Event, current_stream


class SlotPool:
    def __init__(self, num_slots: int, layout: ExpertLayout, moe_layers: tuple[int, ...], num_experts: int,
                 device: torch.device):
        if num_slots < 1:
            raise ValueError("the slot pool needs at least one slot")
        self.bank = ExpertBank(num_slots, layout, device)
        self.slot_bytes_S = list(self.bank.bytes_SB.unbind(0))  # one packed destination per slot
        # numpy: with torch tensors, assign (two element writes) took ~17 us a call under cProfile on the device machine
        self.host_tables = {layer: np.full(num_experts, -1, dtype=np.int64) for layer in moe_layers}
        self.tables = {layer: torch.full((num_experts,), -1, dtype=torch.int64, device=device) for layer in moe_layers}
        # the tables that the captured GEMV-sized steps read from pinned host memory, two a layer (a step may
        # replay its graphs of both before either runs: OffloadedExecutor._replay_step), written before each replay
        replay_L2E = torch.full((len(moe_layers), 2, num_experts), -1, dtype=torch.int64,
                                pin_memory=device.type == "cuda")
        self.replay_tables = {layer: tables_2E.unbind(0) for layer, tables_2E in zip(moe_layers, replay_L2E)}
        self.last_read: list[Event | None] = [None] * num_slots
        self.filled: list[Event | None] = [None] * num_slots  # the copy into the slot, until compute waited on it
        self._dirty: set[int] = set()
        # every table upload: whole layers', replays' and the rounds' (a dozen a layer in wide steps), so a row
        # comes round again only after several layers, long after its copy ran
        self._uploads = TableUploads(num_experts, device, rows=128)

    @property
    def num_slots(self) -> int:
        return self.bank.num_slots

    def assign(self, slot: int, expert: ExpertId, evicted: ExpertId | None, filled: Event) -> None:
        """Records that `slot` now holds `expert` instead of `evicted`; its copy completes at `filled`."""
        if evicted is not None:
            self.release(evicted)
        self.host_tables[expert.layer][expert.expert] = slot
        self._dirty.add(expert.layer)
        self.filled[slot] = filled

    def release(self, expert: ExpertId) -> None:
        """Records that `expert` left its slot (the slot keeps its last reader: a refill waits for it)."""
        self.host_tables[expert.layer][expert.expert] = -1
        self._dirty.add(expert.layer)

    def table_of(self, layer: int, experts: list[int], absent: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """An expert -> slot table on the device holding the slots of `experts` alone, `absent` for every other
        expert (a new tensor, or copied `into` one): a round's, or a replay's that computes those experts."""
        row_E, upload = self._uploads.next_row()
        self.write_table(row_E, layer, experts, absent)
        return upload(into)

    def write_table(self, row_E: np.ndarray, layer: int, experts: list[int], absent: int) -> None:
        """Writes into row_E the slots of `experts` alone, `absent` for every other expert."""
        row_E.fill(absent)
        row_E[experts] = self.host_tables[layer][experts]

    def device_table(self, layer: int) -> torch.Tensor:
        """The layer's expert -> slot table (int64 [E], -1 when absent) on the device, up to date."""
        if layer in self._dirty:
            # Through a pinned row (a pageable source would block the host until the stream got there),
            # so the host may edit its mirror right away.
            row_E, upload = self._uploads.next_row()
            row_E[:] = self.host_tables[layer]
            upload(self.tables[layer])
            self._dirty.discard(layer)
        return self.tables[layer]


class TableUploads:
    """Small int64 tables to the device, asynchronously, from the rows of one pinned buffer in turn (a pinned
    copy per upload, pin_memory(), cost ~100 us of host time a round on the device H100); a row is written
    again once the copy out of it completed (`rows` uploads later, so the host hardly ever waits)."""

    def __init__(self, width: int, device: torch.device, rows: int = 64):
        self.device = device
        host_RW = torch.empty((rows, width), dtype=torch.int64, pin_memory=device.type == "cuda")
        # each row's tensor and numpy view made once (indexing and .numpy() cost host time every upload)
        self.rows_W = list(host_RW.unbind(0))
        self.rows_np = [row.numpy() for row in self.rows_W]
        self.copied: list[torch.cuda.Event | None] = [None] * rows  # made once per row, recorded again
        self._next = 0
        if device.type == "cuda":
            self.device_index = device.index if device.index is not None else torch.cuda.current_device()

    def next_row(self) -> tuple[np.ndarray, Callable[[torch.Tensor | None], torch.Tensor]]:
        """A row to write the table into, and the call that then uploads it: into the device tensor given,
        or a new one."""
        row = self._next
        self._next = (row + 1) % len(self.copied)
        if self.copied[row] is not None:
            self.copied[row].synchronize()
        return self.rows_np[row], lambda into: self._upload(row, into)

    def _upload(self, row: int, into: torch.Tensor | None) -> torch.Tensor:
        source_W = self.rows_W[row]
        if self.device.type != "cuda":  # a copy: the row is written again later
            table = source_W.to(self.device, copy=True)
            return table if into is None else into.copy_(table)
        table = torch.empty(source_W.shape[0], dtype=torch.int64, device=self.device) if into is None else into
        table.copy_(source_W, non_blocking=True)
        if self.copied[row] is None:
            self.copied[row] = torch.cuda.Event()
        self.copied[row].record(current_stream(self.device_index))
        return table
