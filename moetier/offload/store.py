"""ExpertStore: the host and disk tiers. Every routed expert as one packed contiguous buffer with
the byte layout of an ExpertBank slot, so moving it to a GPU slot is one copy: the first
`host_experts` (in (layer, expert) order) in the pinned host arena, the rest in a packed expert
file in the cache directory, memory-mapped (the page cache serves repeated reads; the file is
unlinked at creation, so it disappears with the process)."""

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from moetier.moe.experts import ExpertId, ExpertLayout
from moetier.offload.arena import DEFAULT_CHUNK_BYTES, HostArena, next_power_of_two

# A chunk holds at least this many experts, so the tail a chunk cannot use stays small.
_MIN_EXPERTS_PER_CHUNK = 16


def chunk_bytes_for(layout: ExpertLayout, num_buffers: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Chunks big enough for many experts, but no bigger than the whole store needs."""
    wanted = max(chunk_bytes, next_power_of_two(_MIN_EXPERTS_PER_CHUNK * layout.slot_bytes))
    return min(wanted, next_power_of_two(num_buffers * layout.slot_bytes + 1))


class ExpertStore:
    """Host copies of the routed experts of every MoE layer; implements ExpertWeights for the loader."""

    def __init__(self, layout: ExpertLayout, moe_layers: tuple[int, ...], num_experts: int,
                 arena: HostArena | None = None, host_experts: int | None = None):
        self.layout = layout
        self.moe_layers = tuple(moe_layers)
        self.num_experts = num_experts
        experts = [ExpertId(layer, e) for layer in self.moe_layers for e in range(num_experts)]
        self.host_experts = len(experts) if host_experts is None else max(0, min(host_experts, len(experts)))
        self.arena = arena or HostArena(chunk_bytes_for(layout, max(self.host_experts, 1)))
        on_disk = experts[self.host_experts :]
        self.disk = _packed_file(len(on_disk) * layout.slot_bytes) if on_disk else None
        self.buffers: dict[ExpertId, torch.Tensor] = {}
        self.parts: dict[ExpertId, dict[str, torch.Tensor]] = {}
        for expert in experts[: self.host_experts]:
            self.buffers[expert] = self.arena.allocate(layout.slot_bytes)
        for i, expert in enumerate(on_disk):
            self.buffers[expert] = self.disk[i * layout.slot_bytes : (i + 1) * layout.slot_bytes]
        for expert, buffer in self.buffers.items():
            self.parts[expert] = layout.part_views(buffer)

    @property
    def disk_experts(self) -> int:
        return len(self.buffers) - self.host_experts

    @property
    def nbytes(self) -> int:
        return len(self.buffers) * self.layout.slot_bytes

    def expert_part(self, expert: ExpertId, part: str) -> torch.Tensor:
        return self.parts[expert][part]

    def layer_part(self, layer: int, part: str) -> torch.Tensor | None:
        return None  # one buffer per expert: the loader writes expert by expert


def expert_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moetier" / "experts"


def _packed_file(nbytes: int) -> torch.Tensor:
    """A uint8 tensor over a new memory-mapped file of nbytes in the cache directory."""
    directory = expert_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory) as f:  # unlinked now; the mapping keeps the data
        f.truncate(nbytes)
        mapping = np.memmap(f, dtype=np.uint8, mode="r+", shape=(nbytes,))
    return torch.from_numpy(mapping)
