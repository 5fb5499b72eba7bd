"""Unit tests of the gpt-oss building blocks against the formulas of the architecture spec.

Every expectation here is written out independently in the test (mostly in float64 with plain loops or
explicit exponentials) from `/work/shared/spec/gptoss-architecture.md` §3-§8: RMSNorm, RoPE/YaRN, the
sliding window, attention sinks, the clamped interleaved SwiGLU, top-k-then-softmax routing, the MoE and
attention backends, the KV cache, the load-balancing loss, parameter counts and config validation.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gptoss_cli.model import KVCache, ModelConfig, ModelConfigError, Transformer, attention_mask
from gptoss_cli.model.attention import banded_sdpa_attention, eager_attention, sdpa_attention
from gptoss_cli.model.moe import MLPBlock, swiglu
from gptoss_cli.model.norm import RMSNorm
from gptoss_cli.model.rope import (
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_tables,
    rotary_tables,
    yarn_inv_freq,
)
from tests.conftest import assert_close, max_diff, randomise, rtol_for

ALPHA = 1.702


def small_config(**overrides) -> ModelConfig:
    base = dict(
        num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=64, hidden_size=32,
        intermediate_size=16, head_dim=8, num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
        max_context_length=64, attention_bias=True, router_bias=True, tie_word_embeddings=False,
        attention_backend="eager", moe_backend="loop",
    )
    return ModelConfig(**(base | overrides))


# This module's weight scales: std 0.2 everywhere (biases too), mlp1 0.5, so the clamp fires in one block.
SCALES = dict(std=0.2, bias_std=0.2, mlp1_std=0.5)
FP32 = torch.float32
# fp32 rounding budgets (tests/conftest.py): H = 32 or 48 features, T = 20 keys, E <= 6 experts.
NORM_RTOL = rtol_for(FP32, 48)  # one mean of squares, one rsqrt, one scale
ATTN_RTOL = rtol_for(FP32, 20, 3)  # q.k over D = 16, softmax over T = 20, p.v over T = 20
MLP_RTOL = rtol_for(FP32, 32, 4)  # norm, router and mlp1 over H = 32, mlp2 over I = 16, the weighted expert sum
# a whole 2-layer model: per layer attention (3) and MoE (4) reductions, then the unembedding over H = 32
MODEL_RTOL = rtol_for(FP32, 32, 2 * 7 + 1)
FP64_RTOL = 1e-12  # float64 on both sides: ~4500 eps, a check of the algorithm, not of the rounding


# ---------------------------------------------------------------------------------------------------
# RMSNorm (§3)
# ---------------------------------------------------------------------------------------------------


def rmsnorm_ref(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * scale.double()


def test_rmsnorm_fp32_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.scale.copy_(torch.rand(48) + 0.5)
    x = torch.randn(3, 5, 48) * 3
    y = norm(x)
    assert y.dtype == torch.float32
    assert_close(y, rmsnorm_ref(x, norm.scale), rtol=NORM_RTOL)
    # eps = 1e-5 sits inside the square root: visible on tiny inputs
    tiny = torch.full((1, 48), 1e-3)
    assert_close(norm(tiny), (1e-3 / math.sqrt(1e-6 + 1e-5) * norm.scale.double())[None], rtol=NORM_RTOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rmsnorm_gradients_match_the_formula(dtype):
    """The CPU training path (fused kernel, hand-written backward) against autograd through the formula."""
    torch.manual_seed(0)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.scale.copy_(torch.rand(48) + 0.5)
    x = (torch.randn(3, 5, 48) * 3).to(dtype).requires_grad_()
    g = torch.randn(3, 5, 48, dtype=torch.float64)
    y = norm(x)
    if dtype == torch.float64:  # no final cast: the output comes straight from the custom function
        assert "RMSNorm" in type(y.grad_fn).__name__
    (y.double() * g).sum().backward()
    got_x, got_scale = x.grad, norm.scale.grad
    xr = x.detach().double().requires_grad_()
    scale = norm.scale.detach().double().requires_grad_()
    (rmsnorm_ref(xr, scale) * g).sum().backward()
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    assert_close(got_x, xr.grad, rtol=tol)
    tol = max(tol, 1e-6)  # the scale parameter is fp32: its gradient is rounded to fp32
    assert_close(got_scale, scale.grad, rtol=tol)


def test_rmsnorm_bf16_input_keeps_fp32_scale():
    torch.manual_seed(0)
    norm = RMSNorm(64)
    assert norm.scale.dtype == torch.float32
    with torch.no_grad():
        norm.scale.copy_(1 + 1e-3 * torch.randn(64))  # differences a bf16 scale could not hold
    x = (torch.randn(4, 64) * 5).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    assert norm.scale.dtype == torch.float32
    expected = rmsnorm_ref(x.float(), norm.scale)  # statistics and scale in high precision, one final rounding
    assert_close(y.float(), expected.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6, elementwise=True)
    # Mostly bit-exact with a single final rounding (a bf16 scale or bf16 statistics would not be).
    assert (y == expected.to(torch.bfloat16)).float().mean() > 0.95


# ---------------------------------------------------------------------------------------------------
# RoPE / YaRN (§4)
# ---------------------------------------------------------------------------------------------------


def yarn_ref(theta: float, d: int, l0: int, s: float, beta: float = 32.0, alpha: float = 1.0):
    """Spec §4 in float64: (concentration, low, high, inv_freq list)."""
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
def test_yarn_inv_freq_matches_spec(theta, d, l0, s):
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


# ---------------------------------------------------------------------------------------------------
# Sliding window (§4: key j visible from query t iff t - W < j <= t)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [0, 1, 3, 8])
def test_attention_mask_formula(window):
    t_len = 12
    pos = torch.arange(t_len).expand(2, t_len)
    mask = attention_mask(pos, pos, window)
    assert mask.shape == (2, 1, t_len, t_len) and mask.dtype == torch.bool
    for t in range(t_len):
        for j in range(t_len):
            expected = j <= t and (window == 0 or t - window < j)
            assert bool(mask[0, 0, t, j]) is expected
    if window:
        assert (mask[0, 0].sum(-1)[window - 1:] == window).all()  # exactly W keys, the current one included


def test_attention_mask_ignores_empty_slots():
    q_pos = torch.tensor([[9]])
    k_pos = torch.tensor([[8, -1, 9, 6, 7, 5]])  # ring order, one empty slot
    assert attention_mask(q_pos, k_pos, 4)[0, 0, 0].tolist() == [True, False, True, True, True, False]
    assert attention_mask(q_pos, k_pos, 0)[0, 0, 0].tolist() == [True, False, True, True, True, True]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_sliding_layer_sees_exactly_window_keys(backend):
    """1-layer (sliding) model: changing token j changes outputs at t iff t - W < j <= t."""
    w, t_len = 4, 12
    model = Transformer(small_config(num_hidden_layers=1, sliding_window=w, attention_backend=backend)).eval()
    randomise(model, **SCALES)
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (1, t_len))
    with torch.no_grad():
        base = model(ids).logits
        for j in (0, 3, 6):
            pert = ids.clone()
            pert[0, j] = (pert[0, j] + 17) % 64
            change = (model(pert).logits - base).abs().amax(-1)[0]  # (T,)
            for t in range(t_len):
                if t - w < j <= t:
                    assert change[t] > 1e-3, (j, t)
                else:
                    assert change[t] < 1e-6, (j, t)


def test_full_layer_after_sliding_layer_sees_everything():
    model = Transformer(small_config(num_hidden_layers=2, sliding_window=4)).eval()
    randomise(model, **SCALES)
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (1, 12))
    pert = ids.clone()
    pert[0, 2] = (pert[0, 2] + 17) % 64
    with torch.no_grad():
        change = (model(pert).logits - model(ids).logits).abs().amax(-1)[0]
    assert (change[:2] < 1e-6).all() and (change[2:] > 1e-4).all()


# ---------------------------------------------------------------------------------------------------
# Attention sinks (§4)
# ---------------------------------------------------------------------------------------------------


def attention_inputs(seed=0, b=2, nh=4, nkv=2, t=20, d=16, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, t, d, generator=g) for n in (nh, nkv, nkv))
    sinks = torch.randn(nh, generator=g)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, sinks)]


def sink_attention_ref(q, k, v, sinks, mask, scale):
    """p_j = exp(l_j) / (sum_k exp(l_k) + exp(sink_h)), written per head with kv head h // groups."""
    b, nh, t, _ = q.shape
    groups = nh // k.shape[1]
    out = torch.zeros(b, nh, t, v.shape[-1], dtype=torch.float64)
    for h in range(nh):
        kh, vh = k[:, h // groups].double(), v[:, h // groups].double()
        logits = q[:, h].double() @ kh.transpose(-1, -2) * scale  # (B, T, S)
        logits = logits.masked_fill(~mask[:, 0], float("-inf"))
        sink = sinks[h].double()
        m = torch.maximum(logits.amax(-1, keepdim=True), sink)
        num = torch.exp(logits - m)
        den = num.sum(-1, keepdim=True) + torch.exp(sink - m)
        out[:, h] = (num / den) @ vh
    return out


@pytest.mark.parametrize("window", [0, 6])
def test_eager_sinks_match_hand_softmax(window):
    q, k, v, sinks = attention_inputs()
    pos = torch.arange(20).expand(2, 20)
    mask = attention_mask(pos, pos, window)
    scale = 0.25
    got = eager_attention(q, k, v, sinks, mask, scale)
    assert_close(got, sink_attention_ref(q, k, v, sinks, mask, scale), rtol=ATTN_RTOL)


def test_sinks_minus_inf_is_plain_softmax_and_sinks_matter():
    q, k, v, sinks = attention_inputs()
    pos = torch.arange(20).expand(2, 20)
    mask = attention_mask(pos, pos, 6)
    scale = 0.25
    groups = 2
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2) * scale
    plain = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v.repeat_interleave(groups, 1)
    no_sink = torch.full_like(sinks, float("-inf"))
    assert_close(eager_attention(q, k, v, no_sink, mask, scale), plain, rtol=ATTN_RTOL)
    # sdpa folds the sink into a key coordinate; a very negative finite sink is the same limit
    assert_close(sdpa_attention(q, k, v, torch.full_like(sinks, -1e4), mask, scale), plain, rtol=ATTN_RTOL)
    with_sinks = eager_attention(q, k, v, sinks, mask, scale)
    assert max_diff(with_sinks, plain) > 1e-2
    # With v = 1 the output is the visible probability mass: sum_j p_j = S / (S + exp(sink)) < 1.
    ones = torch.ones_like(v)
    mass = eager_attention(q, k, ones, sinks, mask, scale)[..., 0]
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)
    assert_close(mass, torch.sigmoid(lse - sinks.view(1, -1, 1)), rtol=ATTN_RTOL)
    assert (mass < 1).all()


# ---------------------------------------------------------------------------------------------------
# Fast attention path: sdpa vs eager, outputs and gradients
# ---------------------------------------------------------------------------------------------------


def _cache_like_mask():
    # 3 queries at positions 17..19 over a ring of 6 slots (one empty) followed by the 3 new keys
    q_pos = torch.tensor([[17, 18, 19]]).expand(2, 3)
    k_pos = torch.tensor([[12, 13, 14, -1, 15, 16, 17, 18, 19]]).expand(2, 9)
    return q_pos, k_pos


@pytest.mark.parametrize("case", ["full", "sliding", "cache"])
def test_sdpa_matches_eager_outputs_and_grads(case):
    if case == "cache":
        q_pos, k_pos = _cache_like_mask()
        mask = attention_mask(q_pos, k_pos, 6)
        q, _, _, sinks = attention_inputs(seed=3, t=3, requires_grad=True)
        _, k, v, _ = attention_inputs(seed=4, t=9, requires_grad=True)
    else:
        q, k, v, sinks = attention_inputs(seed=3, t=20, requires_grad=True)
        pos = torch.arange(20).expand(2, 20)
        mask = attention_mask(pos, pos, 6 if case == "sliding" else 0)
    scale = 1 / math.sqrt(16)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    results = {}
    for name, fn in (("eager", eager_attention), ("sdpa", sdpa_attention)):
        out = fn(q, k, v, sinks, mask, scale)
        grads = torch.autograd.grad((out * upstream).sum(), (q, k, v, sinks))
        results[name] = (out, grads)
    (oe, ge), (os_, gs) = results["eager"], results["sdpa"]
    assert os_.shape == oe.shape == q.shape
    assert_close(os_, oe, rtol=ATTN_RTOL)
    for name, a, b in zip(("q", "k", "v", "sinks"), ge, gs, strict=True):
        assert_close(b, a, rtol=2 * ATTN_RTOL, what=name)  # backward: twice the forward's reductions
    assert ge[3].abs().max() > 1e-3  # the sink gradient is exercised


@pytest.mark.parametrize(("t", "window"), [(20, 6), (24, 6), (37, 5)])
def test_banded_sliding_attention_matches_sdpa(t, window):
    """The block-skipping sliding path against full sdpa, in float64: outputs and all four gradients,
    with a left-padded row (positions -1, then 0..) and T not a multiple of W."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, heads, t, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for heads in (4, 2, 2))
    sinks = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(t).expand(2, t).clone()
    pos[0, :5], pos[0, 5:] = -1, torch.arange(t - 5)
    mask = attention_mask(pos, pos, window)
    upstream = torch.randn(q.shape, generator=g, dtype=torch.float64)
    results = []
    for out in (sdpa_attention(q, k, v, sinks, mask, 0.3), banded_sdpa_attention(q, k, v, sinks, mask, 0.3, window)):
        results.append((out, torch.autograd.grad((out * upstream).sum(), (q, k, v, sinks))))
    (ref, ref_grads), (got, got_grads) = results
    assert got.shape == ref.shape
    assert_close(got, ref, rtol=FP64_RTOL)
    for name, a, b in zip("qkvs", got_grads, ref_grads, strict=True):
        assert_close(a, b, rtol=FP64_RTOL, what=name)


# ---------------------------------------------------------------------------------------------------
# SwiGLU (§5)
# ---------------------------------------------------------------------------------------------------


def swiglu_ref(gate: float, lin: float, limit: float = 7.0) -> float:
    g = min(gate, limit)
    lin_c = max(min(lin, limit), -limit)
    return g / (1 + math.exp(-ALPHA * g)) * (lin_c + 1)


def test_swiglu_formula_with_clamp():
    gates = [-20.0, -7.5, -1.0, 0.0, 0.5, 6.9, 7.0, 9.0, 30.0]
    lins = [-30.0, -7.2, -1.0, 0.0, 3.0, 6.99, 7.5, 12.0, -0.5]
    h = torch.tensor([v for pair in zip(gates, lins, strict=True) for v in pair])  # interleaved [g0, l0, g1, l1, ...]
    got = swiglu(h[None], 7.0)[0]
    expected = torch.tensor([swiglu_ref(g, lin) for g, lin in zip(gates, lins, strict=True)])
    assert_close(got, expected, rtol=1e-6, atol=1e-6, elementwise=True)
    # hand-checked corners: upper clamp on both, gate not clamped below, linear clamped below
    assert got[7].item() == pytest.approx(7 / (1 + math.exp(-ALPHA * 7)) * 8, rel=1e-6)
    assert got[0].item() == pytest.approx(-20 / (1 + math.exp(ALPHA * 20)) * (-6), rel=1e-5)
    assert got[1].item() == pytest.approx(-7.5 / (1 + math.exp(ALPHA * 7.5)) * (-6), rel=1e-5)


def test_swiglu_interleaved_layout():
    torch.manual_seed(0)
    gate, lin = torch.randn(5, 6) * 4, torch.randn(5, 6) * 4
    interleaved = torch.stack([gate, lin], -1).reshape(5, 12)
    expected = torch.tensor([[swiglu_ref(g, x) for g, x in zip(gr.tolist(), lr.tolist(), strict=True)]
                             for gr, lr in zip(gate, lin, strict=True)])
    assert_close(swiglu(interleaved, 7.0), expected, rtol=1e-5, atol=1e-5, elementwise=True)
    chunked = torch.cat([gate, lin], -1)  # the seed's chunk(2) layout must give something else
    assert max_diff(swiglu(chunked, 7.0), expected) > 1e-2


# ---------------------------------------------------------------------------------------------------
# Router and MoE (§5)
# ---------------------------------------------------------------------------------------------------


def moe_ref(block: MLPBlock, x: torch.Tensor, variant: str = "spec") -> torch.Tensor:
    """Slow per-token float64 reference. variant: spec | softmax_first | bias_unweighted."""
    eps = block.norm.eps
    scale = block.norm.scale.double()
    wg = block.gate.weight.double()
    bg = block.gate.bias.double() if block.gate.bias is not None else torch.zeros(wg.shape[0], dtype=torch.float64)
    w1, b1 = block.mlp1_weight.double(), block.mlp1_bias.double()
    w2, b2 = block.mlp2_weight.double(), block.mlp2_bias.double()
    k, n_exp = block.experts_per_token, block.num_experts
    out = torch.empty(x.shape, dtype=torch.float64)
    for bi in range(x.shape[0]):
        for ti in range(x.shape[1]):
            v = x[bi, ti].double()
            t = v / math.sqrt((v * v).mean().item() + eps) * scale
            logits = (wg @ t + bg).tolist()
            chosen = sorted(range(n_exp), key=lambda e: -logits[e])[:k]
            if variant == "softmax_first":
                z = sum(math.exp(lg) for lg in logits)
                weights = [math.exp(logits[e]) / z for e in chosen]
            else:
                z = sum(math.exp(logits[e]) for e in chosen)
                weights = [math.exp(logits[e]) / z for e in chosen]
            y = torch.zeros_like(v)
            for wt, e in zip(weights, chosen, strict=True):
                h = (w1[e] @ t + b1[e]).tolist()
                a = torch.tensor([swiglu_ref(h[2 * j], h[2 * j + 1]) for j in range(len(h) // 2)],
                                 dtype=torch.float64)
                if variant == "bias_unweighted":
                    y = y + wt * (w2[e] @ a) + b2[e]
                else:
                    y = y + wt * (w2[e] @ a + b2[e])
            out[bi, ti] = v + y
    return out


def make_mlp(seed=0, **overrides) -> MLPBlock:
    block = MLPBlock(small_config(**overrides))
    randomise(block, seed, **(SCALES | dict(std=0.3, bias_std=0.3)))
    return block


def test_mlp_block_matches_per_token_reference():
    block = make_mlp(num_experts=6, experts_per_token=3)
    with torch.no_grad():
        block.gate.bias.mul_(5)  # a strong router bias that changes which experts win
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        got, stats = block(x)
    ref = moe_ref(block, x)
    assert_close(got, ref, rtol=MLP_RTOL)
    # the reference is discriminating: the two classic mistakes give visibly different outputs
    assert max_diff(got, moe_ref(block, x, "softmax_first")) > 1e-2
    assert max_diff(got, moe_ref(block, x, "bias_unweighted")) > 1e-2
    # counts are the per-expert slot totals of top-k on raw logits (bias included)
    logits = torch.nn.functional.linear(rmsnorm_ref(x, block.norm.scale).float(), block.gate.weight, block.gate.bias)
    top = logits.topk(3, dim=-1).indices
    assert stats.counts.tolist() == torch.bincount(top.flatten(), minlength=6).tolist()
    assert stats.counts.sum().item() == 2 * 7 * 3


def test_swiglu_clamp_is_exercised_in_mlp_reference():
    block = make_mlp()
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32)
    t = rmsnorm_ref(x, block.norm.scale).float().reshape(-1, 32)
    h = torch.einsum("nh,eoh->neo", t, block.mlp1_weight.detach()) + block.mlp1_bias.detach()
    assert (h[..., ::2] > 7).any() and (h[..., 1::2].abs() > 7).any()
    with torch.no_grad():
        assert_close(block(x)[0], moe_ref(block, x), rtol=MLP_RTOL)


def _moe_run(backend: str, dtype=torch.float32):
    """Output, statistics and every gradient of one MLP block with an idle expert (3) under `backend`."""
    block = make_mlp(seed=2, hidden_size=32, intermediate_size=16, num_experts=4, moe_backend=backend).to(dtype)
    with torch.no_grad():
        block.gate.bias[3] = -1e3  # expert 3 receives no token: an empty group
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5), dtype=dtype, requires_grad=True)
    out, stats = block(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=dtype)
    ((out * upstream).sum() + stats.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()} | {"x": x.grad.clone()}
    return out.detach(), stats, grads


MOE_FAST = ["fused_loop", pytest.param("grouped_mm", marks=pytest.mark.skipif(
    not hasattr(torch, "_grouped_mm"), reason="torch lacks _grouped_mm"))]


@pytest.mark.parametrize("backend", MOE_FAST)
def test_moe_backends_match_the_loop_outputs_and_grads(backend):
    o_loop, s_loop, g_loop = _moe_run("loop")
    o_fast, s_fast, g_fast = _moe_run(backend)
    assert s_loop.counts[3] == 0 and torch.equal(s_loop.counts, s_fast.counts)
    assert_close(o_fast, o_loop, rtol=MLP_RTOL)
    assert set(g_loop) == set(g_fast)
    for name in g_loop:
        assert_close(g_fast[name], g_loop[name], rtol=2 * MLP_RTOL, what=name)  # backward: twice the reductions
    assert g_loop["mlp1_weight"].abs().sum() > 0 and g_loop["gate.weight"].abs().sum() > 0
    for name in ("mlp1_weight", "mlp1_bias", "mlp2_weight", "mlp2_bias"):
        assert g_fast[name][3].abs().sum() == 0, name  # the unused expert gets no gradient


def test_fused_loop_under_activation_checkpointing():
    """Recomputed in backward (as train.activation_checkpointing does): the same gradients."""
    from torch.utils.checkpoint import checkpoint

    grads = []
    for recompute in (False, True):
        block = make_mlp(seed=2, num_experts=4, moe_backend="fused_loop")
        x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5), requires_grad=True)
        out, stats = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        (out.square().sum() + stats.aux_loss).backward()
        grads.append([x.grad] + [p.grad for p in block.parameters()])
    for a, b in zip(*grads, strict=True):
        assert_close(b, a, rtol=rtol_for(FP32))  # the same kernels recompute: at most an ulp or so


def test_fused_loop_gradients_are_the_loop_gradients_in_float64():
    """The hand-written backward (SwiGLU derivatives, clamps, interleaved rows) is the autograd one."""
    _, _, g_loop = _moe_run("loop", torch.float64)
    _, _, g_fused = _moe_run("fused_loop", torch.float64)
    for name in g_loop:
        assert_close(g_fused[name], g_loop[name], rtol=1e-10, what=name)  # float64: the algorithm, not rounding


@pytest.mark.parametrize("backend", ["loop", "fused_loop"])
@pytest.mark.parametrize("tokens", [1, 2, 9])  # 1 and 2: few assignments, each token runs its experts directly
def test_moe_inference_paths_match_per_token_reference(backend, tokens):
    block = make_mlp(seed=3, num_experts=4, experts_per_token=2, moe_backend=backend)
    x = torch.randn(1, tokens, 32, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        got, stats = block.eval()(x)
    assert_close(got, moe_ref(block, x), rtol=MLP_RTOL)
    assert stats.counts.sum().item() == tokens * 2


@pytest.mark.parametrize("batch", [1, 3])  # 2 assignments < 4 experts: gathered; 6 >= 4: every expert, weighted
def test_moe_traced_decode_path_matches_reference(monkeypatch, batch):
    """Under torch.compile the decode path indexes experts by tensor instead of looping over host ids; run
    that branch eagerly (is_compiling patched) against the per-token reference."""
    block = make_mlp(seed=4, num_experts=4, experts_per_token=2, moe_backend="fused_loop").eval()
    x = torch.randn(batch, 1, 32, generator=torch.Generator().manual_seed(8))  # one decode step per row
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.inference_mode():
        got, stats = block(x)
    assert_close(got, moe_ref(block, x), rtol=MLP_RTOL)
    assert stats.counts.sum().item() == batch * 2


@pytest.mark.parametrize("backend", ["fused_loop", "sdpa", "sdpa_dense"])
def test_model_gradients_match_the_reference_backends(backend):
    """A whole model (loss, aux loss) under a fast backend against eager attention and the loop MoE."""
    def grads(**kernels):
        model = Transformer(small_config(**kernels))
        randomise(model, **SCALES)
        ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))  # T >= 3W: banded
        out = model(ids)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids.roll(-1, 1).flatten())
        (loss + 0.1 * out.aux_loss).backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}

    fast = {"moe_backend": backend} if backend == "fused_loop" else {"attention_backend": backend}
    if backend == "sdpa":  # T = 13 >= 3W: the sliding layers take the banded path
        assert Transformer(small_config(**fast)).block[0].attn.sliding_window * 3 <= 13
    ref_loss, ref = grads()
    loss, got = grads(**fast)
    assert loss == pytest.approx(ref_loss, rel=MODEL_RTOL)
    for name in ref:
        assert_close(got[name], ref[name], rtol=2 * MODEL_RTOL, what=name)


# ---------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------

W = 4


def _cached_logits(model, ids, prefill, step, max_length):
    cache = KVCache(model.config, ids.shape[0], max_length, torch.float32, "cpu")
    outs = [model(ids[:, :prefill], cache=cache).logits]
    for start in range(prefill, ids.shape[1], step):
        outs.append(model(ids[:, start:start + step], cache=cache).logits)
    assert cache.length == ids.shape[1]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("total", [W - 1, W, W + 1, 4 * W])
def test_kv_cache_decode_equals_full_forward(total, backend):
    model = Transformer(small_config(num_hidden_layers=2, sliding_window=W, attention_backend=backend)).eval()
    randomise(model, **SCALES)
    ids = torch.randint(0, 64, (2, total), generator=torch.Generator().manual_seed(total))
    with torch.no_grad():
        full = model(ids).logits
        plans = {(1, 1), (max(1, total - 2), 1), (min(total, W + 2), 1), (2, 3)}
        for prefill, step in sorted(plans):
            if prefill > total:
                continue
            for max_length in (total, 4 * W + 3):
                got = _cached_logits(model, ids, prefill, step, max_length)
                assert got.shape == full.shape
                assert_close(got, full, rtol=MODEL_RTOL, what=str((prefill, step, max_length)))


def test_kv_cache_overflow_raises():
    model = Transformer(small_config()).eval()
    cache = KVCache(model.config, 1, 5, torch.float32, "cpu")
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


# ---------------------------------------------------------------------------------------------------
# Load-balancing loss
# ---------------------------------------------------------------------------------------------------


def test_aux_loss_matches_hand_computation():
    block = make_mlp(num_experts=8, experts_per_token=2)
    torch.manual_seed(0)
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        _, stats = block(x)
    t = rmsnorm_ref(x, block.norm.scale).reshape(-1, 32)
    logits = t @ block.gate.weight.double().T + block.gate.bias.double()
    n = logits.shape[0]
    chosen = [sorted(range(8), key=lambda e, row=row: -row[e])[:2] for row in logits.tolist()]
    f = [sum(e in c for c in chosen) / (n * 2) for e in range(8)]
    probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    p_mean = probs.mean(0).tolist()
    aux = 8 * sum(fe * pe for fe, pe in zip(f, p_mean, strict=True))
    assert stats.aux_loss.item() == pytest.approx(aux, rel=1e-5)
    z = (torch.log(torch.exp(logits).sum(-1)) ** 2).mean().item()
    assert stats.z_loss.item() == pytest.approx(z, rel=1e-5)


def test_aux_loss_uniform_vs_collapsed():
    block = make_mlp(num_experts=8, experts_per_token=2)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.bias.zero_()  # uniform router probabilities
        uniform = block(x)[1].aux_loss.item()
        block.gate.bias.copy_(torch.tensor([20.0, 20.0, 0, 0, 0, 0, 0, 0]))  # every token to experts 0 and 1
        collapsed = block(x)[1]
    assert uniform == pytest.approx(1.0, abs=1e-6)
    # f = [1/2, 1/2, 0...], P ~ [1/2, 1/2, 0...] -> E * 2 * 1/4 = E / 2
    assert collapsed.aux_loss.item() == pytest.approx(4.0, rel=1e-4)
    assert collapsed.counts.tolist() == [32, 32, 0, 0, 0, 0, 0, 0]


def test_model_aux_loss_is_mean_over_layers():
    model = Transformer(small_config(num_hidden_layers=3)).eval()
    randomise(model, **SCALES)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    per_layer = []
    hooks = [blk.mlp.register_forward_hook(lambda m, i, o: per_layer.append(o[1])) for blk in model.block]
    with torch.no_grad():
        out = model(ids)
    for h in hooks:
        h.remove()
    assert out.aux_loss.item() == pytest.approx(sum(s.aux_loss.item() for s in per_layer) / 3, rel=1e-6)
    assert out.expert_counts.shape == (3, 4)
    assert (out.expert_counts.sum(-1) == 2 * 6 * 2).all()


# ---------------------------------------------------------------------------------------------------
# Parameter counts (§8)
# ---------------------------------------------------------------------------------------------------

RELEASE = dict(
    experts_per_token=4, vocab_size=201088, hidden_size=2880, intermediate_size=2880, head_dim=64,
    num_attention_heads=64, num_key_value_heads=8, sliding_window=128, tie_word_embeddings=False,
    attention_bias=True, router_bias=True, rope_scaling_factor=32.0, rope_theta=150000.0,
    initial_context_length=4096,
)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({}, 1_442_041_488),
        (RELEASE | dict(num_hidden_layers=24, num_experts=32), 20_914_757_184),
        (RELEASE | dict(num_hidden_layers=36, num_experts=128), 116_829_156_672),
    ],
    ids=["compact", "20b", "120b"],
)
def test_parameter_counts_on_meta(overrides, expected):
    with torch.device("meta"):
        model = Transformer(ModelConfig(**overrides))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected


def test_compact_defaults_are_tied_without_biases():
    with torch.device("meta"):
        model = Transformer(ModelConfig())
    assert model.unembedding.weight is model.embedding.weight
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith(("qkv.bias", "out.bias", "gate.bias")) for n in names)
    assert model.block[0].attn.sinks.shape == (24,)


# ---------------------------------------------------------------------------------------------------
# ModelConfig validation
# ---------------------------------------------------------------------------------------------------

POSITIVE = (
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size", "intermediate_size",
    "head_dim", "num_attention_heads", "num_key_value_heads", "initial_context_length", "max_context_length",
    "rope_theta", "rms_norm_eps", "swiglu_limit",
)


@pytest.mark.parametrize("key", POSITIVE)
@pytest.mark.parametrize("value", [0, -2])
def test_config_rejects_non_positive(key, value):
    with pytest.raises(ModelConfigError) as info:
        ModelConfig(**{key: value})
    assert info.value.key == key


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(num_attention_heads=24, num_key_value_heads=5), "num_attention_heads"),
        (dict(num_experts=4, experts_per_token=5), "experts_per_token"),
        (dict(initial_context_length=32, rope_theta=1e4, head_dim=16, rope_scaling_factor=4.0),
         "initial_context_length"),
        (dict(head_dim=15), "head_dim"),
        (dict(sliding_window=-1), "sliding_window"),
        (dict(rope_scaling_factor=0.5), "rope_scaling_factor"),
        (dict(rope_scaling_factor=4.0, rope_ntk_alpha=32.0, rope_ntk_beta=1.0), "rope_ntk_alpha"),
        (dict(attention_backend="flash"), "attention_backend"),
        (dict(moe_backend="triton"), "moe_backend"),
    ],
)
def test_config_rejects_invalid_combinations(kwargs, key):
    with pytest.raises(ModelConfigError) as info:
        ModelConfig(**kwargs)
    assert info.value.key == key
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"model.{key}:")


def test_config_accepts_valid_edge_cases():
    # a small L0 is fine without YaRN; experts_per_token == num_experts; MQA; no window
    ModelConfig(initial_context_length=32, rope_theta=1e4, head_dim=16, rope_scaling_factor=1.0)
    ModelConfig(num_experts=4, experts_per_token=4)
    cfg = ModelConfig(num_attention_heads=24, num_key_value_heads=1, sliding_window=0)
    assert not any(cfg.is_sliding(i) for i in range(6))
    assert [small_config(num_hidden_layers=4).is_sliding(i) for i in range(4)] == [True, False, True, False]
    assert dataclasses.replace(small_config(), sliding_window=9).sliding_window == 9
