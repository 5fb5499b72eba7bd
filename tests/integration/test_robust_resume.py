"""A resume changes nothing in the run directory until it has loaded and verified what it needs: a resume
that fails (unreadable weights, a divergence before its first save) leaves config.yaml, tokenizer.json and
metrics.jsonl byte for byte as they were, so the next plain --resume does not pick up its --set values.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptoss_cli.errors import GptossError
from gptoss_cli.run import checkpoint as ckpt
from gptoss_cli.train.loop import Trainer, setup_training

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(small_cfg, tmp_path) -> Path:
    run = tmp_path / "run"
    Trainer(setup_training(small_cfg(), run)).run()  # 6 steps, checkpoints 3 and 6, metrics lines 1..6
    return run


def test_resume_with_unreadable_weights_changes_nothing(small_cfg, trained):
    step3 = trained / "checkpoints" / ckpt.step_dir_name(3)
    (step3 / "model.safetensors").write_bytes(b"\0" * 64)  # damaged
    before = snapshot(trained)
    with pytest.raises(GptossError, match="cannot read weights"):
        setup_training(small_cfg("train.lr=1e6"), trained, resume_from=step3)
    assert snapshot(trained) == before  # metrics not cut to step 3, config.yaml without lr 1e6


def test_resume_that_diverges_before_its_first_save_changes_nothing(small_cfg, trained):
    step3 = trained / "checkpoints" / ckpt.step_dir_name(3)
    before = snapshot(trained)
    p = setup_training(small_cfg("train.lr=1e6", "train.max_steps=9"), trained, resume_from=step3)
    with torch.no_grad():
        p.model.norm.scale.fill_(float("nan"))  # diverged: the very next step is non-finite
    with pytest.raises(GptossError, match="non-finite loss"):
        Trainer(p).run()
    assert snapshot(trained) == before
    assert "lr: 1000000.0" not in (trained / "config.yaml").read_text(encoding="utf-8")


def test_a_successful_resume_writes_its_config_and_cuts_old_lines(small_cfg, trained):
    import json

    step3 = trained / "checkpoints" / ckpt.step_dir_name(3)
    Trainer(setup_training(small_cfg("train.max_steps=7"), trained, resume_from=step3)).run()
    steps = [
        json.loads(line)["step"]
        for line in (trained / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == [1, 2, 3, 4, 5, 6, 7]  # the old 4..6 were cut at the first new line, then re-logged
    assert "max_steps: 7" in (trained / "config.yaml").read_text(encoding="utf-8")
