"""Packed expert storage: one contiguous run of bytes per expert, S of them in a bank.

Each expert is one contiguous run of bytes (gate_up, down, optional biases), so moving an expert
between tiers is a single copy. An ExpertBank is S such slots in one raw byte buffer with typed
views; the resident run is a bank holding every expert of a layer.
Legend: S slots, N tokens routed to one expert, D hidden, F expert intermediate size.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Protocol

import torch


_ALIGN_BYTES = 256


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN_BYTES) * _ALIGN_BYTES


@dataclass(frozen=True)
class ExpertLayout:
    """Byte layout of one packed expert (its derived sizes cached: they are read on every copy)."""

    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype
    bias: bool

    @cached_property
    def part_shapes(self) -> dict[str, tuple[int, ...]]:
        d, f = self.hidden_size, self.intermediate_size
        shapes = {"gate_up": (2 * f, d), "down": (d, f)}
        if self.bias:
            shapes |= {"gate_up_bias": (2 * f,), "down_bias": (d,)}
        return shapes

    @cached_property
    def part_offsets(self) -> dict[str, int]:
        offsets, offset = {}, 0
        for name, shape in self.part_shapes.items():
            offsets[name] = offset
            offset += _aligned(self.dtype.itemsize * torch.Size(shape).numel())
        return offsets

    @cached_property
    def slot_bytes(self) -> int:
        name, shape = list(self.part_shapes.items())[-1]
        return self.part_offsets[name] + _aligned(self.dtype.itemsize * torch.Size(shape).numel())

    def part_views(self, bytes_XB: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of packed experts: uint8 [..., slot_bytes] -> {part: [..., *part_shape]}."""
        lead = bytes_XB.shape[:-1]
        elems_XB = bytes_XB.view(self.dtype)
        views = {}
        for name, shape in self.part_shapes.items():
            start = self.part_offsets[name] // self.dtype.itemsize
            views[name] = elems_XB[..., start : start + torch.Size(shape).numel()].view(*lead, *shape)
        return views


class ExpertId(NamedTuple):
    """One routed expert of one MoE layer: the identity every tier, policy and trace uses."""

    layer: int
    expert: int


class _LayerExpertIds(dict):
    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def __missing__(self, expert: int) -> ExpertId:
        made = self[expert] = ExpertId(self.layer, expert)
        return made


class _ExpertIds(dict):
    def __missing__(self, layer: int) -> _LayerExpertIds:
        row = self[layer] = _LayerExpertIds(layer)
        return row


# EXPERT_IDS[layer][expert]: that expert's ExpertId, made once when first asked for. The offload path names
# ~50 experts a batch-1 layer step; making an ExpertId costs ~0.4 us, looking one up here ~0.05.
EXPERT_IDS: dict[int, dict[int, ExpertId]] = _ExpertIds()


class ExpertWeights(Protocol):
    """Where the loader and dummy init write routed experts (resident banks or the offload store)."""

    layout: ExpertLayout
    num_experts: int
    moe_layers: tuple[int, ...]

    def expert_part(self, expert: ExpertId, part: str) -> torch.Tensor | None:
        """One expert's part, shaped layout.part_shapes[part]; None where the expert is already
        stored (a reused disk tier): the loader skips it."""
        ...

    def layer_part(self, layer: int, part: str) -> torch.Tensor | None:
        """All experts' part as one [E, ...] tensor, or None where experts are stored separately."""
        ...

    def finish_loading(self) -> None:
        """Called once every expert is written; from then on only the executor reads them."""
        ...


class ExpertBank:
    """S packed expert slots in one raw byte buffer, with a typed [S, ...] view per part."""

    def __init__(self, num_slots: int, layout: ExpertLayout, device: torch.device | str):
        self.layout = layout
        self.bytes_SB = torch.empty(num_slots, layout.slot_bytes, dtype=torch.uint8, device=device)
        self.parts: dict[str, torch.Tensor] = layout.part_views(self.bytes_SB)

    @property
    def num_slots(self) -> int:
        return self.bytes_SB.shape[0]
