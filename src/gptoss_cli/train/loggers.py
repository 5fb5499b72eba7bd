"""Experiment tracking for `gptoss train`: TensorBoard, Weights & Biases and CSV, next to metrics.jsonl.

`train.loggers` picks any of them (metrics.jsonl is always written: `gptoss report` reads it). Each one
receives the same metrics.jsonl lines, as scalars named by SCALARS:

    train/loss train/ppl train/accuracy train/lr train/grad_norm train/tokens_per_s train/aux_loss
    train/z_loss train/tokens train/epoch    memory/{allocated,reserved,peak,nvml_used,rss}_gib
    val/loss val/ppl val/accuracy

    tensorboard   RUN/tensorboard/ event files; the resolved config as text
    wandb         the `wandb` package (optional extra); train.wandb_project / train.wandb_name;
                  WANDB_MODE=offline is honoured (the run is written under RUN/wandb/ for `wandb sync`)
    csv           RUN/csv/train.csv and RUN/csv/eval.csv

Only rank 0 creates loggers. A logger that fails (no W&B login, a directory it cannot write, a full
disk) warns once and is dropped; training goes on. A run resumed from step N first forgets what was
logged after N (TensorBoard's purge_step, CSV rows dropped), as metrics.jsonl does, so no step is
logged twice.
"""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..atomic import write_atomic
from ..config import RunConfig
from ..run.layout import RunDir

NAMES = ("tensorboard", "wandb", "csv")
GIB = 1024**3
# metrics.jsonl key -> scalar name, per kind of line
SCALARS = {
    "train": {
        "loss": "train/loss",
        "ppl": "train/ppl",
        "accuracy": "train/accuracy",
        "lr": "train/lr",
        "grad_norm": "train/grad_norm",
        "tokens_per_s": "train/tokens_per_s",
        "aux_loss": "train/aux_loss",
        "z_loss": "train/z_loss",
        "tokens": "train/tokens",
        "epoch": "train/epoch",
    },
    "eval": {"val_loss": "val/loss", "val_ppl": "val/ppl", "val_accuracy": "val/accuracy"},
}
MEMORY = {
    "allocated_bytes": "memory/allocated_gib",
    "reserved_bytes": "memory/reserved_gib",
    "peak_bytes": "memory/peak_gib",
    "nvml_used_bytes": "memory/nvml_used_gib",
    "rss_bytes": "memory/rss_gib",
}
Warn = Callable[[str], None]


def scalars(line: dict[str, Any], memory: dict[str, Any] | None = None) -> dict[str, float]:
    """The named scalars of one metrics.jsonl line (and, for a train line, the memory sample of its step)."""
    names = SCALARS.get(line.get("kind"), {})
    out = {tag: float(line[key]) for key, tag in names.items() if isinstance(line.get(key), (int, float))}
    for key, tag in MEMORY.items():
        if memory and isinstance(memory.get(key), (int, float)):
            out[tag] = memory[key] / GIB
    return out


class TensorBoardLogger:
    name = "tensorboard"

    def __init__(self, run: RunDir, cfg: RunConfig, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at steps after the checkpoint we resume from were logged by the run that
        # died; TensorBoard hides them, and this run logs those steps again.
        self.writer = SummaryWriter(str(run.tensorboard), purge_step=start_step + 1)
        config = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        text = "    " + config.replace("\n", "\n    ")  # markdown code block: the YAML as written
        self.writer.add_text("config", text, global_step=start_step + 1)
        self.writer.flush()

    def log(self, step: int, kind: str, values: dict[str, float], line: dict) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # a live view: one small write per logged step

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    name = "wandb"

    def __init__(self, run: RunDir, cfg: RunConfig, start_step: int):
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "the wandb package is not installed: uv sync --extra wandb (or pip install 'gptoss[wandb]')"
            ) from None
        mode = os.environ.get("WANDB_MODE", "online")  # read here too: W&B keeps settings per process
        if mode not in ("offline", "dryrun", "disabled") and not wandb.login(prompt=False, verify=False):
            raise RuntimeError(
                "not logged in to W&B: run `wandb login`, set WANDB_API_KEY, or WANDB_MODE=offline to log locally"
            )
        run.wandb.mkdir(exist_ok=True)
        resume = {}
        if mode == "online":  # a resumed run continues its W&B run; offline runs cannot be resumed (W&B)
            id_file = run.wandb / "gptoss-run-id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
            write_atomic(id_file, run_id)
            resume = {"id": run_id, "resume": "allow"}
        t = cfg.train
        # console="off": W&B would otherwise wrap stdout, which carries `train --json`'s summary.
        self.run = wandb.init(
            project=t.wandb_project,
            name=t.wandb_name or run.name,
            dir=str(run),
            config=cfg.to_dict(),
            mode=mode,
            settings=wandb.Settings(console="off", quiet=True),
            **resume,
        )

    def log(self, step: int, kind: str, values: dict[str, float], line: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class CSVLogger:
    name = "csv"

    def __init__(self, run: RunDir, cfg: RunConfig, start_step: int):
        self.dir = run.csv
        self.dir.mkdir(exist_ok=True)
        self.files: dict[str, tuple[io.TextIOBase, csv.DictWriter]] = {}
        for kind in SCALARS:
            _drop_rows_after(self.dir / f"{kind}.csv", start_step)

    def log(self, step: int, kind: str, values: dict[str, float], line: dict) -> None:
        if kind not in self.files:
            path = self.dir / f"{kind}.csv"
            fresh = not path.is_file() or path.stat().st_size == 0
            header = None if fresh else path.read_text(encoding="utf-8").splitlines()[0].split(",")
            f = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115 - closed in close()
            writer = csv.DictWriter(f, fieldnames=header or ["step", *values], extrasaction="ignore")
            if fresh:
                writer.writeheader()
            self.files[kind] = (f, writer)
        f, writer = self.files[kind]
        writer.writerow({"step": step, **values})
        f.flush()

    def close(self) -> None:
        for f, _ in self.files.values():
            f.close()


def _drop_rows_after(path: Path, step: int) -> None:
    """A run resumed from `step` logs the later steps again: drop their old rows (and a cut-off last row)."""
    if not path.is_file():
        return
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    if not rows:
        return
    header, kept = rows[0], [rows[0]]
    for row in rows[1:]:
        try:
            if len(row) == len(header) and int(float(row[0])) <= step:
                kept.append(row)
        except ValueError:
            continue
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(kept)
    write_atomic(path, out.getvalue())


LOGGERS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "csv": CSVLogger}


class Loggers:
    """The loggers of train.loggers, each behind a guard: the first exception warns and drops that logger."""

    def __init__(self, cfg: RunConfig, run: RunDir, start_step: int, warn: Warn, enabled: bool = True):
        self.warn = warn
        self.active: list = []
        for name in dict.fromkeys(cfg.train.loggers) if enabled else ():
            try:
                self.active.append(LOGGERS[name](RunDir(run), cfg, start_step))
            except Exception as err:  # any failure of an optional sink must not stop training
                self._failed(name, err)

    def _failed(self, name: str, err: BaseException) -> None:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        self.warn(f"train.loggers: {name} failed ({message}); training goes on without it")

    def log(self, line: dict[str, Any], memory: dict[str, Any] | None = None) -> None:
        """One metrics.jsonl line; `memory` is the memory sample of the same step (train lines)."""
        values = scalars(line, memory)
        for logger in list(self.active):
            try:
                logger.log(int(line["step"]), line["kind"], values, line)
            except Exception as err:
                self.active.remove(logger)
                self._failed(logger.name, err)

    def close(self) -> None:
        for logger in self.active:
            try:
                logger.close()
            except Exception as err:
                self._failed(logger.name, err)
        self.active = []
