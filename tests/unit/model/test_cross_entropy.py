"""The fused unembedding + cross-entropy (model/cross_entropy.py) against `F.cross_entropy(x @ w.T)`.

Loss, accuracy and both gradients, in float64 (tight) and under the precisions training uses (bf16
weights, bf16 autocast over fp32 weights), with ignored targets and chunk sizes that do not divide the rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptoss_cli.model.cross_entropy import chunk_rows, linear_cross_entropy
from tests.conftest import assert_close, rtol_for

FP64_RTOL = 1e-12  # float64 on both sides: ~4500 eps, a check of the algorithm, not of the rounding
# fp32 logsumexp over V = 50 and the mean over the rows, from the same bf16 logits on both sides
LOSS_RTOL = rtol_for(torch.float32, 50, 2)


def _inputs(dtype, n=37, h=12, v=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(v, h, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100  # ignored, as F.cross_entropy's ignore_index
    return x, w, targets


def _reference(x, w, targets, upstream=1.0):
    logits = x @ w.T
    loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)
    (upstream * loss).backward()
    keep = targets != -100
    acc = ((logits.argmax(-1) == targets) & keep).sum() / keep.sum()
    grads = x.grad, w.grad
    x.grad = w.grad = None
    return loss.detach(), acc, grads


@pytest.mark.parametrize("rows", [1, 8, 37, 100])
def test_matches_cross_entropy_in_float64(rows):
    x, w, targets = _inputs(torch.float64)
    ref_loss, ref_acc, (ref_dx, ref_dw) = _reference(x, w, targets, upstream=0.3)
    loss, acc = linear_cross_entropy(x, w, targets, rows=rows)
    (0.3 * loss).backward()  # the upstream gradient is applied in backward
    assert loss.dtype == torch.float64
    assert_close(loss, ref_loss, rtol=FP64_RTOL)
    assert acc.item() == pytest.approx(ref_acc.item(), abs=1e-12)
    assert_close(x.grad, ref_dx, rtol=FP64_RTOL)
    assert_close(w.grad, ref_dw, rtol=FP64_RTOL)
    assert x.grad[::5].abs().max().item() == 0.0  # ignored rows get no gradient


def test_a_second_backward_is_refused():
    x, w, targets = _inputs(torch.float64)
    loss, _ = linear_cross_entropy(x, w, targets, rows=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def test_ignored_rows_do_not_change_the_result():
    x, w, targets = _inputs(torch.float64)
    keep = targets != -100
    loss, acc = linear_cross_entropy(x, w, targets, rows=8)
    kept_loss, kept_acc = linear_cross_entropy(x[keep], w, targets[keep], rows=8)
    assert_close(loss, kept_loss, rtol=FP64_RTOL)
    assert acc.item() == pytest.approx(kept_acc.item(), abs=1e-12)


def test_bf16_weights_match_the_bf16_reference():
    """Pure bf16 (train.precision=bf16): bf16 logits promoted to fp32, gradients in bf16."""
    x, w, targets = _inputs(torch.bfloat16, n=64, h=32, v=50)
    ref_loss, _, (ref_dx, ref_dw) = _reference(x, w, targets)
    loss, _ = linear_cross_entropy(x, w, targets, rows=16)
    loss.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=LOSS_RTOL)
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16
    # bf16 rounds the gradients (and dW once per chunk here): a few bf16 ulps of the largest entry
    assert_close(x.grad, ref_dx, rtol=2e-2)
    assert_close(w.grad, ref_dw, rtol=2e-2)


def test_autocast_matches_linear_under_autocast():
    """bf16-mixed: fp32 weights, matmuls in bf16 as nn.Linear does under autocast, fp32 gradients."""
    x, w, targets = _inputs(torch.float32, n=64, h=32, v=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(x, w)
    F.cross_entropy(logits.float(), targets).backward()
    ref_loss = F.cross_entropy(logits.float(), targets).item()
    ref_dx, ref_dw = x.grad, w.grad
    x.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(x, w, targets, rows=16)
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss, rel=LOSS_RTOL)
    assert x.grad.dtype == w.grad.dtype == torch.float32
    assert_close(x.grad, ref_dx, rtol=1e-2)
    assert_close(w.grad, ref_dw, rtol=1e-2)


def test_no_gradient_work_without_grad():
    x, w, targets = _inputs(torch.float64)
    with torch.no_grad():
        loss, _ = linear_cross_entropy(x, w, targets, rows=8)
    assert not loss.requires_grad
    ref_loss, _, _ = _reference(x, w, targets)
    assert_close(loss, ref_loss, rtol=FP64_RTOL)


def test_chunks_follow_the_device():
    assert chunk_rows(8000, "cpu") == 2**20 // 8000  # ~4 MB of fp32 logits: stays in cache
    assert chunk_rows(32000, "cuda") == 2**24 // 32000
    assert chunk_rows(10**7, "cpu") == 32  # a floor, so a huge vocabulary still makes real matmuls
