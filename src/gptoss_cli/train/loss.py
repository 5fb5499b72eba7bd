"""The training objective, defined once for the trainer, `gptoss bench` and the benchmarks.

    loss = cross_entropy(next token) + aux_loss_coef * load-balancing loss + z_loss_coef * router z-loss

With `train.fused_loss` (the default) the model computes the cross-entropy itself, fused with the
unembedding (model/cross_entropy.py), and never makes the (B, T, V) logits; otherwise the logits are
made and `F.cross_entropy` runs on them. The two are equal in tests.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..model import ModelOutput
from ..model.cross_entropy import IGNORE_INDEX


class Objective(NamedTuple):
    loss: torch.Tensor  # () what backward() runs on
    lm: torch.Tensor  # () the next-token cross-entropy alone
    accuracy: torch.Tensor  # () share of targets that are the model's argmax
    out: ModelOutput  # the router statistics (aux_loss, z_loss, expert_counts)


def objective(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    t: TrainConfig,
    autocast: AbstractContextManager | None = None,
    positions: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> Objective:
    """inputs, targets (B, T) token ids -> the loss terms. `model` may be wrapped (DDP, FSDP).

    Targets of IGNORE_INDEX are not counted (conversations train on assistant tokens only); positions and segments
    (B, T) describe rows that pack several conversations (data/conversations.py)."""
    autocast = autocast or nullcontext()
    if t.fused_loss:
        with autocast:
            out = model(inputs, positions, targets=targets, segments=segments)
        lm, accuracy = out.lm_loss, out.accuracy
    else:
        with autocast:
            out = model(inputs, positions, segments=segments)
        lm = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
        counted = targets != IGNORE_INDEX
        accuracy = ((out.logits.argmax(-1) == targets) & counted).sum() / counted.sum()
    loss = lm + t.aux_loss_coef * out.aux_loss + t.z_loss_coef * out.z_loss
    return Objective(loss, lm, accuracy, out)
