"""AdamW with the usual no-decay groups, and the learning-rate schedule (linear warmup, cosine decay).

Weight decay applies to the projection matrices only (qkv, out, router, experts). Norm scales, biases,
sinks and the embeddings are not decayed: pulling a norm scale, a bias or a sink logit towards zero has no
regularising meaning, and decaying a (tied) embedding shrinks rare tokens' vectors that see few updates.
Only the parameters that require gradients are optimised: a transform that freezes weights (transforms.py)
leaves them without optimizer state, in memory and in checkpoints.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..config import TrainConfig
from ..errors import GptossError
from ..transforms import trainable


def _decays(name: str, p: torch.nn.Parameter) -> bool:
    if name.startswith(("embedding", "unembedding")):
        return False
    if name.endswith(("bias", "sinks", ".scale")):
        return False
    return p.ndim >= 2


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in trainable(model):
        (decay if _decays(name, p) else no_decay).append(p)
    if not decay and not no_decay:
        raise GptossError("nothing to train: every parameter of the model is frozen")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one pass over each parameter's memory (a CUDA kernel, or torch's CPU kernel) instead of the
    # ~10 passes foreach makes; on CPU it is several times faster (docs/performance.md). Other devices: foreach.
    fast = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **fast)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to cfg.lr over warmup_steps,
    then cosine decay to cfg.lr * min_lr_ratio at the last step, total_steps - 1."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_warnings(t: TrainConfig, total: int, accum: int, per_epoch: int, resumed=None) -> list[str]:
    """The LR schedule is a function of (step, total steps): what would surprise about it (docs/training.md).
    `resumed`: the CheckpointState a resume continues, whose saved config had its own total."""
    out = []
    if t.warmup_steps >= total:
        out.append(
            f"train.warmup_steps={t.warmup_steps} is not below the run's {total} steps: the "
            f"learning rate never reaches train.lr={t.lr:g} (lower train.warmup_steps)"
        )
    old = (resumed.config or {}).get("train", {}) if resumed else {}
    if not old:
        return out
    old_t = dataclasses.replace(t, **{k: old[k] for k in ("lr", "warmup_steps", "min_lr_ratio") if k in old})
    old_total = old.get("max_steps") or max(1, old.get("epochs", t.epochs) * per_epoch // accum)
    before, now = lr_at(resumed.step, old_t, old_total), lr_at(resumed.step, t, total)
    if old_total != total and not math.isclose(before, now, rel_tol=1e-6):
        out.append(
            f"resuming with {total} total steps instead of {old_total}: the cosine schedule is "
            f"stretched over the new total, so the learning rate at step {resumed.step} moves from {before:.2e} "
            f"to {now:.2e}"
        )
    return out
