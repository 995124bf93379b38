"""ExpertStore: the host tier. Every routed expert as one packed contiguous buffer in the host
arena, with the byte layout of an ExpertBank slot, so moving it to a GPU slot is one copy."""

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

    def __init__(self, layout: ExpertLayout, moe_layers: tuple[int, ...], num_experts: int, arena: HostArena | None = None):
        self.layout = layout
        self.moe_layers = tuple(moe_layers)
        self.num_experts = num_experts
        count = len(self.moe_layers) * num_experts
        self.arena = arena or HostArena(chunk_bytes_for(layout, count))
        self.buffers: dict[ExpertId, torch.Tensor] = {}
        self.parts: dict[ExpertId, dict[str, torch.Tensor]] = {}
        for layer in self.moe_layers:
            for e in range(num_experts):
                expert = ExpertId(layer, e)
                self.buffers[expert] = self.arena.allocate(layout.slot_bytes)
                self.parts[expert] = layout.part_views(self.buffers[expert])

    @property
    def nbytes(self) -> int:
        return len(self.buffers) * self.layout.slot_bytes

    def expert_part(self, expert: ExpertId, part: str) -> torch.Tensor:
        return self.parts[expert][part]

    def layer_part(self, layer: int, part: str) -> torch.Tensor | None:
        return None  # one buffer per expert: the loader writes expert by expert
