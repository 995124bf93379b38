"""ExpertStore: the host and disk tiers. Every routed expert as one packed contiguous buffer with
the byte layout of an ExpertBank slot: the first `host_experts` (in (layer, expert) order) in the
pinned host arena, the rest in a packed expert file in the cache directory (disk.py), read with
O_DIRECT; given a disk_key, that file is built once and reused by later runs with the same key.
A host expert reaches a device slot in one copy; a disk expert is read into the next pinned
staging buffer of a small ring, then copied from there, once that buffer's previous copy has
completed (a host wait), so the disk tier holds no RAM beyond the ring."""

import time

import torch

from moetier.moe.experts import ExpertId, ExpertLayout
from moetier.offload.arena import DEFAULT_CHUNK_BYTES, HostArena, next_power_of_two
from moetier.offload.copy_engine import CopyEngine, Event
from moetier.offload.disk import BLOCK, PackedExpertFile, round_up

# A chunk holds at least this many experts, so the tail a chunk cannot use stays small.
_MIN_EXPERTS_PER_CHUNK = 16
DEFAULT_STAGING_BUFFERS = 4


def chunk_bytes_for(layout: ExpertLayout, num_buffers: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Chunks big enough for many experts, but no bigger than the whole store needs."""
    wanted = max(chunk_bytes, next_power_of_two(_MIN_EXPERTS_PER_CHUNK * layout.slot_bytes))
    return min(wanted, next_power_of_two(num_buffers * layout.slot_bytes + 1))


def staging_arena_bytes(layout: ExpertLayout, staging_buffers: int = DEFAULT_STAGING_BUFFERS) -> int:
    """The pinned bytes the staging ring of a store with disk experts reserves (one chunk)."""
    return next_power_of_two(staging_buffers * round_up(layout.slot_bytes) + BLOCK)


class ExpertStore:
    """Host and disk copies of the routed experts of every MoE layer; implements ExpertWeights for
    the loader. `buffers` holds the host tier; `parts` typed views of every expert while loading,
    of the host experts after `finish_loading`."""

    def __init__(self, layout: ExpertLayout, moe_layers: tuple[int, ...], num_experts: int,
                 arena: HostArena | None = None, host_experts: int | None = None,
                 staging_buffers: int | None = None, direct_io: bool | None = None, disk_key: str | None = None):
        """disk_key: what identifies the experts' bytes (checkpoint, dtype; see loader/load.py): the
        disk tier is then built once under that key in the cache directory and reused afterwards."""
        self.layout = layout
        self.moe_layers = tuple(moe_layers)
        self.num_experts = num_experts
        experts = [ExpertId(layer, e) for layer in self.moe_layers for e in range(num_experts)]
        self.host_experts = len(experts) if host_experts is None else max(0, min(host_experts, len(experts)))
        self.arena = arena or HostArena(chunk_bytes_for(layout, max(self.host_experts, 1)))
        self.buffers: dict[ExpertId, torch.Tensor] = {
            expert: self.arena.allocate(layout.slot_bytes) for expert in experts[: self.host_experts]
        }
        self.parts: dict[ExpertId, dict[str, torch.Tensor]] = {
            expert: layout.part_views(buffer) for expert, buffer in self.buffers.items()
        }
        self.disk_index = {expert: i for i, expert in enumerate(experts[self.host_experts :])}
        self.disk = None
        if self.disk_index:
            name = None if disk_key is None else _disk_file_name(disk_key, layout, self.host_experts, len(self.disk_index))
            self.disk = PackedExpertFile(len(self.disk_index), layout.slot_bytes, direct=direct_io, name=name)
        if self.disk is not None and not self.disk.reused:
            for expert, i in self.disk_index.items():
                self.parts[expert] = layout.part_views(self.disk.view(i))
        self.staging_arena: HostArena | None = None
        self.staging = self._staging_ring(staging_buffers or DEFAULT_STAGING_BUFFERS) if self.disk else []
        self._staging_used: list[Event | None] = [None] * len(self.staging)  # each buffer's last copy
        self._next_staging = 0
        self.disk_bytes_read = 0  # whole blocks read from the disk tier
        self.disk_read_s = 0.0

    @property
    def disk_experts(self) -> int:
        return len(self.disk_index)

    @property
    def nbytes(self) -> int:
        return (len(self.buffers) + len(self.disk_index)) * self.layout.slot_bytes

    def finish_loading(self) -> None:
        """The loader has written every expert: the disk tier syncs, unmaps and leaves the page cache
        (and, when it has a key, takes its place in the cache directory)."""
        if self.disk is None or not self.disk.writable:
            return
        for expert in self.disk_index:
            del self.parts[expert]
        self.disk.finish_writing()

    def copy_in(self, expert: ExpertId, dst: torch.Tensor, copy_engine: CopyEngine, after: Event | None,
                timed: bool = False) -> Event:
        """Starts the copy of `expert` into the device slot bytes `dst` once `after` (the slot's last
        reader) has completed; returns the copy's event (a timing one if `timed`). A disk expert is first
        read (on the host) into a staging buffer whose previous copy has completed."""
        if expert in self.buffers:
            return copy_engine.copy(dst, self.buffers[expert], after, timed)
        if self.disk.writable:
            raise RuntimeError("disk experts are read only after finish_loading")
        i = self._take_staging(copy_engine)
        start = time.perf_counter()
        self.disk.read_into(self.disk_index[expert], self.staging[i])
        self.disk_read_s += time.perf_counter() - start
        self.disk_bytes_read += self.disk.stride  # whole blocks: what the disk actually reads
        self._staging_used[i] = copy_engine.copy(dst, self.staging[i][: self.layout.slot_bytes], after, timed)
        return self._staging_used[i]

    def expert_part(self, expert: ExpertId, part: str) -> torch.Tensor | None:
        """None for an expert already in a reused disk tier: the loader has nothing to write."""
        if expert in self.disk_index and self.disk.reused:
            return None
        if expert in self.disk_index and not self.disk.writable:
            raise RuntimeError(f"{expert} is on disk and loading has finished: it is read only by copy_in")
        return self.parts[expert][part]

    def layer_part(self, layer: int, part: str) -> torch.Tensor | None:
        return None  # one buffer per expert: the loader writes expert by expert

    def _staging_ring(self, count: int) -> list[torch.Tensor]:
        """`count` block-aligned buffers of one expert in whole blocks, in one pinned chunk."""
        self.staging_arena = HostArena(staging_arena_bytes(self.layout, count), alignment=BLOCK)
        return [self.staging_arena.allocate(self.disk.stride) for _ in range(count)]

    def _take_staging(self, copy_engine: CopyEngine) -> int:
        """The next staging buffer of the ring, once its previous copy to the device has completed."""
        i = self._next_staging
        self._next_staging = (i + 1) % len(self.staging)
        if self._staging_used[i] is not None:
            copy_engine.synchronize(self._staging_used[i])
            self._staging_used[i] = None
        return i


def _disk_file_name(key: str, layout: ExpertLayout, first: int, count: int) -> str:
    """The cache file of experts first .. first + count - 1 (in (layer, expert) order) in this layout."""
    shape = f"{layout.hidden_size}x{layout.intermediate_size}-{str(layout.dtype).removeprefix('torch.')}"
    return f"{key}-{shape}{'-bias' if layout.bias else ''}-{first}+{count}"
