"""What a run directory tells after a stop: hidden temporary checkpoint directories of processes that died
mid-save are removed by the next save (a live writer's are left alone), and the report names the signal
that interrupted a run."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from gptoss_cli.run import checkpoint as ckpt


def test_next_save_removes_temporary_dirs_of_dead_writers_only(tmp_path):
    root = tmp_path / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = root / f".step-00000004.tmp-{dead_pid}"
    live = root / f".step-00000004.tmp-{os.getppid()}"  # a running process's (our parent's) directory
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"\0" * 1024)
    ckpt.save_checkpoint(root, 5, {"w": torch.ones(2)}, {}, ckpt.CheckpointState(step=5), keep=3)
    assert not stale.exists() and live.is_dir()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000005"]


def test_report_shows_which_signal_interrupted_a_run(tmp_path):
    import json

    from gptoss_cli.report.logs import read_run_logs
    from gptoss_cli.report.summary import summarize
    from tests.unit.report.test_report import make_run

    run = make_run(tmp_path, device="cpu")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps(summary | {"status": "interrupted", "signal": "SIGTERM"}))
    assert summarize(read_run_logs(run, "demo", warn=lambda *a: None))["status"] == "interrupted (SIGTERM)"


def test_a_killed_runs_report_shows_the_precision_it_trained_in(small_cfg, tmp_path):
    """config.yaml says `auto`; the metrics lines carry what it resolved to, so a run killed before its
    summary.json was written still reports fp32 (on this CPU), not `auto`."""
    from gptoss_cli.report.logs import read_run_logs
    from gptoss_cli.report.summary import summarize
    from gptoss_cli.train.loop import Trainer, setup_training

    cfg = small_cfg("train.precision=auto", "train.max_steps=2")
    Trainer(setup_training(cfg, tmp_path / "run")).run()
    (tmp_path / "run" / "summary.json").unlink()  # as if killed before the end
    assert (tmp_path / "run" / "config.yaml").read_text().count("precision: auto") == 1
    assert summarize(read_run_logs(tmp_path / "run", "run", warn=lambda *a: None))["precision"] == "fp32"
