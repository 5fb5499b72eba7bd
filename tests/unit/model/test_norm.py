"""RMSNorm against its formula in float64: the fp32 output (eps inside the square root), the hand-written
backward of the CPU training path against autograd, and a bf16 input with the scale kept in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch

from gptoss_cli.model.norm import RMSNorm
from tests.conftest import assert_close
from tests.unit.model.references import (
    NORM_RTOL,
    rmsnorm_ref,
)


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
