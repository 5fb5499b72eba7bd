"""MXFP4 decoding (interop/mxfp4.py) against the format's table on hand-made bytes: two FP4 (E2M1) values per
byte, low nibble first, one power-of-two E8M0 scale per 32-value block.
"""

from __future__ import annotations

import torch

from gptoss_cli.interop.mxfp4 import dequantize

LUT = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_mxfp4_decodes_the_format_table():
    blocks = torch.zeros(1, 16, dtype=torch.uint8)  # one group of 32 values
    blocks[0, 0] = 0x21  # low nibble 1 -> 0.5 first, high nibble 2 -> 1.0
    blocks[0, 1] = 0xF8  # 8 -> -0.0, 15 -> -6.0
    blocks[0, 2] = 0x7E  # 14 -> -4.0, 7 -> 6.0
    for scale in (127, 130, 120):
        out = dequantize(blocks, torch.tensor([scale], dtype=torch.uint8), torch.float32)
        factor = 2.0 ** (scale - 127)
        assert out.shape == (32,)
        assert out[:6].tolist() == [v * factor for v in (0.5, 1.0, -0.0, -6.0, -4.0, 6.0)]
        assert not out[6:].any()
    every = torch.tensor(
        [[lo | (hi << 4) for lo, hi in zip(range(0, 16, 2), range(1, 16, 2), strict=True)] * 2], dtype=torch.uint8
    )
    assert dequantize(every, torch.tensor([127], dtype=torch.uint8), torch.float32).tolist() == LUT * 2


def quantize_by_hand(shape: tuple[int, int, int], seed: int):
    """Random codes and scales for a logical (E, rows, cols) matrix -> (blocks, scales, expected values)."""
    e, rows, cols = shape
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, shape, generator=g)
    scales = torch.randint(122, 128, (e, rows, cols // 32), generator=g).to(torch.uint8)
    expected = torch.tensor(LUT)[codes] * 2.0 ** (scales.float() - 127).repeat_interleave(32, dim=-1)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)  # low nibble = even position
    return packed.view(e, rows, cols // 32, 16), scales, expected


def test_dequantize_decodes_random_blocks_of_experts():
    """(E, rows, blocks, 16) codes with random scales: every value is its table entry times its block scale."""
    blocks, scales, expected = quantize_by_hand((3, 4, 64), seed=0)
    assert torch.equal(dequantize(blocks, scales, torch.float32), expected)
