"""The gpt-oss mixture-of-experts block: fp32 top-k router, clamped interleaved SwiGLU experts.

    t = norm(x); logits = gate(t)                       (B*T, E), fp32
    vals, idx = topk(logits, k); w = softmax(vals)      softmax over the k chosen logits only
    h = mlp1_weight[e] @ t + mlp1_bias[e]               (2I,), columns interleaved: even = gate, odd = linear
    a = clamp(glu, max=L) * sigmoid(1.702 glu) * (clamp(lin, -L, L) + 1)
    y = sum_e w_e * (mlp2_weight[e] @ a + mlp2_bias[e])  the bias is added before weighting

Only the routed (token, expert) pairs are computed: the N*k assignments are sorted by expert, each expert
multiplies its contiguous slice (or one `torch._grouped_mm` call does all of them), and the results are
scattered back. Expert weights are stacked 3-D parameters, so DDP and FSDP2 see every expert on every rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .norm import RMSNorm

SWIGLU_ALPHA = 1.702


class RouterStats(NamedTuple):
    aux_loss: torch.Tensor  # () Switch load-balancing loss over all experts, 1.0 when balanced (0 in eval mode)
    z_loss: torch.Tensor  # () mean squared logsumexp of the router logits (0 in eval mode)
    counts: torch.Tensor  # (E,) token-slots routed to each expert


def swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    """h (M, 2I) interleaved [gate0, lin0, gate1, lin1, ...] -> (M, I)."""
    glu, lin = h[..., ::2], h[..., 1::2]
    glu = glu.clamp(max=limit)  # the gate is clamped from above only
    lin = lin.clamp(min=-limit, max=limit)
    return glu * torch.sigmoid(SWIGLU_ALPHA * glu) * (lin + 1)


def _experts_loop(xs, counts, w1, b1, w2, b2, limit):
    """xs (M, H) sorted by expert; counts (E,). One matmul pair per expert slice (one host sync)."""
    outs = []
    for e, chunk in enumerate(torch.split(xs, counts.tolist())):
        if not chunk.shape[0]:  # decode routes few tokens: skip idle experts (their rows get zero gradient)
            continue
        h = F.linear(chunk, w1[e], b1[e])  # (n_e, 2I)
        outs.append(F.linear(swiglu(h, limit), w2[e], b2[e]))  # (n_e, H)
    return torch.cat(outs)


def _experts_grouped(xs, counts, expert_sorted, w1, b1, w2, b2, limit):
    """Same contract through torch._grouped_mm: offsets stay on the device, so no host sync."""
    dtype = torch.get_autocast_dtype(xs.device.type) if torch.is_autocast_enabled(xs.device.type) else xs.dtype
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch._grouped_mm(xs.to(dtype), w1.to(dtype).transpose(-2, -1), offs=offs)  # (M, 2I)
    h = h + b1.to(dtype)[expert_sorted]
    a = swiglu(h, limit)
    y = torch._grouped_mm(a, w2.to(dtype).transpose(-2, -1), offs=offs)  # (M, H)
    return y + b2.to(dtype)[expert_sorted]


def _use_grouped_mm(backend: str, x: torch.Tensor, hidden: int, inter: int) -> bool:
    if backend != "auto":
        return backend == "grouped_mm"
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda":
        return False  # on CPU grouped_mm is a loop of mm calls: the slice loop is as fast (performance.md §1)
    bf16 = x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    )
    return bf16 and hidden % 8 == 0 and inter % 8 == 0  # the fast kernel wants 16-byte aligned rows


class MLPBlock(nn.Module):
    """x + MoE(norm(x)). Weight names follow openai/gpt-oss (`block.i.mlp.*`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = e
        self.experts_per_token = config.experts_per_token
        self.swiglu_limit = config.swiglu_limit
        self.intermediate_size = i
        self.backend = config.moe_backend
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.gate = nn.Linear(h, e, bias=config.router_bias)
        self.mlp1_weight = nn.Parameter(torch.empty(e, 2 * i, h))  # (E, 2I, H), out x in
        self.mlp1_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.mlp2_weight = nn.Parameter(torch.empty(e, h, i))  # (E, H, I)
        self.mlp2_bias = nn.Parameter(torch.zeros(e, h))

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, experts_per_token={self.experts_per_token}, "
                f"mlp1_weight={tuple(self.mlp1_weight.shape)}, mlp2_weight={tuple(self.mlp2_weight.shape)}, "
                f"swiglu_limit={self.swiglu_limit}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        """x (B, T, H) -> (x + moe, router statistics)."""
        b, t, hidden = x.shape
        k, n_exp = self.experts_per_token, self.num_experts
        tokens = self.norm(x).reshape(b * t, hidden)  # (N, H)
        # The router runs in fp32: bf16 logits create ties that pick the wrong experts.
        bias = None if self.gate.bias is None else self.gate.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(tokens.float(), self.gate.weight.float(), bias)  # (N, E)
        top_vals, top_idx = torch.topk(logits, k, dim=-1, sorted=True)  # (N, k)
        weights = torch.softmax(top_vals, dim=-1)  # (N, k), fp32

        flat = top_idx.reshape(-1)  # (N*k,) expert of each assignment
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=n_exp)  # (E,)
        xs = tokens[order // k]  # (N*k, H) token rows in expert order
        if _use_grouped_mm(self.backend, tokens, hidden, self.intermediate_size):
            ys = _experts_grouped(xs, counts, flat[order], self.mlp1_weight, self.mlp1_bias,
                                  self.mlp2_weight, self.mlp2_bias, self.swiglu_limit)
        else:
            ys = _experts_loop(xs, counts, self.mlp1_weight, self.mlp1_bias,
                               self.mlp2_weight, self.mlp2_bias, self.swiglu_limit)
        # Scatter back to assignment order (deterministic, unlike index_add_) and weight per token.
        per_slot = ys.new_empty(ys.shape).index_copy(0, order, ys).view(b * t, k, hidden)
        y = (per_slot.float() * weights[..., None]).sum(1).to(x.dtype)  # (N, H)

        if not self.training:  # the losses only matter for training; decoding skips their softmax
            zero = logits.new_zeros(())
            return x + y.view(b, t, hidden), RouterStats(zero, zero, counts)
        # Switch-style balance: E * sum_e (fraction of assignments to e) * (mean router prob of e).
        probs = torch.softmax(logits, dim=-1)
        fraction = counts.float() / flat.numel()
        aux = n_exp * (fraction * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return x + y.view(b, t, hidden), RouterStats(aux, z, counts)
