"""One trainer per run directory, and Ctrl-C / SIGTERM, with real `gptoss train` processes.

A trainer holds RUN/train.lock (flock) for its whole life: a second one gets one line naming the holder;
a lock left by a killed process is taken over. SIGINT / SIGTERM stop at the current step, save a
checkpoint, write summary.json with status "interrupted" and exit 130 / 143.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptoss_cli.run import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def gptoss_process(run: Path, cache: Path, *overrides: str, small: list[str]) -> subprocess.Popen:
    sets = [a for o in [*small, *overrides] for a in ("--set", o)]
    env = dict(os.environ, GPTOSS_CACHE=str(cache), OMP_NUM_THREADS="1")
    env.pop("GPTOSS_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "gptoss_cli", "train", "--config", "tiny", *sets, "--run", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_steps(proc: subprocess.Popen, run: Path, steps: int, timeout: float = 180) -> None:
    """Until metrics.jsonl holds `steps` train lines (the loop and its signal handlers are running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text(encoding="utf-8").count('"kind": "train"') >= steps:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the trainer did not reach its first steps in time")


LONG = ("train.max_steps=100000", "train.save_every=100000", "train.eval_every=100000", "train.log_every=1")


def test_second_trainer_is_refused_naming_the_holder_then_sigterm_saves_and_exits_143(small_overrides, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    first = gptoss_process(run, cache, *LONG, small=small_overrides)
    try:
        wait_for_steps(first, run, 2)
        holder = json.loads((run / "train.lock").read_text(encoding="utf-8"))
        assert holder["pid"] == first.pid

        second = gptoss_process(run, cache, "train.max_steps=2", small=small_overrides)
        out, err = second.communicate(timeout=180)
        assert second.returncode == 2 and out == ""
        assert err.count("\n") == 1, err
        assert err.startswith(f"error: {run} is being trained by another process (pid {first.pid} on ")
        assert first.poll() is None  # the holder trains on, undisturbed

        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, err
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    saved = ckpt.resolve_checkpoint(run)
    assert saved.name == ckpt.step_dir_name(summary["steps"]) and summary["checkpoint"] == str(saved)
    assert (run / "train.lock").read_text(encoding="utf-8") == ""  # released: nobody holds it


def train_then_signal(small: list[str], tmp_path: Path, *signals: int) -> tuple[Path, int, str]:
    """A long `gptoss train` sent `signals` (20 ms apart) once it trains -> (run, exit status, stderr)."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    proc = gptoss_process(run, cache, *LONG, small=small)
    try:
        wait_for_steps(proc, run, 2)
        for n, sig in enumerate(signals):
            time.sleep(0.02 if n else 0)
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return run, proc.returncode, err


def test_ctrl_c_saves_and_exits_130(small_overrides, tmp_path):
    run, code, err = train_then_signal(small_overrides, tmp_path, signal.SIGINT)
    assert code == 130, err
    assert "stop requested" in err and "interrupted" in err
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT"
    assert ckpt.read_state(ckpt.resolve_checkpoint(run)).step == summary["steps"]


def test_a_second_ctrl_c_aborts_with_130_and_no_traceback(small_overrides, tmp_path):
    """Wherever the second SIGINT lands (the step, the save, the shutdown), the exit status is still 130
    and stderr holds no traceback; the newest complete checkpoint, if any, stays loadable."""
    run, code, err = train_then_signal(small_overrides, tmp_path, signal.SIGINT, signal.SIGINT)
    assert code == 130, err
    assert "Traceback" not in err and "Aborted!" not in err and "unexpected" not in err, err
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        assert ckpt.read_state(ckpt.resolve_checkpoint(run)).step >= 1


def test_ctrl_c_before_the_first_log_line_exits_130_with_a_final_loss(small_overrides, tmp_path):
    """Stopped between logged steps: the steps since the last line are logged at the stop, so the summary
    has a final loss to print (it once crashed formatting a loss that did not exist)."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    quiet = ("train.max_steps=100000", "train.save_every=100000", "train.eval_every=100000", "train.log_every=100000")
    proc = gptoss_process(run, cache, *quiet, small=small_overrides)
    try:
        deadline = time.monotonic() + 180
        memory = run / "memory.jsonl"  # one line per step: the loop is running
        while not (memory.is_file() and memory.read_text(encoding="utf-8").count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "unexpected" not in err and "Traceback" not in err
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "interrupted" and summary["final_loss"] is not None
    assert f"Step {summary['steps']}: Loss=" in err and f"final loss {summary['final_loss']:.4f}" in err


def test_the_stop_message_says_how_long_the_step_will_take():
    from gptoss_cli.train.signals import StopRequest

    stop = StopRequest(announce=False)
    assert stop._what_now().startswith("finishing the first step (it can take long")
    stop.step_s = 0.2
    assert stop._what_now() == "finishing this step and saving a checkpoint"
    stop.step_s = 95.0
    assert "steps take about 95 s here" in stop._what_now()


def test_lock_of_a_killed_trainer_is_taken_over(small_overrides, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    dead = gptoss_process(run, cache, *LONG, small=small_overrides)
    try:
        wait_for_steps(dead, run, 1)
    finally:
        dead.kill()  # SIGKILL: no handler runs, the lock file keeps its pid
        dead.communicate(timeout=60)
    assert json.loads((run / "train.lock").read_text(encoding="utf-8"))["pid"] == dead.pid
    assert ckpt.list_checkpoints(run / "checkpoints") == []

    after = gptoss_process(run, cache, "train.max_steps=2", small=small_overrides)
    out, err = after.communicate(timeout=180)
    assert after.returncode == 0, err
    assert json.loads((run / "summary.json").read_text(encoding="utf-8"))["status"] == "completed"


def test_a_signal_during_a_step_stops_at_that_step(small_cfg, tmp_path, monkeypatch):
    """The stop request is read after the step's micro-batches, so the step in progress is the last one."""
    from gptoss_cli.train import loop

    real = loop.objective
    calls = []

    def objective_then_ctrl_c(*args, **kwargs):
        if args[0].training:  # training micro-batches only, not the validation passes (step 0's included)
            calls.append(1)
            if len(calls) == 3:  # step 2 of 2 micro-batches each: the signal arrives mid-step
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "objective", objective_then_ctrl_c)
    run = tmp_path / "run"
    p = loop.setup_training(small_cfg("train.grad_accum_steps=2"), run)
    summary = loop.Trainer(p).run()
    assert summary["steps"] == 2 and summary["status"] == "interrupted"  # not step 3
    assert summary["signal"] == "SIGINT"
    assert ckpt.resolve_checkpoint(run).name == ckpt.step_dir_name(2)


def test_off_a_terminal_training_prints_progress_lines(small_overrides, tmp_path):
    """Under nohup, Slurm, CI or `| tee log` stderr is no terminal: a plain progress line still comes."""
    sets = [a for o in [*small_overrides, "train.max_steps=3", "train.log_every=100"] for a in ("--set", o)]
    env = dict(os.environ, GPTOSS_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", GPTOSS_PROGRESS_SECONDS="0")
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_cli", "train", "--config", "tiny", *sets, "--run", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("training: ")]
    assert lines[0] == "training: started" and lines[-1].startswith("training: done, 3/3 steps (100%), loss ")
    assert any(line.startswith("training: 1/3 steps (33%), loss ") for line in lines), lines
