"""Run directories: where a command writes (a new `runs/<config>-<timestamp>`) or reads (the newest run).

    RUN/config.yaml          the resolved config (every field)
    RUN/tokenizer.json       the byte-level BPE tokenizer
    RUN/metrics.jsonl        one line per logged step / evaluation (see train.py)
    RUN/memory.jsonl         training memory samples (memory.py)
    RUN/inference-memory.jsonl
    RUN/checkpoints/step-N/  see checkpoint.py
    RUN/summary.json         written when training ends
    RUN/eval/*.json          one result of `gptoss eval` per checkpoint and text (evaluate/evaluator.py)
    RUN/tensorboard/         TensorBoard event files, RUN/csv/{train,eval}.csv (train/loggers.py)
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import GptossError

RUNS_ROOT = Path("runs")
EVAL_DIR = "eval"


def write_atomic(path: Path, text: str) -> None:
    """Replace a run file in one step (write a hidden sibling, then rename): a kill mid-write leaves the
    old file, never half of the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def new_run_dir(name: str, root: Path = RUNS_ROOT) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{name}-{stamp}-{n}"
    return path


def newest_run_dir(root: Path = RUNS_ROOT, need: str = "config.yaml") -> Path:
    """The most recently modified run under `root` that holds `need`; a clear error when there is none."""
    runs = [p for p in root.glob("*") if p.is_dir() and (p / need).exists()] if root.is_dir() else []
    if not runs:
        raise GptossError(
            f"no run found under {root.resolve()} (looked for a directory with {need}); "
            "train one first: gptoss train --config tiny --run runs/demo"
        )
    return max(runs, key=lambda p: p.stat().st_mtime)
