"""Checkpoint step directories (run/checkpoint.py) on their own: an untied model stores its unembedding, a
first checkpoint that fails leaves nothing behind and claims no previous one, and temporary, incomplete or
corrupt step directories are never picked, and state.json files of earlier versions read unchanged.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from gptoss_cli.model import ModelConfig, Transformer
from gptoss_cli.run import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny shapes on a shared machine


def test_untied_model_stores_its_unembedding():
    model = Transformer(
        ModelConfig(
            num_hidden_layers=1,
            num_experts=2,
            experts_per_token=1,
            vocab_size=64,
            hidden_size=16,
            intermediate_size=16,
            head_dim=8,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    )
    assert {"embedding.weight", "unembedding.weight"} <= ckpt.weights_state_dict(model).keys()


def test_failed_first_checkpoint_does_not_claim_a_previous_one(tmp_path, monkeypatch):
    def disk_full(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(ckpt.CheckpointError) as info:
        _tiny_checkpoint(tmp_path / "checkpoints", 1)
    assert "step-00000001" in str(info.value) and os.strerror(errno.ENOSPC) in str(info.value)
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert "previous checkpoint is intact" not in str(info.value)


def _tiny_checkpoint(root: Path, step: int) -> Path:
    state = ckpt.CheckpointState(step=step)
    return ckpt.save_checkpoint(root, step, {"w": torch.ones(2)}, {"rng.torch": torch.zeros(1)}, state, 5)


def test_temporary_and_incomplete_checkpoint_dirs_are_never_picked(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    good = _tiny_checkpoint(root, 2)
    newer = _tiny_checkpoint(root, 9)
    newer.rename(root / ".tmp-step-00000009-4242")  # complete files, but a temporary name
    no_state = _tiny_checkpoint(root, 7)
    (no_state / "state.json").unlink()
    bad_state = _tiny_checkpoint(root, 8)
    (bad_state / "state.json").write_text('{"step": 8', encoding="utf-8")  # cut off mid-write
    shutil.copytree(good, root / "step-00000011-backup")

    assert ckpt.list_checkpoints(root) == [good]
    assert ckpt.resolve_checkpoint(run) == good and ckpt.resolve_checkpoint(root) == good
    for broken in (no_state, bad_state):
        with pytest.raises(ckpt.CheckpointError, match="incomplete or corrupt"):
            ckpt.resolve_checkpoint(broken)
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "elsewhere")


def test_state_json_of_earlier_versions_reads_unchanged_and_writes_back_the_same_fields(tmp_path):
    """state.json is the on-disk contract: the dict the trainer and the importer wrote before CheckpointState
    existed (None values included, an unknown field from a newer writer) reads into the same values."""
    trained = {
        "format": 1,
        "step": 100,
        "epoch": 6,
        "batch_idx": 2,
        "tokens": 102400,
        "final_val_loss": None,
        "epoch_loss": [12.5, 3],
        "elapsed_s": 7.5,
        "tokenizer_hash": "0123456789abcdef",
        "world_size": 1,
        "python_rng": [3, [1, 2, 3], None],
        "optimizer": {"param_groups": [], "scalars": {}},
        "config": {"model": {"hidden_size": 32}},
        "best_val_loss": 4.87,
        "from_the_future": {"x": 1},
    }
    imported = {
        "format": 1,
        "step": 0,
        "tokenizer_hash": None,
        "config": {"model": {}},
        "imported_from": "/models/hf",
        "source_layout": "hf",
        "quantization": None,
    }
    for i, raw in enumerate((trained, imported)):
        step = tmp_path / f"step-{i}"
        step.mkdir()
        (step / "state.json").write_text(json.dumps(raw), encoding="utf-8")
        state = ckpt.read_state(step)
        for key, value in raw.items():
            assert getattr(state, key, state.extra.get(key)) == value, key
        assert state.to_json() == {k: v for k, v in raw.items() if v is not None}  # None and absent: the same
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "state.json").write_text(json.dumps({"format": 2, "step": 1}), encoding="utf-8")
    with pytest.raises(ckpt.CheckpointError, match="newer gptoss"):
        ckpt.read_state(newer)
