"""HostArena: host memory for expert copies, in a few large chunks sub-allocated with alignment.

PyTorch's pinned allocator rounds every allocation up to a power of two, so one pinned tensor per
expert would waste up to half the memory; the arena pins a few power-of-two chunks instead and
hands out aligned byte ranges of them. Without CUDA the chunks are plain (pageable) memory.
"""

import torch

DEFAULT_CHUNK_BYTES = 256 << 20
DEFAULT_ALIGNMENT = 256


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class HostArena:
    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, alignment: int = DEFAULT_ALIGNMENT, pin: bool | None = None):
        if chunk_bytes < 1 or alignment < 1 or alignment & (alignment - 1):
            raise ValueError("chunk_bytes must be positive and alignment a power of two")
        self.chunk_bytes = next_power_of_two(chunk_bytes)
        self.alignment = alignment
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.chunks: list[torch.Tensor] = []
        self._offset = 0  # first free byte of the last chunk
        self.used_bytes = 0

    @property
    def reserved_bytes(self) -> int:
        return sum(chunk.numel() for chunk in self.chunks)

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A uint8 [nbytes] view into a chunk, starting at an aligned address; never shared."""
        if nbytes < 1:
            raise ValueError("allocate at least one byte")
        start = self._aligned_start()
        if start is None or start + nbytes > self.chunks[-1].numel():
            self._new_chunk(max(self.chunk_bytes, next_power_of_two(nbytes + self.alignment)))
            start = self._aligned_start()
        self._offset = start + nbytes
        self.used_bytes += nbytes
        return self.chunks[-1][start : start + nbytes]

    def _aligned_start(self) -> int | None:
        if not self.chunks:
            return None
        address = self.chunks[-1].data_ptr() + self._offset
        return self._offset + (-address % self.alignment)

    def _new_chunk(self, nbytes: int) -> None:
        self.chunks.append(torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin))
        self._offset = 0
