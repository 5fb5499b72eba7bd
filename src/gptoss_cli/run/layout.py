"""The run directory: the one place that knows its file names, where new runs go and which run is newest.

    RUN/config.yaml             the resolved config (every field)
    RUN/tokenizer.json          the byte-level BPE tokenizer
    RUN/chat_template.json      an imported run's own chat template (data/chat_format.py)
    RUN/metrics.jsonl           one line per logged step / evaluation (train/loop.py)
    RUN/memory.jsonl            training memory samples (memory.py)
    RUN/inference-memory.jsonl  inference memory samples
    RUN/checkpoints/step-N/     model.safetensors, trainer.safetensors, state.json (run/checkpoint.py)
    RUN/summary.json            written when training ends
    RUN/train.lock              held (flock) by the one trainer of this run (run/lock.py)
    RUN/report/                 gptoss report's PNGs and report.md
    RUN/eval/*.json             one result of `gptoss eval` per checkpoint and text (evaluate/evaluator.py)
    RUN/eval/tasks/C-D/         `gptoss eval --tasks`: lm-eval's results.json (+ samples_<task>.jsonl) per
                                checkpoint C and evaluation D (evaluate/harness.py)
    RUN/tensorboard/            TensorBoard event files; RUN/csv/{train,eval}.csv; RUN/wandb/ (train/loggers.py)

Every stage reads and writes a run through RunDir, so a file name is spelled once. This module imports
neither torch nor the tokenizer: `gptoss report` uses it too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig, config_from_dict, read_yaml, save_config
from ..errors import GptossError

RUNS_ROOT = Path("runs")
CONFIG, TOKENIZER, CHECKPOINTS, SUMMARY = "config.yaml", "tokenizer.json", "checkpoints", "summary.json"
METRICS, MEMORY, INFER_MEMORY, REPORT = "metrics.jsonl", "memory.jsonl", "inference-memory.jsonl", "report"
LOCK = "train.lock"
MODEL, TRAINER, STATE = "model.safetensors", "trainer.safetensors", "state.json"  # in each step-N/
CHAT_TEMPLATE = "chat_template.json"  # an imported run's own chat template and its special tokens
EVAL_DIR, TENSORBOARD, CSV_DIR, WANDB_DIR = "eval", "tensorboard", "csv", "wandb"
EVAL_TASKS, TASK_RESULTS = "tasks", "results.json"  # RUN/eval/tasks/<checkpoint>-<digest>/results.json


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:  # RunDir(a path) or RunDir(a RunDir): the same directory
        path = self.path.path if isinstance(self.path, RunDir) else Path(self.path)
        object.__setattr__(self, "path", path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    @property
    def chat_template(self) -> Path:
        return self.path / CHAT_TEMPLATE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def memory(self) -> Path:
        return self.path / MEMORY

    @property
    def infer_memory(self) -> Path:
        return self.path / INFER_MEMORY

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def eval(self) -> Path:
        return self.path / EVAL_DIR

    @property
    def eval_tasks(self) -> Path:
        return self.path / EVAL_DIR / EVAL_TASKS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def csv(self) -> Path:
        return self.path / CSV_DIR

    @property
    def wandb(self) -> Path:
        return self.path / WANDB_DIR

    @property
    def name(self) -> str:
        return self.path.name

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def of_checkpoint(cls, ckpt: Path) -> RunDir:
        """RUN/checkpoints/step-N -> RUN; a lone step directory is its own run (it holds its own files)."""
        ckpt = Path(ckpt)
        return cls(ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt)

    @classmethod
    def new(cls, name: str, root: Path = RUNS_ROOT) -> RunDir:
        """A fresh `root/<name>-<timestamp>` (not created yet)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = root / f"{name}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = root / f"{name}-{stamp}-{n}"
        return cls(path)

    @classmethod
    def newest(cls, root: Path = RUNS_ROOT, need: str = CONFIG) -> RunDir:
        """The most recently modified run under `root` that holds `need`; a clear error when there is none."""
        return cls.by_age(root, need)[0]

    @classmethod
    def by_age(cls, root: Path = RUNS_ROOT, need: str = CONFIG) -> list[RunDir]:
        """The runs under `root` that hold `need`, the most recently modified first; a clear error when there
        is none."""
        runs = [p for p in root.glob("*") if p.is_dir() and (p / need).exists()] if root.is_dir() else []
        if not runs:
            raise GptossError(
                f"no run found under {root.resolve()} (looked for a directory with {need}); "
                "train one first: gptoss train --config tiny --run runs/demo"
            )
        return [cls(p) for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]

    # ---- the resolved config ------------------------------------------------------------------
    def read_config(self) -> RunConfig:
        return config_from_dict(read_yaml(self.config), str(self.config))

    def write_config(self, cfg: RunConfig) -> None:
        save_config(cfg, self.config)  # atomic: a resume rewrites a run's config
