"""Training end to end on a very small model (conftest.SMALL_OVERRIDES): exact resume, the run directory,
atomic checkpoints under a failing disk, non-finite losses and bad inputs.

Runs go through `train.prepare` and `train.Trainer` as the CLI does; `stop_after=N` behaves like a Ctrl-C
after N optimizer steps. Every run uses a token cache under tmp_path (the `isolated_cache` fixture).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gptoss_cli.config import ConfigError, load_config
from gptoss_cli.data.tokenizer import train_tokenizer
from gptoss_cli.errors import GptossError
from gptoss_cli.model import Transformer
from gptoss_cli.run import checkpoint as ckpt
from gptoss_cli.train.loop import Trainer, setup_training
from gptoss_cli.train.optim import lr_at

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TRAIN_FIELDS = {
    "step",
    "epoch",
    "loss",
    "aux_loss",
    "z_loss",
    "ppl",
    "accuracy",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "expert_counts",
}


def train(cfg, run: Path | None, stop_after: int | None = None, **kw):
    """setup_training + Trainer.run -> (TrainingSetup, summary)."""
    p = setup_training(cfg, run, **kw)
    return p, Trainer(p, stop_after=stop_after).run()


def metric_lines(run: Path, kind: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [rec for rec in map(json.loads, lines) if rec["kind"] == kind]


def losses(run: Path) -> dict[int, float]:
    return {rec["step"]: rec["loss"] for rec in metric_lines(run)}


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / ckpt.step_dir_name(step)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def load_model(cfg, path: Path) -> Transformer:
    model = Transformer(cfg.model)
    ckpt.load_weights(model, path / "model.safetensors")
    return model


# ---- exact resume ---------------------------------------------------------------------------------


def test_small_config_validates(small_cfg):
    cfg = small_cfg()
    assert (cfg.model.hidden_size, cfg.model.num_experts, cfg.train.max_steps) == (32, 4, 6)
    assert cfg.model.q_dim == 32 and cfg.train.seq_len <= cfg.model.max_context_length


def test_exact_resume_after_interrupt_matches_uninterrupted_run(small_cfg, tmp_path):
    cfg = small_cfg()  # 6 steps, checkpoints every 3
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    pa, summary_a = train(cfg, run_a)
    assert summary_a["status"] == "completed" and summary_a["steps"] == 6

    _, interrupted = train(cfg, run_b, stop_after=3)
    assert interrupted["status"] == "interrupted" and interrupted["steps"] == 3
    assert ckpt.resolve_checkpoint(run_b) == step_dir(run_b, 3)
    pb, summary_b = train(cfg, run_b, resume=True)
    assert summary_b["status"] == "completed" and summary_b["steps"] == 6

    # One train line per step, no duplicates after the resume, and bit-identical values.
    assert [rec["step"] for rec in metric_lines(run_b)] == [1, 2, 3, 4, 5, 6]
    for rec_a, rec_b in zip(metric_lines(run_a), metric_lines(run_b), strict=True):
        for key in ("step", "epoch", "loss", "aux_loss", "accuracy", "lr", "grad_norm", "expert_counts"):
            assert rec_a[key] == rec_b[key], (rec_a["step"], key)
    assert [r["val_loss"] for r in metric_lines(run_a, "eval")] == [r["val_loss"] for r in metric_lines(run_b, "eval")]
    assert summary_a["final_loss"] == summary_b["final_loss"] and summary_a["tokens"] == summary_b["tokens"]

    assert_same_weights(pa.model, pb.model)
    opt_a, opt_b = pa.optimizer.state_dict()["state"], pb.optimizer.state_dict()["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) == len(list(pa.model.parameters()))
    for idx in opt_a:  # AdamW moments and step counts continue exactly too
        assert all(torch.equal(opt_a[idx][k], opt_b[idx][k]) for k in ("step", "exp_avg", "exp_avg_sq")), idx
    final_a = load_file(str(step_dir(run_a, 6) / "model.safetensors"))
    final_b = load_file(str(step_dir(run_b, 6) / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_exact_resume_from_step_dir_across_epochs_withaccumulation(small_cfg, small_corpus, tmp_path):
    cfg = small_cfg(
        f"data.paths={small_corpus}",
        "train.grad_accum_steps=2",
        "train.max_steps=8",
        "train.save_every=4",
        "train.eval_every=4",
    )
    run_a, run_b, run_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    pa, summary_a = train(cfg, run_a)
    per_epoch = pa.train_data.batches_per_epoch
    assert 2 <= per_epoch <= 8  # 16 micro-batches cross at least two epoch boundaries
    assert summary_a["epochs"] == pytest.approx(16 / per_epoch) and 16 // per_epoch >= 2  # a fraction included
    assert len({rec["epoch"] for rec in metric_lines(run_a)}) >= 3

    train(cfg, run_b, stop_after=4)
    # --resume-from a step directory, no --run: the run is the step directory's RUN/checkpoints/..
    pb, summary_b = train(cfg, None, resume_from=step_dir(run_b, 4))
    assert pb.run_dir == run_b and summary_b["steps"] == 8
    assert losses(run_a) == losses(run_b) and len(losses(run_b)) == 8
    assert_same_weights(pa.model, pb.model)

    # --resume-from another run's checkpoint into a new run directory continues identically too.
    pc, _ = train(cfg, run_c, resume_from=step_dir(run_a, 4))
    assert pc.run_dir == run_c
    assert losses(run_c) == {s: v for s, v in losses(run_a).items() if s > 4}
    assert_same_weights(pa.model, pc.model)


# ---- the run directory ----------------------------------------------------------------------------


def test_run_directory_contents(small_cfg, tmp_path):
    cfg = small_cfg()
    run = tmp_path / "run"
    p, summary = train(cfg, run)
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "memory.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml") == cfg

    train_lines = metric_lines(run)
    assert [rec["step"] for rec in train_lines] == [1, 2, 3, 4, 5, 6]
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    for rec in train_lines:
        assert TRAIN_FIELDS <= rec.keys()
        assert rec["epoch"] == 0 and math.isfinite(rec["loss"]) and rec["loss"] > 0
        assert rec["ppl"] == pytest.approx(math.exp(rec["loss"]))
        assert 0 <= rec["accuracy"] <= 1 and rec["aux_loss"] > 0 and rec["z_loss"] >= 0
        assert rec["lr"] == lr_at(rec["step"] - 1, cfg.train, 6)
        assert rec["grad_norm"] > 0 and rec["tokens_per_s"] > 0
        counts = rec["expert_counts"]  # layers x experts, every token routed to experts_per_token experts
        assert len(counts) == cfg.model.num_hidden_layers and all(len(row) == cfg.model.num_experts for row in counts)
        assert all(sum(row) == tokens_per_step * cfg.model.experts_per_token for row in counts)
    evals = metric_lines(run, "eval")
    assert [rec["step"] for rec in evals] == [0, 3, 6]  # step 0: the untrained loss, a reference
    for rec in evals:
        assert rec["val_ppl"] == pytest.approx(math.exp(rec["val_loss"]))

    memory = [json.loads(line) for line in (run / "memory.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in memory] == [1, 2, 3, 4, 5, 6] and all(rec["rss_bytes"] > 0 for rec in memory)

    saved = json.loads((run / "summary.json").read_text())
    assert saved["status"] == "completed" and saved["steps"] == 6 and saved["final_loss"] == train_lines[-1]["loss"]
    assert saved["checkpoint"] == str(step_dir(run, 6)) and summary["tokens"] == 6 * tokens_per_step

    assert [d.name for d in ckpt.list_checkpoints(run / "checkpoints")] == ["step-00000003", "step-00000006"]
    for step in (3, 6):
        d = step_dir(run, step)
        assert sorted(f.name for f in d.iterdir()) == ["model.safetensors", "state.json", "trainer.safetensors"]
        state = ckpt.read_state(d)
        assert state.step == step and state.config == cfg.to_dict() and state.tokenizer_hash == p.tok_hash
        assert "rng.torch" in ckpt.read_trainer_tensors(d)
    # Tied embeddings: the unembedding is the embedding and is stored once, under the embedding's name.
    weights = load_file(str(step_dir(run, 6) / "model.safetensors"))
    assert cfg.model.tie_word_embeddings and "unembedding.weight" not in weights
    assert weights.keys() == dict(p.model.named_parameters()).keys()
    assert_same_weights(load_model(cfg, step_dir(run, 6)), p.model)


def test_keep_checkpoints_prunes_the_oldest(small_cfg, tmp_path):
    cfg = small_cfg("train.max_steps=5", "train.save_every=1", "train.keep_checkpoints=2")
    run = tmp_path / "run"
    train(cfg, run)
    assert sorted(d.name for d in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]


# ---- checkpoints under failure --------------------------------------------------------------------


def test_failed_checkpoint_write_keeps_the_previous_one(small_cfg, tmp_path, monkeypatch):
    cfg = small_cfg()  # checkpoints at steps 3 and 6
    run = tmp_path / "run"
    real_save_file = ckpt.save_file
    calls: list[str] = []

    def disk_full_on_second_checkpoint(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 4:  # step 6: model.safetensors was written, trainer.safetensors runs out of space
            Path(filename).write_bytes(b"\0" * 100)  # half a file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", disk_full_on_second_checkpoint)
    p = setup_training(cfg, run)
    with pytest.raises(ckpt.CheckpointError) as info:
        Trainer(p).run()
    message = str(info.value)
    assert "step-00000006" in message and os.strerror(errno.ENOSPC) in message
    assert "previous checkpoint is intact" in message and "\n" not in message
    assert "step-00000006" in calls[2] and calls[3].endswith("trainer.safetensors")

    root = run / "checkpoints"
    assert sorted(d.name for d in root.iterdir()) == ["step-00000003"]  # no .tmp-* left, no step-6
    assert ckpt.resolve_checkpoint(run) == step_dir(run, 3) and ckpt.list_checkpoints(root) == [step_dir(run, 3)]
    assert ckpt.read_state(step_dir(run, 3)).step == 3
    load_model(cfg, step_dir(run, 3))
    assert ckpt.read_trainer_tensors(step_dir(run, 3))

    # Space is back: the run resumes from step 3 and finishes.
    _, summary = train(cfg, run, resume=True)
    assert summary["steps"] == 6 and ckpt.resolve_checkpoint(run) == step_dir(run, 6)


# ---- non-finite loss ------------------------------------------------------------------------------


def test_nan_loss_names_the_step_and_the_last_good_checkpoint(small_cfg, tmp_path, monkeypatch):
    cfg = small_cfg()
    run = tmp_path / "run"
    real_save = Trainer.save

    def save_then_poison(self):
        path = real_save(self)
        if self.step == 3:
            with torch.no_grad():
                self.model.norm.scale.fill_(float("nan"))
        return path

    monkeypatch.setattr(Trainer, "save", save_then_poison)
    p = setup_training(cfg, run)
    with pytest.raises(GptossError) as info:
        Trainer(p).run()
    message = str(info.value)
    assert "non-finite loss" in message and "at step 4" in message
    assert str(step_dir(run, 3)) in message and "\n" not in message

    assert ckpt.list_checkpoints(run / "checkpoints") == [step_dir(run, 3)]  # nothing saved from NaN weights
    assert [rec["step"] for rec in metric_lines(run)] == [1, 2, 3]
    good = load_model(cfg, step_dir(run, 3))
    assert all(torch.isfinite(t).all() for t in good.state_dict().values())


def test_nan_loss_before_any_checkpoint(small_cfg, tmp_path):
    run = tmp_path / "run"
    p = setup_training(small_cfg(), run)
    with torch.no_grad():
        p.model.norm.scale.fill_(float("nan"))
    with pytest.raises(
        GptossError,
        match=r"non-finite loss \(nan\) at step 1; no update was applied; "
        r"no finite checkpoint was saved$",
    ):
        Trainer(p).run()
    assert ckpt.list_checkpoints(run / "checkpoints") == []


# ---- bad inputs -----------------------------------------------------------------------------------


def one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


def test_missing_data_file(small_cfg, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(GptossError) as info:
        setup_training(small_cfg(f"data.paths={missing}"), tmp_path / "run")
    assert one_line_error(info) == f"data.paths: {missing} does not exist"
    assert not (tmp_path / "run").exists()


def test_empty_text_file(small_cfg, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(GptossError) as info:
        setup_training(small_cfg(f"data.paths={empty}"), tmp_path / "run")
    assert "no text found" in one_line_error(info) and str(empty) in str(info.value)


def test_tokenizer_larger_than_the_vocabulary(small_cfg, tmp_path):
    from gptoss_cli.data.corpus import load_documents

    tok_path = tmp_path / "tokenizer.json"
    train_tokenizer(load_documents([]), 400).save(str(tok_path))
    with pytest.raises(GptossError) as info:
        setup_training(small_cfg(), tmp_path / "run", tokenizer_path=tok_path)
    assert one_line_error(info) == f"{tok_path}: tokenizer has 400 tokens but model.vocab_size is 320"
    assert not (tmp_path / "run").exists()


def test_too_little_text_for_one_batch(small_cfg, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words.\n\nAnd a few more words here.\n", encoding="utf-8")
    with pytest.raises(GptossError) as info:
        setup_training(small_cfg(f"data.paths={short}"), tmp_path / "run")
    message = one_line_error(info)
    assert message.startswith("data: ") and "fewer than one batch of 4" in message


def test_seq_len_above_the_context_is_a_config_error(small_cfg):
    with pytest.raises(ConfigError) as info:
        small_cfg("train.seq_len=512")
    assert one_line_error(info) == "tiny.yaml: train.seq_len: 512 exceeds model.max_context_length=256"


def test_resume_guards(small_cfg, tmp_path):
    run = tmp_path / "run"
    train(small_cfg(), run, stop_after=1)  # one step, one checkpoint
    assert ckpt.resolve_checkpoint(run) == step_dir(run, 1)

    with pytest.raises(GptossError) as info:
        setup_training(small_cfg("model.hidden_size=48"), run, resume=True)
    message = one_line_error(info)
    assert message.startswith("--resume:") and "model.hidden_size=32, the config has 48" in message

    with pytest.raises(GptossError) as info:
        setup_training(small_cfg(), run)  # checkpoints there, no --resume
    assert "already holds checkpoints" in one_line_error(info) and "--resume" in str(info.value)

    with pytest.raises(GptossError) as info:
        setup_training(small_cfg(), tmp_path / "fresh", resume=True)
    assert "no complete checkpoint" in one_line_error(info)
    with pytest.raises(GptossError, match="--resume needs --run"):
        setup_training(small_cfg(), None, resume=True)

    # Only kernel choices may change on resume.
    p = setup_training(small_cfg("model.attention_backend=eager"), run, resume=True)
    assert p.resume_state.step == 1


def test_resume_from_a_loose_step_dir_needs_a_run_dir(small_cfg, tmp_path):
    run = tmp_path / "run"
    _, first = train(small_cfg(), run, stop_after=1)
    loose = tmp_path / "downloads" / "saved" / "step-00000001"  # e.g. a checkpoint copied from another machine
    shutil.copytree(step_dir(run, 1), loose)
    with pytest.raises(GptossError) as info:
        setup_training(small_cfg(), None, resume_from=loose)
    assert "not inside a run's checkpoints/ folder" in one_line_error(info) and "--run" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == ["saved"]  # nothing written next to it

    p = setup_training(small_cfg(), tmp_path / "continued", resume_from=loose)
    assert p.run_dir == tmp_path / "continued" and p.resume_state.step == 1
    summary = Trainer(p, stop_after=2).run()
    assert summary["steps"] == 2 and losses(tmp_path / "continued").keys() == {2}
    assert first["steps"] == 1


def test_resume_from_another_run_uses_that_runs_tokenizer(small_cfg, small_corpus, tmp_path):
    run_a = tmp_path / "a"
    train(small_cfg(), run_a, stop_after=1)  # tokenizer trained on the built-in corpus
    p = setup_training(small_cfg(f"data.paths={small_corpus}"), tmp_path / "b", resume_from=step_dir(run_a, 1))
    assert not (tmp_path / "b" / "tokenizer.json").exists()  # written when the resume first saves
    p.commit_files()
    p.release()
    assert (tmp_path / "b" / "tokenizer.json").read_text() == (run_a / "tokenizer.json").read_text()
    assert p.resume_state.step == 1 and p.tok_hash == ckpt.read_state(step_dir(run_a, 1)).tokenizer_hash


def test_config_yaml_is_plain_yaml_of_every_field(small_cfg, tmp_path):
    """config.yaml is plain YAML of every field (another tool can read it)."""
    cfg = small_cfg()
    run = tmp_path / "run"
    setup_training(cfg, run)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    assert raw["model"]["hidden_size"] == 32 and raw["train"]["max_steps"] == 6 and raw["name"] == "tiny"


def test_a_resumed_summary_gives_this_sessions_rate(small_cfg, tmp_path):
    run = tmp_path / "run"
    _, first = train(small_cfg("train.max_steps=2"), run)
    _, second = train(small_cfg("train.max_steps=4"), run, resume=True)
    assert second["tokens"] == 2 * first["tokens"] and second["session_tokens"] == first["tokens"]
    assert second["tokens_per_s"] == pytest.approx(second["session_tokens"] / second["session_s"], rel=1e-3)
    assert second["elapsed_s"] > second["session_s"]  # the run's time includes the first session's


def test_resuming_on_fewer_processes_warns_that_the_global_batch_changes(small_cfg, capsys):
    from gptoss_cli.run.checkpoint import CheckpointState
    from gptoss_cli.train.setup import _warn_world_change

    cfg = small_cfg("train.batch_size=4", "train.grad_accum_steps=2")
    _warn_world_change(cfg, CheckpointState(step=3, world_size=2), world=1, accum=2)
    err = capsys.readouterr().err
    assert "resuming on 1 process instead of 2: the global batch goes from 16 to 8 sequences" in err
    assert "train.global_batch_size=16" in err
    _warn_world_change(cfg, CheckpointState(step=3, world_size=1), world=1, accum=2)
    fixed = small_cfg("train.batch_size=4", "train.global_batch_size=16")
    _warn_world_change(fixed, CheckpointState(step=3, world_size=2), world=1, accum=4)  # derived: kept
    assert capsys.readouterr().err == ""


def test_a_run_started_from_weights_names_them_at_step_0(small_cfg, tmp_path, capsys):
    _, base = train(small_cfg("train.max_steps=2"), tmp_path / "base")
    capsys.readouterr()
    train(small_cfg("train.max_steps=1"), tmp_path / "tuned", init_from=tmp_path / "base")
    err = capsys.readouterr().err
    assert f"Step 0 (the weights of {base['checkpoint']}): validation loss" in err and "untrained" not in err


def test_a_resume_reads_the_data_cache_the_run_made(small_cfg, tmp_path, isolated_cache):
    """The resumed run gives its tokenizer (the one trained on this corpus): the corpus is not tokenized again
    into a second cache entry."""
    run = tmp_path / "run"
    first, _ = train(small_cfg("train.max_steps=2"), run)
    second, _ = train(small_cfg("train.max_steps=3"), run, resume=True)
    entries = sorted(p.name for p in (Path(isolated_cache) / "datasets").iterdir() if p.is_dir())
    assert len(entries) == 1 and second.data_root == first.data_root
    assert second.setup_times["tokenize_s"] == 0.0 and second.setup_times["tokenizer_s"] == 0.0


def test_long_cpu_steps_give_freed_heap_back_without_changing_training(small_cfg, tmp_path, monkeypatch):
    """CPU training hands the C heap's free pages back (memory.release_freed_memory) at most every
    TRIM_AFTER_S: after each step and, under activation checkpointing, before each block's forward and
    recomputation. The losses are those of a run that never does."""
    import platform

    from gptoss_cli import memory

    calls, real = [], memory.release_freed_memory
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(real()))
    monkeypatch.setattr(memory, "TRIM_AFTER_S", float("inf"))
    checkpointed = ("train.max_steps=3", "train.activation_checkpointing=true")
    train(small_cfg("train.max_steps=3"), tmp_path / "plain")
    train(small_cfg(*checkpointed), tmp_path / "plain-checkpointed")
    assert calls == []
    monkeypatch.setattr(memory, "TRIM_AFTER_S", 0.0)
    train(small_cfg("train.max_steps=3"), tmp_path / "after-steps")
    assert len(calls) == 3  # no checkpointing: after each step only
    calls.clear()
    train(small_cfg(*checkpointed), tmp_path / "trimmed")
    layers = small_cfg().model.num_hidden_layers
    assert len(calls) >= 3 * (2 * layers + 1)  # and each block's forward and recomputation (evals add more)
    assert all(calls) or platform.libc_ver()[0] != "glibc"  # glibc has malloc_trim
    assert losses(tmp_path / "after-steps") == losses(tmp_path / "plain")
    assert losses(tmp_path / "trimmed") == losses(tmp_path / "plain-checkpointed")
