"""Attention against hand-written references: the sliding-window mask (key j visible from query t iff
t - W < j <= t) and empty cache slots, sinks as an extra softmax term per head, and the fast paths (SDPA
with the sink folded in, the banded sliding-window path) against eager, outputs and all four gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from gptoss_cli.model import Transformer, attention_mask
from gptoss_cli.model.attention import banded_sdpa_attention, decode_attention, eager_attention, sdpa_attention
from tests.conftest import assert_close, max_diff, randomise
from tests.unit.model.references import (
    ATTN_RTOL,
    FP64_RTOL,
    SCALES,
    attention_inputs,
    sink_attention_ref,
    small_config,
)


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
        assert (mask[0, 0].sum(-1)[window - 1 :] == window).all()  # exactly W keys, the current one included


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


@pytest.mark.parametrize(("nh", "window"), [(4, 6), (8, 0), (2, 6)])  # 2, 4 and 1 query heads per KV head
def test_decode_attention_matches_the_reference(nh, window):
    """The compiled decode step's attention: one query per row against a cache with an empty slot, the
    query heads of each KV head grouped instead of the keys repeated."""
    q_pos = torch.tensor([[19], [15]])
    k_pos = torch.tensor([[12, 13, 14, -1, 15, 16, 17, 18, 19], [-1, -1, 10, 11, 12, 13, 14, 15, -1]])
    mask = attention_mask(q_pos, k_pos, window)  # (2, 1, 1, 9)
    q, _, _, sinks = attention_inputs(seed=5, nh=nh, t=1)
    _, k, v, _ = attention_inputs(seed=6, nh=nh, t=9)
    scale = 1 / math.sqrt(16)
    got = decode_attention(q, k, v, sinks, mask, scale)
    assert got.shape == q.shape
    assert_close(got, sink_attention_ref(q, k, v, sinks, mask, scale), rtol=ATTN_RTOL)
    assert_close(got, eager_attention(q, k, v, sinks, mask, scale), rtol=ATTN_RTOL)


@pytest.mark.parametrize(("t", "window"), [(20, 6), (24, 6), (37, 5)])
def test_banded_sliding_attention_matches_sdpa(t, window):
    """The block-skipping sliding path against full sdpa, in float64: outputs and all four gradients,
    with a left-padded row (positions -1, then 0..) and T not a multiple of W."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, heads, t, 8, generator=g, dtype=torch.float64, requires_grad=True) for heads in (4, 2, 2))
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
