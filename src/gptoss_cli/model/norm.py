"""RMSNorm exactly as gpt-oss: statistics in fp32, an fp32 `scale`, eps 1e-5, result in the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm forward and backward written out for CPU training. Autograd through F.rms_norm runs its
    composite formula there (about six ops forward, ten backward); this keeps the normalised input
    from the forward and needs three passes forward and six backward (measured in docs/performance.md)."""

    @staticmethod
    def forward(ctx, x, scale, eps):  # x (..., H), scale (H,), both fp32 (or both fp64)
        # sum of squares as a dot product: one read of x, no x^2 temporary
        rstd = torch.linalg.vecdot(x, x).div_(x.shape[-1]).add_(eps).rsqrt_().unsqueeze(-1)  # (..., 1)
        xhat = x * rstd
        ctx.save_for_backward(xhat, scale, rstd)
        return xhat * scale

    @staticmethod
    def backward(ctx, dy):
        xhat, scale, rstd = ctx.saved_tensors
        g = dy * scale
        # y = xhat * scale; d xhat / dx = rstd (I - xhat xhat^T / H)
        dx = dscale = None
        if ctx.needs_input_grad[0]:
            dot = torch.linalg.vecdot(g, xhat).unsqueeze(-1).div_(xhat.shape[-1])  # (..., 1)
            dx = torch.addcmul(g, xhat, dot, value=-1).mul_(rstd)
        if ctx.needs_input_grad[1]:
            dscale = (dy * xhat).flatten(0, -2).sum(0)
        return dx, dscale, None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        # fp32 even when the rest of the model is bf16: gpt-oss (and HF's _keep_in_fp32_modules) do the same.
        self.scale = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        # x * rsqrt(mean(x^2) + eps) * scale in fp32. Without a gradient F.rms_norm is torch's fused
        # kernel (one op instead of six, as in decoding); training on CPU uses the function above.
        stats = torch.promote_types(x.dtype, torch.float32)  # fp32 (fp64 stays fp64, as in tests)
        xf, scale = x.to(stats), self.scale.to(stats)
        if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _RMSNormCPU.apply(xf, scale, self.eps).to(x.dtype)
        return F.rms_norm(xf, self.scale.shape, scale, self.eps).to(x.dtype)
