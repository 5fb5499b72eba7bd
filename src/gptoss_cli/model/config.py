"""ModelConfig: the gpt-oss hyper-parameters, their derived values and their validation.

Field names follow openai/gpt-oss (`num_experts`, `experts_per_token`, `swiglu_limit`, ...). The layout
switches (`tie_word_embeddings`, `attention_bias`, `router_bias`) cover the released checkpoints (untied,
all biases) and the compact reference model (tied, no qkv/out/router bias). This module imports nothing
but the standard library so that the run config can validate a model before torch is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import backends


class ModelConfigError(ValueError):
    """A bad model setting; `key` names the field so callers can point at the YAML line."""

    def __init__(self, key: str, message: str):
        super().__init__(f"model.{key}: {message}")
        self.key = key
        self.message = message


@dataclass
class ModelConfig:
    """Shapes and layout of one gpt-oss model. Defaults are the compact reference model."""

    num_hidden_layers: int = 6
    num_experts: int = 16
    experts_per_token: int = 4
    vocab_size: int = 32000
    hidden_size: int = 1536
    intermediate_size: int = 3072  # per expert; mlp1 produces 2 * intermediate_size (gate, linear interleaved)
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 24
    num_key_value_heads: int = 4
    sliding_window: int = 128  # keys visible on even layers, the current token included; 0 = no window
    initial_context_length: int = 4096  # YaRN's original context (L0)
    max_context_length: int = 4096  # longest sequence the model is used with
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # > 1 turns YaRN on
    rope_ntk_alpha: float = 1.0  # YaRN beta_slow
    rope_ntk_beta: float = 32.0  # YaRN beta_fast
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on qkv and out
    router_bias: bool = False  # bias on the router (gate)
    initializer_range: float = 0.02
    attention_backend: str = "sdpa"  # a name in backends.ATTENTION: eager (the reference) | sdpa | sdpa_dense
    moe_backend: str = "auto"  # a name in backends.MOE: auto | loop (the reference) | fused_loop | grouped_mm

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived values -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_sliding(self, layer_idx: int) -> bool:
        """gpt-oss slides on even layers (0, 2, 4, ...) and attends fully on odd ones."""
        return self.sliding_window > 0 and layer_idx % 2 == 0

    def yarn_correction_range(self) -> tuple[float, float]:
        """(low, high) dims of the YaRN ramp; only meaningful when rope_scaling_factor > 1."""
        half = self.head_dim / 2
        base = math.log(self.rope_theta)
        low = half * math.log(self.initial_context_length / (self.rope_ntk_beta * 2 * math.pi)) / base
        high = half * math.log(self.initial_context_length / (self.rope_ntk_alpha * 2 * math.pi)) / base
        return low, high

    # ---- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        positive = (
            "num_hidden_layers",
            "num_experts",
            "experts_per_token",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "head_dim",
            "num_attention_heads",
            "num_key_value_heads",
            "initial_context_length",
            "max_context_length",
        )
        for key in positive:
            if getattr(self, key) <= 0:
                raise ModelConfigError(key, f"must be > 0, got {getattr(self, key)}")
        for key in (
            "swiglu_limit",
            "rope_theta",
            "rope_scaling_factor",
            "rope_ntk_alpha",
            "rope_ntk_beta",
            "rms_norm_eps",
            "initializer_range",
        ):
            if not getattr(self, key) > 0:
                raise ModelConfigError(key, f"must be > 0, got {getattr(self, key)}")
        if self.head_dim % 2:
            raise ModelConfigError("head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                "num_attention_heads",
                f"{self.num_attention_heads} is not a multiple of num_key_value_heads={self.num_key_value_heads}",
            )
        if self.experts_per_token > self.num_experts:
            raise ModelConfigError(
                "experts_per_token",
                f"{self.experts_per_token} exceeds num_experts={self.num_experts}",
            )
        if self.sliding_window < 0:
            raise ModelConfigError("sliding_window", f"must be >= 0 (0 = no window), got {self.sliding_window}")
        if self.rope_scaling_factor < 1:
            raise ModelConfigError("rope_scaling_factor", f"must be >= 1, got {self.rope_scaling_factor}")
        if self.rope_scaling_factor > 1:
            if self.rope_ntk_alpha >= self.rope_ntk_beta:
                raise ModelConfigError(
                    "rope_ntk_alpha",
                    f"must be below rope_ntk_beta ({self.rope_ntk_alpha} >= {self.rope_ntk_beta})",
                )
            low, high = self.yarn_correction_range()
            if not 0 < low < high < self.head_dim / 2 - 1:
                raise ModelConfigError(
                    "initial_context_length",
                    f"YaRN correction range low={low:.3f}, high={high:.3f} must satisfy "
                    f"0 < low < high < head_dim/2-1={self.head_dim / 2 - 1:g}; "
                    "raise initial_context_length or change rope_ntk_alpha/beta",
                )
        for key, table in (("attention_backend", backends.ATTENTION), ("moe_backend", backends.MOE)):
            if getattr(self, key) not in table:
                raise ModelConfigError(key, f"must be one of {', '.join(table)}, got {getattr(self, key)!r}")
