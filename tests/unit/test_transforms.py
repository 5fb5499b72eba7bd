"""Model transforms (transforms.py) and where training setup and the run loader apply them.

The seam the adapters and packed experts plug into: a transform that freezes every weight but one trains
exactly that one (the others equal their starting values bit for bit, the optimizer and its checkpoint hold
state for it alone); a before-weights transform runs before the checkpoint is loaded, the others after it.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from gptoss_cli.errors import GptossError
from gptoss_cli.model import Transformer
from gptoss_cli.run import checkpoint as ckpt
from gptoss_cli.transforms import (
    ModelTransform,
    apply_transforms,
    build_model,
    inference_transforms,
    trainable,
    training_transforms,
)

KEEP = "block.0.attn.sinks"


def train_only(name: str) -> ModelTransform:
    """Freeze every parameter but `name`."""

    def apply(model: Transformer) -> None:
        for n, p in model.named_parameters():
            p.requires_grad_(n == name)

    return ModelTransform(f"train only {name}", apply)


def test_a_transform_that_freezes_all_but_one_tensor_trains_only_that_tensor(small_cfg, tmp_path):
    from gptoss_cli.train.loop import Trainer, setup_training

    cfg = small_cfg("train.max_steps=3", "train.lr=1e-2", "train.warmup_steps=0")
    start = build_model(cfg.model, seed=cfg.train.seed).state_dict()  # what setup builds from the seed
    setup = setup_training(cfg, tmp_path / "run", transforms=[train_only(KEEP)])
    assert setup.transforms == ["device cpu", f"train only {KEEP}"]
    assert [p for group in setup.optimizer.param_groups for p in group["params"]] == [setup.model.block[0].attn.sinks]
    summary = Trainer(setup).run()
    assert summary["status"] == "completed"

    saved = ckpt.resolve_checkpoint(tmp_path / "run")
    weights = load_file(str(saved / ckpt.MODEL))
    changed = sorted(n for n, t in weights.items() if not torch.equal(t, start[n]))
    assert changed == [KEEP]  # the one trainable tensor moved; every other is its starting value exactly
    moments = sorted(n for n in load_file(str(saved / ckpt.TRAINER)) if not n.startswith("rng."))
    assert moments == [f"optim.{KEEP}.{k}" for k in ("exp_avg", "exp_avg_sq", "step")]  # AdamW state: it alone
    groups = ckpt.read_state(saved).optimizer["param_groups"]
    assert [g["params"] for g in groups] == [[], [KEEP]]  # sinks are not decayed


def test_the_optimizer_refuses_a_model_with_nothing_to_train(small_cfg, tmp_path):
    from gptoss_cli.train.loop import setup_training

    freeze = ModelTransform("freeze all", lambda m: m.requires_grad_(False))
    with pytest.raises(GptossError, match="nothing to train"):
        setup_training(small_cfg("train.max_steps=1"), tmp_path / "run", transforms=[freeze])


def test_training_and_inference_lists_in_their_order():
    cpu = torch.device("cpu")
    names = [t.name for t in training_transforms("bf16", cpu, checkpointing=True, compile=True)]
    assert names == ["precision bfloat16", "device cpu", "activation checkpointing", "compile"]
    assert [t.name for t in training_transforms("bf16-mixed", cpu, checkpointing=False, compile=False)] == [
        "device cpu"
    ]  # bf16-mixed keeps fp32 weights: autocast computes in bf16
    assert [t.name for t in inference_transforms(cpu, torch.bfloat16)] == [
        "device cpu",
        "precision bfloat16",
        "frozen, eval mode",
    ]


def test_checkpointing_runs_its_hook_before_each_block_and_each_recomputation(monkeypatch):
    """`before_block` (CPU training hands freed heap back there) runs before every block's forward and again
    before its recomputation in the backward pass; the gradients are those of plain checkpointing. The CPU
    training list passes memory.release_freed_memory_if_due, uncompiled."""
    from gptoss_cli import transforms
    from gptoss_cli.transforms import activation_checkpointing
    from tests.conftest import tiny_model_config

    cfg = tiny_model_config()
    tokens = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    calls, grads = [], []
    for hook in (None, lambda: calls.append(len(calls))):
        model = build_model(cfg, seed=4)
        apply_transforms(model, [activation_checkpointing(hook)])
        model(tokens).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == 2 * cfg.num_hidden_layers  # forward, then the recomputation in backward
    for name, grad in grads[0].items():
        assert torch.equal(grads[1][name], grad), name
    released = []
    monkeypatch.setattr(transforms, "release_freed_memory_if_due", lambda: released.append(True))
    model = build_model(cfg, seed=4)
    apply_transforms(model, training_transforms("fp32", torch.device("cpu"), checkpointing=True, compile=False))
    model(tokens).logits.square().mean().backward()
    assert len(released) == 2 * cfg.num_hidden_layers


def test_inference_transforms_apply_the_precision_policy_and_freeze(small_cfg):
    model = build_model(small_cfg().model, seed=0)
    apply_transforms(model, inference_transforms(torch.device("cpu"), torch.bfloat16))
    assert not model.training and trainable(model) == []
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["block.0.attn.qkv.weight"] == torch.bfloat16
    assert dtypes["block.0.mlp.gate.weight"] == torch.float32 and dtypes["norm.scale"] == torch.float32


def test_load_run_applies_before_weights_transforms_before_the_checkpoint_and_the_rest_after(
    small_cfg, builtin_tok, tmp_path, monkeypatch
):
    from gptoss_cli.run import open as run_open
    from tests.conftest import save_run

    cfg = small_cfg("model.vocab_size=400")  # the built-in tokenizer's size
    trained = build_model(cfg.model, seed=3)
    save_run(tmp_path / "run", cfg, builtin_tok, trained, step=1)
    events = []
    real_load = run_open.load_weights
    monkeypatch.setattr(run_open, "load_weights", lambda m, p, **kw: (events.append("weights"), real_load(m, p, **kw)))
    before = ModelTransform("before", lambda m: events.append("before"), before_weights=True)
    after = ModelTransform("after", lambda m: events.append(("after", m.training)))
    loaded = run_open.load_run(tmp_path / "run", device="cpu", transforms=[after, before])
    assert events == ["before", "weights", ("after", True)]  # the caller's after-transforms precede eval mode
    assert loaded.transforms == ["before", "after", "device cpu", "precision float32", "frozen, eval mode"]
    assert loaded.run.path == tmp_path / "run" and loaded.run.chat_template == tmp_path / "run" / "chat_template.json"
    for name, p in trained.named_parameters():
        assert torch.equal(dict(loaded.model.named_parameters())[name], p.detach())
