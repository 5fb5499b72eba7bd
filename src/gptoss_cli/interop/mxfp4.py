"""MXFP4 decoding for the released gpt-oss expert weights (openai/gpt-oss `gpt_oss/torch/weights.py`;
transformers `integrations/mxfp4.py` decodes the same layout).

Only the MoE matrices are quantised. A weight of logical shape (E, rows, cols) is stored as
    blocks  uint8 (E, rows, cols/32, 16)   two FP4 (e2m1) codes per byte, low nibble first
    scales  uint8 (E, rows, cols/32)       one shared power-of-two exponent per 32 values, bias 127
and decodes to  value = LUT[code] * 2^(scale - 127). The blocks run along the input dimension, so the
decoded tensor is already in our (openai) layout: mlp1 (E, 2I, H), mlp2 (E, H, I). HF transposes it to
its in x out layout afterwards; we do not.
"""

from __future__ import annotations

import torch

# e2m1 code -> value; codes 8..15 are the negatives of 0..7 (code 8 is -0).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
SCALE_BIAS = 127


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks (..., G, 16) uint8, scales (..., G) uint8 -> (..., G*32) in `dtype`.

    Every e2m1 value times a power of two is exact in bf16 (2 mantissa bits), so bf16 loses nothing.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"expected uint8 blocks and scales, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair up "
            f"(expected blocks = scales + ({BLOCK // 2},))"
        )
    if blocks.dim() > 2:  # one leading slice (expert) at a time: the int64 codes are 16x the packed bytes
        return torch.stack([dequantize(b, s, dtype) for b, s in zip(blocks, scales, strict=True)])
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1)  # (G, 16, 2): low nibble first
    values = lut[codes.long()].flatten(-2)  # (G, 32)
    exponents = scales.to(torch.int32) - SCALE_BIAS  # (G,)
    out = torch.ldexp(values, exponents[..., None].float())  # exact in fp32 for every real scale
    return out.flatten(-2).to(dtype)
