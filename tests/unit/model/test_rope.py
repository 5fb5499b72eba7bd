"""RoPE and YaRN against their formulas (openai/gpt-oss gpt_oss/torch/model.py): the inverse frequencies
and their ramp, the concentration and the released model's values, the NeoX half split by hand, the
precomputed tables, and scores that depend on relative position only.
"""

from __future__ import annotations

import math

import pytest
import torch

from gptoss_cli.model import ModelConfig
from gptoss_cli.model.rope import (
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_tables,
    rotary_tables,
    yarn_inv_freq,
)
from tests.conftest import assert_close, rtol_for
from tests.unit.model.references import (
    FP32,
)


def yarn_ref(theta: float, d: int, l0: int, s: float, beta: float = 32.0, alpha: float = 1.0):
    """YaRN in float64 (openai/gpt-oss gpt_oss/torch/model.py): (concentration, low, high, inv_freq list)."""
    freq = [theta ** (2 * i / d) for i in range(d // 2)]
    if s <= 1:
        return 1.0, None, None, [1 / f for f in freq]
    conc = 0.1 * math.log(s) + 1
    low = (d / 2) * math.log(l0 / (beta * 2 * math.pi)) / math.log(theta)
    high = (d / 2) * math.log(l0 / (alpha * 2 * math.pi)) / math.log(theta)
    inv = []
    for i, f in enumerate(freq):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        mask = 1 - ramp
        inv.append(mask / f + (1 - mask) / (s * f))
    return conc, low, high, inv


@pytest.mark.parametrize(
    "theta,d,l0,s",
    [(150000.0, 64, 4096, 32.0), (10000.0, 16, 512, 4.0), (150000.0, 16, 512, 4.0), (10000.0, 64, 4096, 1.0)],
)
def test_yarn_inv_freq_matches_the_formula(theta, d, l0, s):
    cfg = ModelConfig(head_dim=d, rope_theta=theta, initial_context_length=l0, rope_scaling_factor=s)
    conc, low, high, inv = yarn_ref(theta, d, l0, s)
    got_conc, got_inv = yarn_inv_freq(cfg)
    assert got_conc == pytest.approx(conc, rel=1e-12)
    assert got_inv.dtype == torch.float32 and got_inv.shape == (d // 2,)
    assert_close(got_inv.double(), torch.tensor(inv, dtype=torch.float64), rtol=1e-6, elementwise=True)
    if s > 1:
        assert cfg.yarn_correction_range() == pytest.approx((low, high), rel=1e-12)
        # below `low` the original frequency is kept, above `high` it is divided by s
        for i in range(d // 2):
            if i <= low:
                assert got_inv[i].item() == pytest.approx(theta ** (-2 * i / d), rel=1e-6)
            if i >= high:
                assert got_inv[i].item() == pytest.approx(theta ** (-2 * i / d) / s, rel=1e-6)


def test_yarn_concentration_and_release_values():
    cfg4 = ModelConfig(head_dim=16, rope_theta=10000.0, initial_context_length=512, rope_scaling_factor=4.0)
    assert yarn_inv_freq(cfg4)[0] == pytest.approx(0.1 * math.log(4) + 1, rel=1e-12)
    assert yarn_inv_freq(cfg4)[0] == pytest.approx(1.138629, abs=1e-6)
    release = ModelConfig(head_dim=64, rope_theta=150000.0, initial_context_length=4096, rope_scaling_factor=32.0)
    low, high = release.yarn_correction_range()
    assert low == pytest.approx(8.0928, abs=5e-5)
    assert high == pytest.approx(17.3980, abs=5e-5)
    assert yarn_inv_freq(release)[0] == pytest.approx(1.346574, abs=5e-7)
    # cos/sin carry the concentration: cos^2 + sin^2 = concentration^2 at every position
    cos, sin = RotaryEmbedding(release)(torch.tensor([[0, 1, 5000, 100000]]))
    assert_close(cos**2 + sin**2, torch.full_like(cos, 1.346574**2), rtol=1e-5, elementwise=True)


def test_plain_rope_when_factor_one():
    cfg = ModelConfig(head_dim=8, rope_theta=10000.0, rope_scaling_factor=1.0)
    conc, inv = yarn_inv_freq(cfg)
    assert conc == 1.0
    assert_close(inv, torch.tensor([1.0, 0.1, 0.01, 0.001]), rtol=1e-6, elementwise=True)
    pos = torch.tensor([[0, 7, 300]])
    cos, sin = RotaryEmbedding(cfg)(pos)
    angles = torch.tensor([[[p * f for f in (1.0, 0.1, 0.01, 0.001)] for p in (0, 7, 300)]], dtype=torch.float64)
    assert_close(cos, angles.cos(), rtol=1e-5)  # |cos| <= 1: 1e-5 of the magnitude
    assert_close(sin, angles.sin(), rtol=1e-5)


def test_half_split_rotation_by_hand():
    # D = 4, theta = 100: inv_freq = [1, 0.1]; pairs are (x0, x2) and (x1, x3) (NeoX half split).
    cfg = ModelConfig(head_dim=4, rope_theta=100.0)
    cos, sin = RotaryEmbedding(cfg)(torch.tensor([[3]]))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    out = apply_rotary(x, cos, sin).view(4)
    a0, a1 = 3.0, 0.3
    expected = [
        1 * math.cos(a0) - 3 * math.sin(a0),
        2 * math.cos(a1) - 4 * math.sin(a1),
        3 * math.cos(a0) + 1 * math.sin(a0),
        4 * math.cos(a1) + 2 * math.sin(a1),
    ]
    assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=rtol_for(FP32, 2, 2))  # cos, sin, a*c - b*s
    # position 0 is the identity
    cos0, sin0 = RotaryEmbedding(cfg)(torch.tensor([[0]]))
    assert torch.equal(apply_rotary(x, cos0, sin0), x)


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_rotary_tables_rotate_exactly_as_apply_rotary(factor):
    cfg = ModelConfig(head_dim=16, rope_theta=10000.0, initial_context_length=512, rope_scaling_factor=factor)
    pos = torch.tensor([[0, 1, 7, 300, 4095], [5, 6, 7, 8, 9]])
    cos, sin = RotaryEmbedding(cfg)(pos)
    x = torch.randn(2, 5, 3, 16, generator=torch.Generator().manual_seed(0))
    tables = rotary_tables(cos, sin, x.dtype)
    assert_close(apply_rotary_tables(x, *tables), apply_rotary(x, cos, sin), rtol=rtol_for(FP32, 2))


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_rope_scores_depend_on_relative_position(factor):
    cfg = ModelConfig(head_dim=16, rope_theta=10000.0, initial_context_length=512, rope_scaling_factor=factor)
    rope = RotaryEmbedding(cfg)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(tq, tk):
        cq, sq = rope(torch.tensor([[tq]]))
        ck, sk = rope(torch.tensor([[tk]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    # A dot product over D = 16 of the terms q_i k_i, each rotated by an angle of up to 107 rad that fp32
    # holds to 107 eps: the bound is |q| |k| times the dot product's and the angles' rounding.
    bound = (q.norm() * k.norm()).item() * (rtol_for(FP32, 16) + 2 * 107 * torch.finfo(FP32).eps)
    assert abs(score(10, 3) - score(107, 100)) <= bound
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)
    conc = 0.1 * math.log(factor) + 1 if factor > 1 else 1.0
    assert score(5, 5) == pytest.approx(conc**2 * (q * k).sum().item(), rel=1e-5)  # concentration^2 on logits
