"""Sequence: one request's tokens and progress (CPU bookkeeping only)."""

from dataclasses import dataclass, field
from enum import Enum

from moetier.sampling_params import SamplingParams


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    text: str = ""  # detokenized output, stop strings cut
    emitted_chars: int = 0  # how much of `text` has been streamed
    detok_prefix: int = 0  # incremental detokenization window over output_ids: [prefix, read) decoded last
    detok_read: int = 0
    stop_search_from: int = 0  # stop strings can only start at or after this index of `text`
    logprobs: list[dict] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def kv_slot(self, position: int, block_size: int) -> int:
        """The flat KV-cache slot (block * block_size + offset) holding this sequence's token at position."""
        return self.block_ids[position // block_size] * block_size + position % block_size

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
