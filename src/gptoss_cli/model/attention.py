"""Grouped-query attention with one learned sink logit per query head, as in gpt-oss.

    p_j = exp(l_j) / (exp(sink_h) + sum_k exp(l_k))        (the sink has no value vector)

The backends, chosen by `ModelConfig.attention_backend` from backends.py's table, compute exactly this:
- `eager`: scores, a concatenated sink column, fp32 softmax, the column dropped (the reference, as
  openai/gpt-oss and transformers' eager path);
- `sdpa`: torch's fused scaled_dot_product_attention with the sink folded in as one extra key. The head
  dim grows from D to D+8: queries carry sink_h/scale in coordinate D, a virtual key at index 0 is the
  unit vector e_D with a zero value, and real keys carry 0 there. Its logit is then exactly sink_h, and
  the sink's gradient flows through the query. Without a KV cache, sliding layers of T >= 3W tokens
  attend block by block over only the keys each block can see (`banded_sdpa_attention`);
  `sdpa_dense` is the same kernel over all T keys, masked, kept to compare against.

Which keys a query sees comes in as a boolean mask built from absolute positions (see transformer.py),
so the same code serves training, prefill and cached decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rotary_tables

SINK_PAD = 8  # extra head-dim coordinates for the sdpa sink key; 8 keeps bf16 rows 16-byte aligned


def eager_attention(q, k, v, sinks, mask, scale):
    """q (B, NH, T, D); k, v (B, NKV, S, D); sinks (NH,); mask (B, 1, T, S) bool -> (B, NH, T, D)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # query head h reads kv head h // groups
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, NH, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]  # drop the sink column
    return torch.matmul(probs, v.float()).to(q.dtype)


def decode_attention(q, k, v, sinks, mask, scale):
    """eager_attention for a compiled one-token step: q (B, NH, 1, D) against the whole cache.

    The query heads of one KV head are grouped, (B, NKV, G, D), so the cached keys and values are read
    in place instead of repeated per query head; inductor fuses the few small ops into one loop each,
    where scaled_dot_product_attention would be an opaque call with the sink key concatenated onto a
    copy of the whole cache in every layer, every token (docs/performance.md)."""
    b, nh, t, d = q.shape
    nkv = k.shape[1]
    qg = q.float().view(b, nkv, (nh // nkv) * t, d)  # (B, NKV, G*T, D): t == 1 here, so rows are heads
    scores = torch.einsum("bngd,bnsd->bngs", qg, k.float()) * scale  # (B, NKV, G, S)
    scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S) broadcasts over the groups
    sink = sinks.float().view(1, nkv, nh // nkv, 1).expand(b, -1, -1, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("bngs,bnsd->bngd", probs, v.float()).reshape(b, nh, t, d).to(q.dtype)


def sdpa_attention(q, k, v, sinks, mask, scale):
    """Same contract as eager_attention, through F.scaled_dot_product_attention (exact sinks)."""
    b, nh, t, d = q.shape
    nkv = k.shape[1]
    pad = SINK_PAD
    # q' = [q, sink_h/scale, 0...]: the sink coordinate meets only the virtual key below.
    # A -inf sink (sinks off) would make -inf * 0 = NaN against the real keys: exp(-1e4) is already 0.
    sink_col = (sinks.clamp(min=-1e4).to(q.dtype) / scale).view(1, nh, 1, 1).expand(b, nh, t, 1)
    q_ext = torch.cat([q, sink_col, q.new_zeros(b, nh, t, pad - 1)], dim=-1)
    # Virtual key e_D at index 0 (logit = sink_h), with a zero value; real keys/values get zero padding.
    k_sink = k.new_zeros(b, nkv, 1, d + pad)
    k_sink[..., d] = 1.0
    k_ext = torch.cat([k_sink, F.pad(k, (0, pad))], dim=2)  # (B, NKV, S+1, D+pad)
    v_ext = F.pad(v, (0, pad, 1, 0))  # zero row first, zero columns after
    mask_ext = F.pad(mask, (1, 0), value=True)  # the sink key is always visible
    if q.device.type == "cuda" and nkv != nh:
        # With a mask, enable_gqa falls back to the math kernel on CUDA (pytorch#139586): expand instead.
        k_ext = k_ext.repeat_interleave(nh // nkv, dim=1)
        v_ext = v_ext.repeat_interleave(nh // nkv, dim=1)
        out = F.scaled_dot_product_attention(q_ext, k_ext, v_ext, attn_mask=mask_ext, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q_ext, k_ext, v_ext, attn_mask=mask_ext, scale=scale, enable_gqa=nkv != nh)
    return out[..., :d]


def banded_sdpa_attention(q, k, v, sinks, mask, scale, window):
    """sdpa_attention for a sliding layer without a KV cache, over only the keys a query can see.

    Queries go in blocks of W. Block c (queries cW .. cW+W-1) can see keys cW-W+1 .. cW+W-1 at most, so
    it attends to the 2W keys from cW-W (zero keys before the start, masked): ~2W keys per query instead
    of T, so the masked blocks are skipped rather than computed and thrown away. Keys must be the
    queries' own sequence (index i of both is the same token); `mask` still decides visibility, so
    padding and positions work as in sdpa_attention, whose results this equals.
    """
    b, nh, t, d = q.shape
    w = window
    nb = -(-t // w)  # query blocks
    tail = nb * w - t  # padding that makes T a multiple of W

    def key_blocks(x):  # (B, H, T, D) -> (B*nb, H, 2W, D): block c holds padded rows cW .. cW+2W-1
        blocks = F.pad(x, (0, 0, w, tail)).unfold(2, 2 * w, w)  # (B, H, nb, D, 2W)
        return blocks.permute(0, 2, 1, 4, 3).reshape(b * nb, x.shape[1], 2 * w, d)

    qb = F.pad(q, (0, 0, 0, tail)).view(b, nh, nb, w, d).transpose(1, 2).reshape(b * nb, nh, w, d)
    # mask (B, 1, T, T) -> (B*nb, 1, W, 2W): rows of block c, columns cW-W .. cW+W-1 (padding invisible)
    mp = F.pad(mask.expand(b, 1, t, t), (w, tail, 0, tail), value=False).view(b, 1, nb, w, w + nb * w)
    mb = mp.unfold(-1, 2 * w, w).diagonal(dim1=2, dim2=4)  # (B, 1, W, 2W, nb)
    mb = mb.permute(0, 4, 1, 2, 3).reshape(b * nb, 1, w, 2 * w)
    out = sdpa_attention(qb, key_blocks(k), key_blocks(v), sinks, mb, scale)  # (B*nb, NH, W, D)
    return out.view(b, nb, nh, w, d).transpose(1, 2).reshape(b, nh, nb * w, d)[:, :, :t]


class AttentionBlock(nn.Module):
    """x + out(attention(rope(qkv(norm(x))))). Weight names follow openai/gpt-oss (`block.i.attn.*`)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_attention_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window if config.is_sliding(layer_idx) else 0
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.backend = config.attention_backend
        self.kernel = backends.kernel(backends.ATTENTION[self.backend])
        # Banded only pays when T is well above 2W (each query then attends ~2W keys instead of T):
        # used for T >= this many tokens, on sliding layers of the sdpa backend without a cache.
        self.banded_from = 3 * self.sliding_window if self.backend == "sdpa" and self.sliding_window else None
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # One fused projection, rows laid out [q: NH*D | k: NKV*D | v: NKV*D] as in the openai checkpoints.
        self.qkv = nn.Linear(config.hidden_size, config.q_dim + 2 * config.kv_dim, bias=config.attention_bias)
        self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads))  # one logit per query head
        self.out = nn.Linear(config.q_dim, config.hidden_size, bias=config.attention_bias)

    def extra_repr(self) -> str:
        # The window is left out on purpose: it would keep torch from folding the repeated blocks.
        return (
            f"heads={self.num_attention_heads}, kv_heads={self.num_key_value_heads}, "
            f"head_dim={self.head_dim}, sinks=({self.num_attention_heads},), backend={self.backend}"
        )

    def forward(self, x, rope, mask, cache=None):
        """x (B, T, H); rope = rotary_tables(...), (B, T, 1, D) each; mask (B, 1, T, S) bool over the keys."""
        b, t, _ = x.shape
        nh, nkv, d = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        qkv = self.qkv(self.norm(x)).view(b, t, nh + 2 * nkv, d)  # heads [q: NH | k: NKV | v: NKV]
        qk = apply_rotary_tables(qkv[:, :, : nh + nkv], *rope)  # one rotation for queries and keys
        q, k, v = qk[:, :, :nh], qk[:, :, nh:], qkv[:, :, nh + nkv :]  # keys are cached after RoPE
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, S, NKV, D) including the past
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T or S, D)
        if cache is None and self.banded_from is not None and t >= self.banded_from:
            o = banded_sdpa_attention(q, k, v, self.sinks, mask, self.scale, self.sliding_window)
        elif t == 1 and cache is not None and torch.compiler.is_compiling():  # the compiled decode step
            o = decode_attention(q, k, v, self.sinks, mask, self.scale)
        else:
            o = self.kernel(q, k, v, self.sinks, mask, self.scale)  # (B, NH, T, D)
        return x + self.out(o.transpose(1, 2).reshape(b, t, nh * d))
