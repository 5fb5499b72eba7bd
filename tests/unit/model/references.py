"""Independent float64 references for the model's unit tests, written from the formulas of openai/gpt-oss
(gpt_oss/torch/model.py) with plain loops and explicit exponentials, and the small configs, weight scales
and fp32 rounding budgets (tests/conftest.py's rule) those tests share.
"""

from __future__ import annotations

import math

import torch

from gptoss_cli.model import ModelConfig
from gptoss_cli.model.moe import MLPBlock
from tests.conftest import randomise, rtol_for

ALPHA = 1.702


def small_config(**overrides) -> ModelConfig:
    base = dict(
        num_hidden_layers=2,
        num_experts=4,
        experts_per_token=2,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        head_dim=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        max_context_length=64,
        attention_bias=True,
        router_bias=True,
        tie_word_embeddings=False,
        attention_backend="eager",
        moe_backend="loop",
    )
    return ModelConfig(**(base | overrides))


# The model tests' weight scales: std 0.2 everywhere (biases too), mlp1 0.5, so the clamp fires in one block.
SCALES = dict(std=0.2, bias_std=0.2, mlp1_std=0.5)
FP32 = torch.float32
# fp32 rounding budgets (tests/conftest.py): H = 32 or 48 features, T = 20 keys, E <= 6 experts.
NORM_RTOL = rtol_for(FP32, 48)  # one mean of squares, one rsqrt, one scale
ATTN_RTOL = rtol_for(FP32, 20, 3)  # q.k over D = 16, softmax over T = 20, p.v over T = 20
MLP_RTOL = rtol_for(FP32, 32, 4)  # norm, router and mlp1 over H = 32, mlp2 over I = 16, the weighted expert sum
# a whole 2-layer model: per layer attention (3) and MoE (4) reductions, then the unembedding over H = 32
MODEL_RTOL = rtol_for(FP32, 32, 2 * 7 + 1)
FP64_RTOL = 1e-12  # float64 on both sides: ~4500 eps, a check of the algorithm, not of the rounding


def rmsnorm_ref(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * scale.double()


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


def swiglu_ref(gate: float, lin: float, limit: float = 7.0) -> float:
    g = min(gate, limit)
    lin_c = max(min(lin, limit), -limit)
    return g / (1 + math.exp(-ALPHA * g)) * (lin_c + 1)


def moe_ref(block: MLPBlock, x: torch.Tensor, variant: str = "gpt-oss") -> torch.Tensor:
    """Slow per-token float64 reference. variant: gpt-oss | softmax_first | bias_unweighted."""
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
                a = torch.tensor([swiglu_ref(h[2 * j], h[2 * j + 1]) for j in range(len(h) // 2)], dtype=torch.float64)
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
