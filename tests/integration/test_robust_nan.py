"""Divergence never reaches the disk: a non-finite gradient norm stops training before the update, weights
holding NaN are never saved, the error names the newest checkpoint verified finite, rotation keeps it, a
resume refuses NaN weights, and greedy decoding on NaN weights fails loudly instead of printing nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptoss_cli.errors import GptossError
from gptoss_cli.run import checkpoint as ckpt
from gptoss_cli.train.loop import Trainer, setup_training

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / ckpt.step_dir_name(step)


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path / "model.safetensors")).values())


def poison_gradients_from(trainer_cls, monkeypatch, step: int) -> None:
    """From optimizer step `step` on, the gradient of one weight is infinite while the loss stays finite:
    what a learning rate that diverges looks like one step before the loss follows."""
    real = trainer_cls._step

    def step_with_inf_grad(self, data, window, stop):
        if self.step + 1 >= step and not getattr(self, "_hooked", False):
            self._hooked = True
            self.model.norm.scale.register_hook(lambda g: torch.full_like(g, float("inf")))
        return real(self, data, window, stop)

    monkeypatch.setattr(trainer_cls, "_step", step_with_inf_grad)


def test_infinite_gradient_with_finite_loss_applies_no_update(small_cfg, tmp_path, monkeypatch):
    cfg = small_cfg("train.keep_checkpoints=1")  # checkpoints at 3 and 6; rotation keeps one
    run = tmp_path / "run"
    poison_gradients_from(Trainer, monkeypatch, step=5)
    p = setup_training(cfg, run)
    trainer = Trainer(p)
    seen = {}
    real_zero = p.optimizer.zero_grad

    def remember_weights(*args, **kwargs):  # after step 4's update: the weights step 5 must not change
        if trainer.step == 3:
            seen.update({n: t.detach().clone() for n, t in p.model.named_parameters()})
        return real_zero(*args, **kwargs)

    p.optimizer.zero_grad = remember_weights
    with pytest.raises(GptossError) as info:
        trainer.run()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("non-finite gradient norm (inf") and "at step 5; no update was applied" in message
    assert message.endswith(f"the newest finite checkpoint is {step_dir(run, 3)}")
    assert trainer.step == 4
    for name, param in p.model.named_parameters():  # step 5 changed nothing
        assert torch.equal(param.detach(), seen[name]), name
    assert ckpt.list_checkpoints(run / "checkpoints") == [step_dir(run, 3)] and all_finite(step_dir(run, 3))


def test_gradient_norm_is_checked_with_clipping_off(small_cfg, tmp_path, monkeypatch):
    poison_gradients_from(Trainer, monkeypatch, step=2)
    p = setup_training(small_cfg("train.grad_clip=0"), tmp_path / "run")
    with pytest.raises(
        GptossError,
        match=r"^non-finite gradient norm .* at step 2; no update was applied; "
        r"no finite checkpoint was saved$",
    ):
        Trainer(p).run()
    assert all(bool(torch.isfinite(t).all()) for t in p.model.parameters())


def test_weights_with_nan_are_never_saved(small_cfg, tmp_path):
    run = tmp_path / "run"
    p = setup_training(small_cfg(), run)
    trainer = Trainer(p, stop_after=3)
    trainer.run()  # a finite checkpoint at step 3
    with torch.no_grad():
        p.model.norm.scale[0] = float("nan")
    with pytest.raises(GptossError) as info:
        trainer.save()
    assert str(info.value) == (
        f"refusing to save a checkpoint at step 3: the weights hold non-finite values "
        f"(norm.scale); the newest finite checkpoint is {step_dir(run, 3)}"
    )
    # The lower-level writer refuses too (import, or any other caller), before creating anything.
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to save .*step-00000009: tensor w holds non-finite"):
        ckpt.save_checkpoint(
            run / "checkpoints", 9, {"w": torch.tensor([1.0, float("inf")])}, {}, ckpt.CheckpointState(step=9), keep=1
        )
    assert ckpt.list_checkpoints(run / "checkpoints") == [step_dir(run, 3)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003"]


def test_newest_finite_skips_checkpoints_of_earlier_versions_that_hold_nan(tmp_path):
    root = tmp_path / "checkpoints"
    good = ckpt.save_checkpoint(root, 1, {"w": torch.ones(2)}, {}, ckpt.CheckpointState(step=1), keep=5)
    bad = ckpt.save_checkpoint(root, 2, {"w": torch.ones(2)}, {}, ckpt.CheckpointState(step=2), keep=5)
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([float("nan"), 1.0])}, str(bad / "model.safetensors"))  # as an old writer did
    assert ckpt.list_checkpoints(root)[-1] == bad
    assert ckpt.newest_finite(root) == good


def test_resume_refuses_nan_weights_and_names_the_finite_one(small_cfg, tmp_path):
    from safetensors.torch import save_file

    run = tmp_path / "run"
    cfg = small_cfg("train.save_every=2")
    p = setup_training(cfg, run)
    Trainer(p, stop_after=4).run()  # checkpoints 2 and 4
    weights = load_file(str(step_dir(run, 4) / "model.safetensors"))
    weights["norm.scale"][0] = float("nan")
    save_file(weights, str(step_dir(run, 4) / "model.safetensors"))
    with pytest.raises(GptossError) as info:
        setup_training(cfg, run, resume=True)
    assert str(info.value) == (
        f"--resume: {step_dir(run, 4)} holds non-finite weights (norm.scale); the newest "
        f"finite checkpoint is {step_dir(run, 2)} (pass it to --resume-from)"
    )


def test_greedy_decoding_on_nan_weights_is_an_error_not_silence(small_cfg, tmp_path):
    from gptoss_cli.config import InferConfig
    from gptoss_cli.infer.generate import generate_tokens
    from gptoss_cli.model import Transformer

    model = Transformer(small_cfg().model).eval()
    with torch.no_grad():
        model.norm.scale.fill_(float("nan"))
    for temperature in (0.0, 0.8):  # greedy (argmax of NaN is an arbitrary id, often EOS) and sampling
        params = InferConfig(max_new_tokens=5, temperature=temperature)
        with pytest.raises(GptossError, match="non-finite logits"):
            generate_tokens(model, [[5, 6, 7]], params, pad_id=1, eos_id=0)
