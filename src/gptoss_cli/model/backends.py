"""The registry of the model's kernel backends: the one table that config validation (model/config.py), the
model (attention.py, moe.py) and `gptoss env` read.

Every backend computes the same math; they differ in speed and memory. The table imports nothing but the
standard library, so a config is validated before torch loads; a backend's kernel is imported when first
asked for. A new backend is one entry here plus the function it names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str  # one line for `gptoss env` and the docs
    kernel: str | None = None  # "module:function" inside gptoss_cli.model; None: chosen per input (auto)


ATTENTION: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "eager", "scores, a concatenated sink column, fp32 softmax: the reference", "attention:eager_attention"
        ),
        Backend(
            "sdpa",
            "fused scaled_dot_product_attention, the sink as one virtual key; banded on long sliding layers",
            "attention:sdpa_attention",
        ),
        Backend("sdpa_dense", "sdpa over every key (masked), without the banded path", "attention:sdpa_attention"),
    )
}

MOE: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("auto", "grouped_mm on CUDA in bf16, else fused_loop (loop under autocast)"),
        Backend("loop", "one matmul pair per expert slice, plain autograd: the reference", "moe:_experts_loop"),
        Backend("fused_loop", "the loop as one autograd node with a hand-written backward", "moe:_FusedExperts"),
        Backend("grouped_mm", "torch._grouped_mm over all experts, no host sync", "moe:_experts_grouped"),
    )
}


def kernel(backend: Backend) -> Callable:
    """The function (or autograd Function) that implements `backend`."""
    if backend.kernel is None:
        raise ValueError(f"{backend.name} chooses a kernel per input; it has none of its own")
    module, name = backend.kernel.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)
