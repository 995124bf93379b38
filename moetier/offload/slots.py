"""SlotPool: the GPU tier. One ExpertBank of S slots shared by every MoE layer, the per-layer
expert -> slot tables on the device for dispatch (with their host mirrors), and per slot the
events that order refills: the copy that filled it and the last kernel that read it. Which expert
goes where is decided by the SlotPlanner (offload/planner.py).
"""

import numpy as np
import torch

from moetier.moe.experts import ExpertBank, ExpertId, ExpertLayout
from moetier.offload.copy_engine import Event


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
        self.last_read: list[Event | None] = [None] * num_slots
        self.filled: list[Event | None] = [None] * num_slots  # the copy into the slot, until compute waited on it
        self._dirty: set[int] = set()

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

    def device_table(self, layer: int) -> torch.Tensor:
        """The layer's expert -> slot table (int64 [E], -1 when absent) on the device, up to date."""
        if layer in self._dirty:
            # A fresh pinned copy per update: the copy is truly asynchronous (a pageable source would
            # block the host until the stream got there) and the caching host allocator reuses its
            # block only after the copy completed, so the host may edit its mirror right away.
            table = torch.from_numpy(self.host_tables[layer])
            self.tables[layer].copy_(table.pin_memory() if self.tables[layer].is_cuda else table, non_blocking=True)
            self._dirty.discard(layer)
        return self.tables[layer]
