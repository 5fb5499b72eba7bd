"""The gpt-oss decoder: embedding, L x (attention block, MoE block), final RMSNorm, unembedding.

    x = embedding[tokens]                                   (B, T, H), no scaling
    for each layer: x = attn(x); x = mlp(x)                 pre-norm residual blocks
    logits = unembedding(norm(x))                           (B, T, V), no bias, no softcap

Layer i slides (W keys, the current token included) when i is even and attends fully when i is odd.
Parallelism, compilation and activation checkpointing are applied from outside; this module is
single-device code.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .attention import AttentionBlock
from .config import ModelConfig
from .cross_entropy import linear_cross_entropy
from .kv_cache import KVCacheProtocol
from .moe import MLPBlock
from .norm import RMSNorm
from .rope import RotaryEmbedding, rotary_tables


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T, V) fp32; (B, 1, V) last_only, (B, K, V) logits_at; None with targets
    aux_loss: torch.Tensor  # () load-balancing loss, mean over layers
    z_loss: torch.Tensor  # () router z-loss, mean over layers
    expert_counts: torch.Tensor  # (L, E) token-slots routed to each expert
    lm_loss: torch.Tensor | None = None  # () mean next-token cross-entropy, only when given targets
    accuracy: torch.Tensor | None = None  # () share of targets that are the argmax, only when given targets


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """q_pos (B, T), k_pos (B, S) absolute positions (-1 = empty) -> (B, 1, T, S) bool, True = visible.

    Key j is visible from query t iff k_pos <= q_pos and, with a window W, q_pos - k_pos < W.
    """
    diff = q_pos[:, :, None] - k_pos[:, None, :]  # (B, T, S)
    visible = (diff >= 0) & (k_pos[:, None, :] >= 0)
    if window:
        visible &= diff < window
    return visible[:, None]


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn = AttentionBlock(config, layer_idx)
        self.mlp = MLPBlock(config)

    def forward(self, x, rope, mask, cache=None):
        return self.mlp(self.attn(x, rope, mask, cache))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Created empty (init_weights fills it): normal_ on the meta device would import torch._refs,
        # which takes seconds (docs/performance.md).
        self.embedding = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.block = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.unembedding = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.unembedding.weight = self.embedding.weight
        self.rope = RotaryEmbedding(config)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for matrices; the two residual output projections (attn.out,
        mlp2) scaled by 1/sqrt(2L) as in GPT-2; zero biases and sinks; unit norm scales."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith(("out.weight", "mlp2_weight")):
                p.normal_(0.0, residual_std, generator=generator)
            elif name.endswith(".scale"):
                p.fill_(1.0)
            elif name.endswith(("bias", "sinks")):
                p.zero_()
            else:  # embedding, unembedding (untied), qkv, gate, mlp1
                p.normal_(0.0, std, generator=generator)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCacheProtocol | None = None,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> ModelOutput:
        """tokens (B, T) -> ModelOutput. positions (B, T) default to 0..T-1, or what the cache says follows it.

        segments (B, T) int, without a cache: documents packed in one row (their positions restart at 0);
        a query sees only keys of its own segment, so the row's attention is block-diagonal.

        With targets (B, T) the output holds the cross-entropy and accuracy instead of logits: the
        unembedding and the loss run fused, chunk by chunk (cross_entropy.py), and no (B, T, V) tensor
        is ever made.

        logits_at (B, K) int: the logits of those K positions of each row only, (B, K, V): scoring a few
        continuation tokens of long inputs needs K rows of V logits, not T (last_only is K = 1, the last).
        """
        b, t = tokens.shape
        if positions is None:
            if cache is not None:
                positions = cache.positions(b, t, tokens.device)
            else:
                positions = torch.arange(t, device=tokens.device).expand(b, t)
        if cache is not None:
            k_full, k_ring = cache.begin(positions)
        else:
            k_full = k_ring = positions
        window = self.config.sliding_window
        full_mask = attention_mask(positions, k_full, 0)
        slide_mask = attention_mask(positions, k_ring, window) if window else full_mask
        if segments is not None:
            if cache is not None:
                raise ValueError("segments apply to a whole packed row, not to cached decoding")
            same = (segments[:, :, None] == segments[:, None, :])[:, None]  # (B, 1, T, T)
            full_mask = full_mask & same
            slide_mask = slide_mask & same if window else full_mask
        x = self.embedding(tokens)
        rope = rotary_tables(*self.rope(positions), x.dtype)  # built once, shared by every layer
        aux, z, counts = [], [], []
        for i, blk in enumerate(self.block):
            mask = slide_mask if self.config.is_sliding(i) else full_mask
            x, stats = blk(x, rope, mask, cache)
            aux.append(stats.aux_loss)
            z.append(stats.z_loss)
            counts.append(stats.counts)
        stats = torch.stack(aux).mean(), torch.stack(z).mean(), torch.stack(counts)
        if targets is not None:
            lm, acc = linear_cross_entropy(self.norm(x).flatten(0, 1), self.unembedding.weight, targets.flatten())
            return ModelOutput(None, *stats, lm_loss=lm, accuracy=acc)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x.gather(1, logits_at[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, K, H)
        logits = self.unembedding(self.norm(x))
        return ModelOutput(logits.to(torch.promote_types(logits.dtype, torch.float32)), *stats)  # fp64 stays
