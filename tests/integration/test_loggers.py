"""train.loggers: TensorBoard event files read back with TensorBoard's own EventAccumulator equal
metrics.jsonl, CSV files per kind, W&B in offline mode (when the optional extra is installed), resume
without duplicate steps, rank 0 alone under torchrun, and a failing logger that warns once while training
goes on.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_cli.config import ConfigError
from gptoss_cli.train.loggers import GIB, MEMORY, SCALARS, Loggers
from gptoss_cli.train.loop import Trainer, setup_training

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def train(cfg, run: Path, **kw) -> dict:
    return Trainer(setup_training(cfg, run, **kw)).run()


def metric_lines(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [rec for rec in map(json.loads, lines) if rec["kind"] == kind]


def events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_and_csv_equal_metrics_jsonl(small_cfg, tmp_path):
    run = tmp_path / "run"
    summary = train(small_cfg("train.loggers=[tensorboard, csv]"), run)
    assert summary["status"] == "completed"
    acc = events(run)
    for kind, names in SCALARS.items():
        lines = metric_lines(run, kind)
        assert lines
        for key, tag in names.items():
            got = [(e.step, e.value) for e in acc.Scalars(tag)]
            assert [s for s, _ in got] == [line["step"] for line in lines], tag
            for (_, value), line in zip(got, lines, strict=True):
                assert value == pytest.approx(line[key], rel=1e-6, abs=1e-12), (tag, line["step"])
    memory = {r["step"]: r for r in map(json.loads, (run / "memory.jsonl").read_text().splitlines())}
    rss = acc.Scalars(MEMORY["rss_bytes"])
    assert [e.step for e in rss] == [line["step"] for line in metric_lines(run, "train")]
    for e in rss:
        assert e.value == pytest.approx(memory[e.step]["rss_bytes"] / GIB, rel=1e-6)
    [config] = acc.Tensors("config/text_summary")
    text = config.tensor_proto.string_val[0].decode()
    assert "loggers:" in text and "- tensorboard" in text and "num_experts: 4" in text

    for kind in SCALARS:
        with open(run / "csv" / f"{kind}.csv", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        lines = metric_lines(run, kind)
        assert [int(r["step"]) for r in rows] == [line["step"] for line in lines]
        for row, line in zip(rows, lines, strict=True):
            for key, tag in SCALARS[kind].items():
                assert float(row[tag]) == line[key]  # the CSV keeps every digit


def test_resume_appends_to_the_same_runs_without_duplicate_steps(small_cfg, tmp_path):
    """A run that logged steps 1..6, then lost its last checkpoint (killed before step 6 was saved),
    resumes at step 3: TensorBoard and the CSV show steps 1..6 once each, as metrics.jsonl does."""
    cfg = small_cfg("train.loggers=[tensorboard,csv]")
    run = tmp_path / "run"
    train(cfg, run)
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    train(cfg, run, resume=True)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one writer per session
    acc = events(run)
    lines = metric_lines(run, "train")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr")):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
        assert [v for _, v in got] == pytest.approx([line[key] for line in lines], rel=1e-6)
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 3, 6]  # step 0: the untrained loss
    with open(run / "csv" / "train.csv", encoding="utf-8", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    with open(run / "csv" / "eval.csv", encoding="utf-8", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 3, 6]


def test_a_logger_that_cannot_write_warns_once_and_training_goes_on(small_cfg, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tensorboard").write_text("a file where the event folder would go")
    summary = train(small_cfg("train.loggers=[tensorboard,csv]"), run)
    err = capsys.readouterr().err
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert err.count("train.loggers: tensorboard failed") == 1, err
    assert "training goes on without it" in err
    assert len(metric_lines(run, "train")) == 6  # metrics.jsonl is always written
    assert (run / "csv" / "train.csv").read_text().count("\n") == 7  # header + 6 steps: the other logger works


def test_a_logger_failing_mid_run_warns_once(small_cfg, tmp_path, capsys, monkeypatch):
    from gptoss_cli.train import loggers

    calls = []

    def disk_full(self, step, kind, values, line):
        calls.append(step)
        if step >= 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(loggers.CSVLogger, "log", disk_full)
    summary = train(small_cfg("train.loggers=[csv,tensorboard]"), tmp_path / "run")
    err = capsys.readouterr().err
    assert summary["status"] == "completed"
    assert err.count("train.loggers: csv failed (") == 1 and "No space left on device" in err
    assert calls == [0, 1, 2]  # step 0 (the untrained validation), 1, then 2 fails: dropped after it
    assert [e.step for e in events(tmp_path / "run").Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_unknown_logger_is_rejected_with_its_key(small_cfg):
    with pytest.raises(ConfigError, match=r"train\.loggers\[1\]: expected one of 'tensorboard', 'wandb', 'csv'"):
        small_cfg("train.loggers=[tensorboard, mlflow]")
    assert small_cfg().train.loggers == []
    assert small_cfg("train.loggers=csv").train.loggers == ["csv"]
    with pytest.raises(ConfigError, match="train.wandb_project"):
        small_cfg("train.loggers=[wandb]", "train.wandb_project=' '")


def test_disabled_loggers_write_nothing(small_cfg, tmp_path):
    """What ranks other than 0 get: no files at all."""
    logs = Loggers(small_cfg("train.loggers=[tensorboard,csv]"), tmp_path, 0, warn=print, enabled=False)
    logs.log({"kind": "train", "step": 1, "loss": 1.0})
    logs.close()
    assert list(tmp_path.iterdir()) == []


def test_only_rank_zero_logs_under_torchrun(tmp_path):
    run = tmp_path / "run"
    sets = [
        "train.loggers=[tensorboard,csv]",
        "train.max_steps=2",
        "train.log_every=1",
        "train.eval_every=100",
        "model.num_hidden_layers=2",
        "train.seq_len=32",
        "train.batch_size=2",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "gptoss_cli",
        "train",
        "-c",
        "tiny",
        "-r",
        str(run),
        *[a for s in sets for a in ("--set", s)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTOSS_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [e.step for e in events(run).Scalars("train/loss")] == [1, 2]
    assert (run / "csv" / "train.csv").read_text().count("\n") == 3


# ---- Weights & Biases -----------------------------------------------------------------------------


def test_wandb_without_login_or_package_warns_and_training_goes_on(small_cfg, tmp_path, capsys, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    summary = train(small_cfg("train.loggers=[wandb]"), tmp_path / "run")
    err = capsys.readouterr().err
    assert summary["status"] == "completed"
    assert err.count("train.loggers: wandb failed") == 1
    assert "wandb login" in err or "uv sync --extra wandb" in err, err


def wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file, parsed with W&B's own schema. The file is
    W&B's transaction log: a 7-byte header, then 32 KiB blocks of chunks (crc32, length, type: 1 whole,
    2 first, 3 middle, 4 last), as in LevelDB's log format."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec


def test_wandb_offline_run_holds_the_metrics(small_cfg, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed (uv sync --extra wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # W&B keeps one service and its settings per process: start from a fresh one
    run = tmp_path / "run"
    summary = train(
        small_cfg("train.loggers=[wandb]", "train.wandb_project=gptoss-tests", "train.wandb_name=tiny-offline"), run
    )
    assert summary["status"] == "completed"
    assert wandb.run is None  # finished when training ended
    wandb.teardown()  # waits for W&B's service to write out the run's transaction log
    [offline] = list((run / "wandb").glob("offline-run-*"))
    [records] = list(offline.glob("run-*.wandb"))
    rows, names = [], set()
    for rec in wandb_records(records):
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            )
        elif rec.WhichOneof("record_type") == "run":
            names.add((rec.run.project, rec.run.display_name))
    assert ("gptoss-tests", "tiny-offline") in names
    train_rows = [r for r in rows if "train/loss" in r]
    lines = metric_lines(run, "train")
    assert [r["_step"] for r in train_rows] == [line["step"] for line in lines]
    assert [r["train/loss"] for r in train_rows] == pytest.approx([line["loss"] for line in lines], rel=1e-12)
    assert [r["val/loss"] for r in rows if "val/loss" in r] == pytest.approx(
        [e["val_loss"] for e in metric_lines(run, "eval")], rel=1e-12
    )
