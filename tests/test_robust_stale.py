"""Hidden temporary checkpoint directories of processes that died mid-save are removed by the next save;
those of a live writer are left alone."""

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
