"""RMSNorm exactly as gpt-oss: statistics in fp32, an fp32 `scale`, eps 1e-5, result in the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        # fp32 even when the rest of the model is bf16: gpt-oss (and HF's _keep_in_fp32_modules) do the same.
        self.scale = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        # x * rsqrt(mean(x^2) + eps) * scale in fp32: torch's fused kernel computes exactly that (one op
        # instead of six when no gradient is needed, as in decoding; autograd sees the same formula).
        return F.rms_norm(x.float(), self.scale.shape, self.scale.float(), self.eps).to(x.dtype)
