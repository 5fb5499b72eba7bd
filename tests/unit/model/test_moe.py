"""The clamped interleaved SwiGLU and the MoE block against a slow per-token float64 reference (top-k on
raw logits, then a softmax over the chosen experts, bias inside the weighted sum), every backend against the
loop (outputs and gradients, an idle expert included), the inference, padded and traced decode paths, and the
load-balancing and z losses computed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from gptoss_cli.model.moe import swiglu
from tests.conftest import assert_close, max_diff, rtol_for
from tests.unit.model.references import (
    ALPHA,
    FP32,
    MLP_RTOL,
    make_mlp,
    moe_ref,
    rmsnorm_ref,
    swiglu_ref,
)


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
    expected = torch.tensor(
        [
            [swiglu_ref(g, x) for g, x in zip(gr.tolist(), lr.tolist(), strict=True)]
            for gr, lr in zip(gate, lin, strict=True)
        ]
    )
    assert_close(swiglu(interleaved, 7.0), expected, rtol=1e-5, atol=1e-5, elementwise=True)
    chunked = torch.cat([gate, lin], -1)  # the seed's chunk(2) layout must give something else
    assert max_diff(swiglu(chunked, 7.0), expected) > 1e-2


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


MOE_FAST = [
    "fused_loop",
    pytest.param(
        "grouped_mm", marks=pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch lacks _grouped_mm")
    ),
]


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


@pytest.mark.parametrize("rows", [5, 16, 60])  # 60 rows: some expert gets more than PADDED_ROWS, the loop runs
def test_moe_padded_decode_step_matches_reference(rows):
    """A decode step of many rows (T = 1) runs every expert's rows padded to the busiest one's in one bmm."""
    from gptoss_cli.model import moe

    block = make_mlp(seed=5, num_experts=4, experts_per_token=2, moe_backend="fused_loop").eval()
    x = torch.randn(rows, 1, 32, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        got, stats = block(x)
    assert_close(got, moe_ref(block, x), rtol=MLP_RTOL)
    assert (stats.counts.max().item() > moe.PADDED_ROWS) == (rows == 60)


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
