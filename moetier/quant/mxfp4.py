"""MXFP4 (OCP microscaling FP4): pack float weights into blocks + scales, and dequantize them.

The layout is the one GPT-OSS checkpoints use (`*_blocks`, `*_scales` next to each other):
  blocks [..., G, 16] uint8   G blocks of 32 values along the last (contraction) axis of a row;
                              byte j of block g holds value 32g+2j in its LOW nibble and value
                              32g+2j+1 in its HIGH nibble
  scales [..., G]     uint8   one e8m0 exponent per block, biased by 127
  value = E2M1[nibble] * 2**(scale - 127)
A nibble is an e2m1 float: bit 3 sign, bits 2-1 exponent, bit 0 mantissa, so codes 0-7 are
0, 0.5, 1, 1.5, 2, 3, 4, 6 and codes 8-15 their negatives.
Legend: G blocks per row, K = 32 * G values per row.
"""

import torch

BLOCK_SIZE = 32
SCALE_BIAS = 127
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0
# Midpoints between consecutive e2m1 magnitudes; a value on one rounds to the even code.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _byte_table(device: torch.device) -> torch.Tensor:
    """[256, 2]: the two values (low nibble first) that each byte holds, at scale 2**0."""
    byte_B = torch.arange(256, device=device)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.stack((lut[byte_B & 0x0F], lut[byte_B >> 4]), dim=-1)


def dequantize_mxfp4(
    blocks_G16: torch.Tensor, scales_G: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """blocks [..., G, 16] + scales [..., G] -> values [..., 32 * G] in dtype (exact in fp32 and bf16)."""
    if blocks_G16.dtype != torch.uint8 or scales_G.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks_G16.dtype} and {scales_G.dtype}")
    if blocks_G16.shape[-1] != BLOCK_SIZE // 2 or blocks_G16.shape[:-1] != scales_G.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks_G16.shape)} do not fit scales {tuple(scales_G.shape)}")
    values_G32 = _byte_table(blocks_G16.device)[blocks_G16.long()].flatten(-2)
    values_G32 = torch.ldexp(values_G32, (scales_G.int() - SCALE_BIAS)[..., None].float())
    return values_G32.flatten(-2).to(dtype)


def quantize_mxfp4(x_K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., K] (K a multiple of 32) -> (blocks [..., K/32, 16], scales [..., K/32]), both uint8.

    Each block's scale is the smallest power of two that brings its largest magnitude to at most 6,
    so nothing saturates; values then round to the nearest e2m1 value, ties to the even code. Values
    that are e2m1 numbers times one power of two per block round-trip exactly.
    """
    if x_K.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK_SIZE}, got {x_K.shape[-1]}")
    x_G32 = x_K.double().contiguous().unflatten(-1, (-1, BLOCK_SIZE))
    mantissa_G, exponent_G = torch.frexp(x_G32.abs().amax(dim=-1) / E2M1_MAX)
    exponent_G = (exponent_G - (mantissa_G == 0.5).int()).clamp(-SCALE_BIAS, SCALE_BIAS)  # ceil(log2(amax / 6))
    y_G32 = torch.ldexp(x_G32, -exponent_G[..., None].double()).abs().clamp(max=E2M1_MAX)
    midpoints = torch.tensor(_MIDPOINTS, dtype=torch.float64, device=x_K.device)
    below, above = torch.bucketize(y_G32, midpoints), torch.bucketize(y_G32, midpoints, right=True)
    codes_G32 = torch.where(below % 2 == 1, above, below)  # on a midpoint, below != above: take the even code
    codes_G32 = codes_G32 | ((x_G32 < 0).long() << 3)
    pairs_G16x2 = codes_G32.to(torch.uint8).unflatten(-1, (-1, 2))
    blocks_G16 = pairs_G16x2[..., 0] | (pairs_G16x2[..., 1] << 4)
    return blocks_G16.contiguous(), (exponent_G + SCALE_BIAS).to(torch.uint8)
