"""`gptoss train` for a first-time user: no --config warns before the 1.4B model, --resume-from a step
directory takes that run's config, and its errors name --resume-from, not --resume.
"""

from __future__ import annotations

import pytest

from gptoss_cli.errors import GptossError

pytestmark = pytest.mark.usefixtures("torch_one_thread", "isolated_cache")


def test_no_config_warns_about_the_compact_model(gptoss, tmp_path, monkeypatch):
    from gptoss_cli.train import loop

    def stop_here(cfg, *args, **kwargs):  # the warning is what matters; a 1.4B run is not
        assert cfg.name == "compact"
        raise GptossError("stopped by the test")

    monkeypatch.setattr(loop, "setup_training", stop_here)
    code, out, err = gptoss("train", "--run", tmp_path / "run")
    assert code == 2 and "stopped by the test" in err
    assert "warning: no --config: training the compact reference model (~1.4 billion parameters)" in err
    assert "--config tiny" in err


def test_resume_from_a_step_dir_uses_that_runs_config_and_names_its_flag(gptoss, small_overrides, tmp_path):
    run = tmp_path / "run"
    sets = [a for o in [*small_overrides, "train.max_steps=3"] for a in ("--set", o)]
    code, out, err = gptoss("train", "--config", "tiny", *sets, "--run", run)
    assert code == 0, err
    step = run / "checkpoints" / "step-00000003"

    code, out, err = gptoss("train", "--resume-from", step, "--set", "train.max_steps=4")  # no --config
    assert code == 0, err
    assert f"resuming from {step} (step 3)" in err and "warning: no --config" not in err

    code, out, err = gptoss(
        "train", "--config", "tiny", "--resume-from", run / "checkpoints" / "step-00000004", "--run", tmp_path / "other"
    )
    assert code == 2 and err.startswith("error: --resume-from: ") and "was trained with model." in err


def test_resume_from_a_lone_step_dir_takes_the_config_saved_in_its_state(gptoss, small_overrides, tmp_path):
    """A step directory copied on its own has no RUN/config.yaml: its state.json's config is the run's,
    not the compact default (whose shapes would not fit its weights)."""
    import shutil

    run = tmp_path / "run"
    sets = [a for o in [*small_overrides, "train.max_steps=3"] for a in ("--set", o)]
    code, out, err = gptoss("train", "--config", "tiny", *sets, "--run", run)
    assert code == 0, err
    lone = tmp_path / "copied" / "step-00000003"
    shutil.copytree(run / "checkpoints" / "step-00000003", lone)
    shutil.copy(run / "tokenizer.json", tmp_path / "tokenizer.json")

    code, out, err = gptoss(
        "train", "--resume-from", lone, "--tokenizer", tmp_path / "tokenizer.json",
        "--run", tmp_path / "again", "--set", "train.max_steps=4",
    )  # fmt: skip
    assert code == 0, err
    assert "warning: no --config" not in err and f"resuming from {lone} (step 3)" in err
    assert (tmp_path / "again" / "checkpoints" / "step-00000004").is_dir()
