"""ForwardBatch: what the runner hands the model for one step (a ragged batch of sequences).

Tokens of all scheduled sequences are flattened into T rows; each sequence contributes a
contiguous slice of q_len new tokens that attend to its ctx_len cached-plus-new tokens.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqSlice:
    q_start: int  # first row of this sequence in the flat token batch
    q_len: int  # new tokens this step
    ctx_len: int  # tokens in the KV cache after this step (cached + new)
    block_table: torch.Tensor  # [num_blocks] int64 on the model's device


@dataclass(frozen=True)
class DecodeMeta:
    """Tensor-only view of a pure decode step (one new token per sequence) for the paged-decode kernel,
    so the step needs no per-sequence Python and can be captured in a CUDA graph."""

    block_tables_BM: torch.Tensor  # int32, rows padded to the longest table
    ctx_lens_B: torch.Tensor  # int32


@dataclass(frozen=True)
class ForwardBatch:
    input_ids_T: torch.Tensor
    positions_T: torch.Tensor
    slot_mapping_T: torch.Tensor  # flat KV-cache slot (block * block_size + offset) per token
    seqs: tuple[SeqSlice, ...]
    logits_indices: torch.Tensor  # rows whose logits are wanted (last token per sampled sequence)
    decode: DecodeMeta | None = None  # set by the runner when the decode kernel serves this step
