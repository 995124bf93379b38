"""Paged KV-cache bookkeeping: fixed-size blocks handed to sequences as they grow."""

from moetier.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_blocks = list(range(num_blocks - 1, -1, -1))

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_ids))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_ids.append(self.free_blocks.pop())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(reversed(seq.block_ids))
        seq.block_ids = []

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)
