"""The optimizer and the schedule (train/optim.py): AdamW decays only the projection matrices, and the
learning rate warms up linearly to its peak, then follows a cosine to its floor and stays there.
"""

from __future__ import annotations

import math

import pytest
import torch

from gptoss_cli.config import TrainConfig
from gptoss_cli.model import Transformer
from gptoss_cli.train.optim import build_optimizer, lr_at
from tests.unit.model.references import small_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny shapes on a shared machine


def test_adamw_decays_only_the_projection_matrices():
    cfg = small_config(sliding_window=128, max_context_length=4096, attention_backend="sdpa", moe_backend="auto")
    model = Transformer(cfg)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1, lr=1e-3), torch.device("cpu"))
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(decay_of) == len(names) == sum(len(g["params"]) for g in opt.param_groups)

    decayed = ("attn.qkv.weight", "attn.out.weight", "mlp.gate.weight", "mlp.mlp1_weight", "mlp.mlp2_weight")
    no_decay = (
        "embedding.weight",
        "unembedding.weight",
        "norm.scale",
        "attn.sinks",
        "attn.norm.scale",
        "attn.qkv.bias",
        "attn.out.bias",
        "mlp.norm.scale",
        "mlp.gate.bias",
        "mlp.mlp1_bias",
        "mlp.mlp2_bias",
    )
    seen = set()
    for name, p in names.items():
        if name.endswith(decayed):
            assert decay_of[id(p)] == 0.1, name
            seen.add(max((s for s in decayed if name.endswith(s)), key=len))
        else:
            assert name.endswith(no_decay), f"unexpected parameter {name}"
            assert decay_of[id(p)] == 0.0, name
            seen.add(max((s for s in no_decay if name.endswith(s)), key=len))
    assert seen == set(decayed) | set(no_decay)  # every kind of parameter was checked


def test_lr_schedule_warmup_peak_and_cosine_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    total, floor = 21, 1e-4  # steps 0..20 run; the cosine spans steps 4..20
    warm = [lr_at(s, cfg, total) for s in range(4)]
    assert warm == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear, peak at the end of warmup
    assert lr_at(4, cfg, total) == pytest.approx(1e-3)
    decay = [lr_at(s, cfg, total) for s in range(4, total)]
    assert all(a > b for a, b in zip(decay[:-1], decay[1:], strict=True))
    assert lr_at(12, cfg, total) == pytest.approx((1e-3 + floor) / 2)  # halfway through the cosine
    assert lr_at(9, cfg, total) == pytest.approx(floor + (1e-3 - floor) * 0.5 * (1 + math.cos(math.pi * 5 / 16)))
    assert lr_at(total - 1, cfg, total) == pytest.approx(floor)  # the last step that runs is at the floor
    assert lr_at(total + 5, cfg, total) == pytest.approx(floor)  # stays at the floor
    assert all(floor - 1e-12 <= lr <= 1e-3 + 1e-12 for lr in warm + decay)
    assert lr_at(0, TrainConfig(lr=1e-3, warmup_steps=0), total) == pytest.approx(1e-3)
