"""Every failure is one line on stderr: a write error names the path whatever library raised it, a config
that cannot work is refused before any file is written, and an exception gptoss did not foresee says it
is a bug and how to see the traceback. Runs go through the CLI in-process (the `gptoss` fixture).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from safetensors import SafetensorError

from gptoss_cli.run import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("torch_one_thread", "isolated_cache")


def small_args(small_overrides: list[str], *extra: str) -> list[str]:
    return ["--config", "tiny", *[a for o in [*small_overrides, *extra] for a in ("--set", o)]]


def one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err[len("error: ") :].rstrip("\n")


def test_disk_full_in_safetensors_is_one_line_naming_the_checkpoint(gptoss, small_overrides, tmp_path, monkeypatch):
    real = ckpt.save_file

    def full_on_second_checkpoint(tensors, filename, *args, **kwargs):
        if "step-00000006" in filename:  # safetensors raises its own type, not OSError
            raise SafetensorError(
                "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                'message: "No space left on device" })'
            )
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_on_second_checkpoint)
    run = tmp_path / "run"
    code, out, err = gptoss("train", *small_args(small_overrides), "--run", run)
    message = one_line(err.splitlines()[-1] + "\n")
    assert code == 2 and out == ""
    assert message.startswith(f"could not save checkpoint {run / 'checkpoints' / 'step-00000006'} (")
    assert "No space left on device" in message and message.endswith("previous checkpoint is intact (step-00000003)")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000003"]


def test_os_error_from_anywhere_names_the_path(gptoss, small_overrides, tmp_path, monkeypatch):
    from gptoss_cli import memory

    def read_only(self, path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(memory.MemorySampler, "__init__", read_only)
    run = tmp_path / "run"
    code, out, err = gptoss("train", *small_args(small_overrides), "--run", run)
    assert code == 1 and out == ""
    assert one_line(err.splitlines()[-1] + "\n") == f"{run / 'memory.jsonl'}: {os.strerror(errno.EROFS)}"


def test_an_unforeseen_exception_says_it_is_a_bug(gptoss, small_overrides, tmp_path, monkeypatch):
    from gptoss_cli.train import loop

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(loop, "objective", broken)
    code, out, err = gptoss("train", *small_args(small_overrides), "--run", tmp_path / "run")
    assert code == 1 and out == ""
    assert one_line(err.splitlines()[-1] + "\n") == (
        "unexpected ZeroDivisionError: division by zero -- this is a bug in gptoss; run again with "
        "GPTOSS_DEBUG=1 to see the traceback, and report it"
    )


def test_a_vocabulary_too_small_for_the_tokenizer_is_refused_before_any_file(gptoss, small_overrides, tmp_path):
    run = tmp_path / "run"
    code, out, err = gptoss("train", *small_args(small_overrides, "model.vocab_size=200"), "--run", run)
    assert (
        code == 2
        and out == ""
        and one_line(err)
        == (
            "model.vocab_size: 200 is too small for the byte-level tokenizer: it needs at least 263 "
            "(256 bytes + 7 special tokens)"
        )
    )
    assert not run.exists()


def test_the_minimum_vocabulary_is_the_tokenizers_own():
    from gptoss_cli.config import TOKENIZER_MIN_VOCAB
    from gptoss_cli.data.tokenizer import SPECIAL_TOKENS, train_tokenizer

    assert TOKENIZER_MIN_VOCAB == 256 + len(SPECIAL_TOKENS)
    tok = train_tokenizer(["abc abc abc"], TOKENIZER_MIN_VOCAB)  # every byte and special token fits
    assert tok.get_vocab_size() <= TOKENIZER_MIN_VOCAB


@pytest.fixture
def never_prepared(monkeypatch):
    """These configs would otherwise build the 1.4B compact model: fail the test instead if they get that far."""
    from gptoss_cli.train import loop

    monkeypatch.setattr(loop, "setup_training", lambda *a, **k: pytest.fail("the config was accepted"))


@pytest.mark.usefixtures("never_prepared")
def test_a_run_name_that_is_a_path_is_refused(gptoss, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("name: ../elsewhere\nmodel:\n  vocab_size: 512\n", encoding="utf-8")
    code, out, err = gptoss("train", "--config", config)
    assert code == 2 and one_line(err).startswith("mine.yaml: name: must be a plain name (it names the run")


@pytest.mark.usefixtures("never_prepared")
def test_empty_config_file_is_refused(gptoss, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# only a comment\n", encoding="utf-8")
    code, out, err = gptoss("train", "--config", empty, "--run", tmp_path / "run")
    assert code == 2 and one_line(err).startswith("empty.yaml: the config is empty")
    assert not (tmp_path / "run").exists()


def test_run_naming_a_regular_file_is_refused_before_the_tokenizer(gptoss, small_overrides, tmp_path, monkeypatch):
    from gptoss_cli.train import inputs

    monkeypatch.setattr(inputs, "train_tokenizer", lambda *a: pytest.fail("trained a tokenizer first"))
    target = tmp_path / "notes.txt"
    target.write_text("mine\n", encoding="utf-8")
    code, out, err = gptoss("train", *small_args(small_overrides), "--run", target)
    assert code == 2 and one_line(err) == f"--run {target} exists and is not a directory"
    assert target.read_text(encoding="utf-8") == "mine\n"


def test_checkpoint_and_token_cache_files_follow_the_umask(small_cfg, tmp_path, isolated_cache):
    from gptoss_cli.train.loop import Trainer, setup_training

    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        Trainer(setup_training(small_cfg("train.max_steps=1"), run)).run()
    finally:
        os.umask(old)
    cached = [p for p in Path(isolated_cache).rglob("*") if p.is_file()]  # the prepared token shards
    files = [*(run / "checkpoints" / ckpt.step_dir_name(1)).iterdir(), *cached]
    assert cached and len(files) >= 4
    for path in files:
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path


def test_global_batch_and_accumulation_together_are_refused():
    from gptoss_cli.config import ConfigError, load_config

    with pytest.raises(
        ConfigError,
        match=r"^tiny.yaml: train.grad_accum_steps: 4 would be ignored: "
        r"train.global_batch_size=32 derives it; set one of the two$",
    ):
        load_config("tiny", ["train.grad_accum_steps=4", "train.global_batch_size=32"])


def test_schedule_surprises_are_warned(small_cfg, tmp_path, capsys):
    from gptoss_cli.train.loop import Trainer, setup_training

    run = tmp_path / "run"
    Trainer(setup_training(small_cfg("train.warmup_steps=8", "train.max_steps=4"), run)).run()
    assert (
        "train.warmup_steps=8 is not below the run's 4 steps: the learning rate never reaches"
        in capsys.readouterr().err
    )
    Trainer(
        setup_training(
            small_cfg("train.warmup_steps=2", "train.max_steps=40", "train.save_every=100"), run, resume=True
        )
    )
    err = capsys.readouterr().err
    assert "resuming with 40 total steps instead of 4: the cosine schedule is stretched" in err
