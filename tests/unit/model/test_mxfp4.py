"""MXFP4 (model/mxfp4.py): decoding against the format's table on hand-made bytes (two FP4 (E2M1) values per
byte, low nibble first, one power-of-two E8M0 scale per 32-value block); quantisation against the OCP MX
v1.0 rule written out per element in plain Python; packed experts in the model against the dense model
holding the decoded weights.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gptoss_cli.model import Transformer, mxfp4
from gptoss_cli.model.mxfp4 import PackedExperts, dequantize, pack_experts, quantize
from gptoss_cli.run.checkpoint import weights_state_dict
from tests.conftest import assert_close, randomise, rtol_for, tiny_model_config

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


# ---- quantize: the OCP MX conversion against a plain per-element reference ---------------------------


def quantize_reference(values: list[float]) -> tuple[list[int], int]:
    """One block of 32 floats by the OCP MX v1.0 rule written out with Python floats: shared exponent
    floor(log2(max|v|)) - 2, clamped to the E8M0 range; each v / 2^shared to the nearest e2m1 magnitude,
    ties to the even code (the code's last bit is the mantissa bit), saturating at 6; the sign kept.
    Returns (codes, scale byte)."""
    amax = max(abs(v) for v in values)
    shared = max(-127, min(127, math.floor(math.log2(amax)) - 2)) if amax > 0 else -127
    codes = []
    for v in values:
        m = abs(v) / 2.0**shared
        best = min(range(8), key=lambda c: (abs(LUT[c] - m), c % 2))  # nearest; on a tie the even code
        codes.append(best | (8 if math.copysign(1.0, v) < 0 else 0))
    return codes, shared + 127


def unpack(blocks: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes -> (..., 32) codes, low nibble first."""
    return torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)


def hard_rows() -> torch.Tensor:
    """Blocks that hit every rule: exact ties between e2m1 values, values that saturate, zeros and -0,
    a block of zeros, subnormal and huge magnitudes, and plain random ones."""
    g = torch.Generator().manual_seed(1)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.9, 6.0, 5.5, 0.1, -0.25, -0.75, -5.0, -0.0, 0.0] * 2)
    rows = [
        ties,  # max 7.9: shared = 0, so the ties stay ties and 7.9 saturates to 6
        ties * 2.0**-40,
        torch.zeros(32),
        torch.randn(32, generator=g),
        torch.randn(32, generator=g) * 1e-30,
        torch.randn(32, generator=g) * 1e30,
        torch.randn(32, generator=g) * torch.logspace(-6, 6, 32),
    ]
    return torch.stack(rows)


def test_quantize_follows_the_ocp_mx_rule_exactly():
    rows = torch.cat([hard_rows(), torch.randn(64, 32, generator=torch.Generator().manual_seed(2))])
    blocks, scales = quantize(rows)
    assert blocks.shape == (rows.shape[0], 1, 16) and scales.shape == (rows.shape[0], 1)
    for row, b, s in zip(rows, blocks, scales, strict=True):
        codes, scale = quantize_reference(row.tolist())
        assert unpack(b[0]).tolist() == codes and s.item() == scale, row


def test_quantize_then_dequantize_error_is_within_the_format_bound():
    """|v - Q(v)| <= half the e2m1 spacing at |v| / 2^shared (0.25, 0.5, 1 below 2, 4, 6), times 2^shared;
    values above 6 * 2^shared saturate and err by their excess. bf16 input, the weights' own dtype."""
    w = (torch.randn(3, 8, 256, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    blocks, scales = quantize(w)
    back = dequantize(blocks, scales, torch.float32)
    v = w.float()
    x = 2.0 ** (scales.float() - 127).repeat_interleave(32, dim=-1)  # the shared scale of each value
    m = v.abs() / x
    half_spacing = torch.where(m < 2, 0.25, torch.where(m < 4, 0.5, 1.0))
    bound = torch.where(m <= 6, half_spacing, m - 6) * x
    assert ((v - back).abs() <= bound).all()
    assert (m < 8).all() and (m.amax(-1) >= 4).all()  # the max of every 32 lands in [4, 8): the rule's range
    rel = ((v - back).norm() / v.norm()).item()
    assert 0.02 < rel < 0.2  # 4-bit values: a few percent, never nothing (a quantizer that did nothing)


def test_quantize_is_lossless_on_values_it_produced():
    """Decoded MXFP4 values quantise back to the same values (the bytes may differ where a block's
    largest code is below 4: the rule then picks a smaller scale and doubles the codes)."""
    blocks, scales, expected = quantize_by_hand((2, 5, 96), seed=4)
    again = dequantize(*quantize(expected), torch.float32)
    assert torch.equal(again, expected)


# ---- packed experts in the model ----------------------------------------------------------------------


def packed_pair(backend: str = "loop", seed: int = 0):
    """(packed model, dense model holding exactly the decoded weights), both fp32, eval mode."""
    torch.manual_seed(seed)
    dense = Transformer(tiny_model_config("released", moe_backend=backend)).eval()
    randomise(dense, seed)
    packed = pack_experts(copy.deepcopy(dense))
    with torch.no_grad():
        for d, p in zip(dense.block, packed.block, strict=True):
            d.mlp.mlp1_weight.copy_(dequantize(p.mlp.mlp1_weight.blocks, p.mlp.mlp1_weight.scales, torch.float32))
            d.mlp.mlp2_weight.copy_(dequantize(p.mlp.mlp2_weight.blocks, p.mlp.mlp2_weight.scales, torch.float32))
    return packed, dense


def test_pack_experts_swaps_the_expert_parameters_for_buffers_with_openai_names():
    packed, dense = packed_pair()
    names = weights_state_dict(packed)
    assert "block.0.mlp.mlp1_weight" not in names and "block.0.mlp.mlp1_weight.blocks" in names
    assert names["block.3.mlp.mlp2_weight.blocks"].shape == (4, 64, 1, 16)  # (E, H, I/32, 16)
    assert names["block.3.mlp.mlp2_weight.scales"].dtype == torch.uint8
    assert not any("mlp1_weight" in n or "mlp2_weight" in n for n, _ in packed.named_parameters())
    assert isinstance(packed.block[0].mlp.mlp1_weight, PackedExperts)
    assert packed.block[0].mlp.mlp1_weight.shape == dense.block[0].mlp.mlp1_weight.shape
    with torch.device("meta"):
        meta = pack_experts(Transformer(dense.config))
    assert {n: tuple(t.shape) for n, t in weights_state_dict(meta).items()} == {
        n: tuple(t.shape) for n, t in names.items()
    }


@pytest.mark.parametrize("backend", ["loop", "fused_loop", "grouped_mm", "auto"])
@pytest.mark.parametrize("tokens", [1, 2, 12])  # one token: the per-token path; more: sorted by expert
def test_packed_logits_equal_the_decoded_dense_model(backend, tokens):
    """Decoding is exact, so each expert product is the dense one up to the order of its sums (the packed
    path multiplies a few rows of the weight at a time)."""
    packed, dense = packed_pair(backend)
    ids = torch.randint(0, 256, (2, tokens), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = dense(ids).logits
        got = packed(ids).logits
    assert ref.abs().max() > 0.1
    assert_close(got, ref, rtol=rtol_for(torch.float32, 64, 8))


def test_packed_linear_decodes_chunk_by_chunk(monkeypatch):
    """PackedExperts.linear with chunks smaller than the matrix (and a ragged last one) equals a product
    with the whole decoded expert, in fp32 and bf16."""
    blocks, scales, values = quantize_by_hand((3, 40, 96), seed=6)
    weight = PackedExperts(blocks, scales)
    monkeypatch.setattr(mxfp4, "DECODE_CHUNK_BYTES", 96 * 4 * 7)  # 7 rows per chunk in fp32
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(7))
    bias = torch.randn(40, generator=torch.Generator().manual_seed(8))
    for dtype in (torch.float32, torch.bfloat16):
        got = weight.linear(1, x.to(dtype), bias.to(dtype))
        ref = torch.nn.functional.linear(x.double(), values[1].double(), bias.to(dtype).double())
        assert got.dtype == dtype
        assert_close(got, ref, rtol=rtol_for(dtype, 96))
    assert torch.equal(weight.decode(torch.tensor([2, 0]), torch.float32), values[[2, 0]])


@pytest.mark.parametrize("batch", [1, 3])  # 2 assignments < 4 experts: gathered; 6 >= 4: every expert decoded
def test_packed_traced_decode_path_equals_dense(monkeypatch, batch):
    """The compiled decode step's branch (is_compiling patched, run eagerly) on packed experts."""
    packed, dense = packed_pair("fused_loop", seed=2)
    ids = torch.randint(0, 256, (batch, 1), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        ref = dense(ids).logits
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        got = packed(ids).logits
    assert_close(got, ref, rtol=rtol_for(torch.float32, 64, 8))


def test_packed_chunks_are_equal_and_share_one_scratch(monkeypatch):
    """rows() splits an expert into equal chunks (48 rows at most 13 a chunk: 4 x 12, not 13, 13, 13, 9), and
    experts of different sizes, decoded one after another, in and out of inference mode, each equal
    dequantize although their chunks reuse one buffer."""
    small, large = (quantize_by_hand(shape, seed=s) for shape, s in (((2, 48, 64), 11), ((2, 40, 128), 12)))
    monkeypatch.setattr(mxfp4, "DECODE_CHUNK_BYTES", 64 * 2 * 13)  # 13 rows of 64 columns in bf16
    small_w, large_w = PackedExperts(*small[:2]), PackedExperts(*large[:2])
    sizes = [w.shape[0] for _, w in small_w.rows(1, torch.bfloat16, torch.device("cpu"))]
    assert sizes == [12, 12, 12, 12]
    for weight, values in ((small_w, small[2]), (large_w, large[2]), (small_w, small[2])):
        for mode in (True, False):
            with torch.inference_mode(mode):
                for dtype in (torch.bfloat16, torch.float32):
                    for e in range(2):
                        got = torch.cat([w.clone() for _, w in weight.rows(e, dtype, torch.device("cpu"))])
                        assert torch.equal(got, values[e].to(dtype))
