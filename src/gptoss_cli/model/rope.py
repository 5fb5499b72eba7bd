"""Rotary position embedding, half-split (NeoX) style, with gpt-oss's YaRN frequencies and concentration.

cos/sin are computed from absolute positions in fp32 on every forward (one small outer product per
forward, shared by all layers), so no table bounds the context and bf16 never touches a position.
`apply_rotary` is the formula as written; the model runs `apply_rotary_tables`, the same rotation in
three passes over x with full-width tables built once per forward (`rotary_tables`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig


def yarn_inv_freq(config: ModelConfig) -> tuple[float, torch.Tensor]:
    """(concentration, inv_freq[D/2]) as openai/gpt-oss `_compute_concentration_and_inv_freq`."""
    d = config.head_dim
    # Always computed on the CPU (explicit device): tiny, exact, and no meta-device tracing for `build`.
    freq = config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d)  # (D/2,)
    if config.rope_scaling_factor <= 1:
        return 1.0, 1.0 / freq
    s = config.rope_scaling_factor
    concentration = 0.1 * math.log(s) + 1.0
    low, high = config.yarn_correction_range()
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    mask = 1 - ramp  # 1 below `low`: keep the original frequency (extrapolate); 0 above `high`: interpolate
    inv_freq = mask / freq + (1 - mask) / (s * freq)
    return concentration, inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        concentration, inv_freq = yarn_inv_freq(config)
        self.concentration = concentration
        # Not persistent: derived from the config, so checkpoints hold only learned weights.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int -> cos, sin (B, T, D/2) fp32, already scaled by the concentration."""
        with torch.autocast(positions.device.type, enabled=False):
            angles = positions.float()[..., None] * self.inv_freq.float()  # (B, T, D/2)
            return angles.cos() * self.concentration, angles.sin() * self.concentration


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, D); cos/sin (B, T, D/2). Rotates the halves [:D/2] and [D/2:] as pairs."""
    cos = cos[:, :, None, :].to(x.dtype)
    sin = sin[:, :, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, T, D/2) -> ([cos, cos], [-sin, sin]) as (B, T, 1, D) in `dtype`, shared by every layer."""
    cos_full = torch.cat((cos, cos), dim=-1)[:, :, None].to(dtype)
    sin_signed = torch.cat((-sin, sin), dim=-1)[:, :, None].to(dtype)
    return cos_full, sin_signed


def apply_rotary_tables(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """apply_rotary with rotary_tables: x * [cos, cos] + [x2, x1] * [-sin, sin]. x (B, T, heads, D)."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # [x2, x1]; cat beats flip on CPU (docs/performance.md)
    # In x's dtype, as apply_rotary: under autocast the projections are bf16 while the tables are not.
    return torch.addcmul(x * cos_full.to(x.dtype), swapped, sin_signed.to(x.dtype))
