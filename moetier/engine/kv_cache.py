"""The paged KV cache: per layer, one preallocated [num_blocks, block_size, ...] tensor per cached entry.

GQA layers cache K and V ([K, D] each per token); MLA layers cache one latent vector per token.
"""

import torch


class KVCache:
    def __init__(
        self,
        token_shapes: list[tuple[tuple[int, ...], ...]],
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layers = [
            tuple(torch.zeros(num_blocks, block_size, *shape, dtype=dtype, device=device) for shape in shapes)
            for shapes in token_shapes
        ]
