"""Reading a run's telemetry for `gptoss report`: the JSONL logs, summary.json and config.yaml, tolerantly.

Any file may be missing or cut short by a killed run: unreadable lines are skipped with a warning (kept on
the run for report.md), and only a missing run directory is an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GptossError
from ..run.layout import CONFIG, EVAL_DIR, EVAL_TASKS, INFER_MEMORY, METRICS, SUMMARY
from ..run.layout import MEMORY as TRAIN_MEMORY
from .tasks import read_task_results

GIB = 1024**3
Warn = Callable[[str], None]


def is_number(value: Any) -> bool:
    """A finite real number (JSON may carry NaN or Infinity from a diverged run; bools are not numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def first_number(*values: Any) -> Any:
    return next((v for v in values if is_number(v)), None)


def _tail_record(line: str) -> dict | None:
    """The whole record at the end of a line that starts with a cut-off one, else None.

    The files are opened for append, so a run resumed after a kill writes its first record right after the
    half-written line. Records nest lists, never objects, so the last '{"' starts that record.
    """
    start = line.rfind('{"')
    if start <= 0:
        return None
    try:
        obj = json.loads(line[start:])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def read_jsonl(path: Path, warn: Warn) -> list[dict]:
    """The JSON objects in `path`, one per line; lines that do not parse are skipped with one warning.

    memory.py and train/loop.py flush every line, so a killed run loses at most its last line, half-written:
    that one is reported as cut off rather than as corrupt.
    """
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        warn(f"cannot read {path}: {err}")
        return []
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records, bad, joined = [], [], []
    for n, line in numbered:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = _tail_record(line)
            if obj is not None:
                joined.append(n)
        if isinstance(obj, dict):
            records.append(obj)
        else:
            bad.append(n)
    if bad and bad[-1] == numbered[-1][0]:
        warn(f"{path}: skipped the last line ({bad.pop()}), cut off (was the run killed?)")
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        warn(f"{path}: skipped {len(bad)} unreadable line(s): {shown}")
    if joined:
        warn(
            f"{path}: line(s) {', '.join(map(str, joined[:5]))} began with a record cut off by a kill; "
            "kept the record that follows it"
        )
    return records


def read_eval_results(folder: Path, warn: Warn) -> list[dict]:
    """The results `gptoss eval` saved, oldest first; a file that does not parse is skipped with a warning."""
    results = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            warn(f"{path}: unreadable, ignored ({err})")
            continue
        if isinstance(result, dict) and all(is_number(result.get(k)) for k in ("loss", "bits_per_byte", "tokens")):
            results.append(result)
        else:
            warn(f"{path}: not a gptoss eval result, ignored")
    return sorted(results, key=lambda r: str(r.get("time", "")))


def _by_step(records: list[dict], kind: str) -> list[dict]:
    """Lines of one kind, one per step in step order: a resumed run logs its steps again, and the last wins."""
    latest = {r["step"]: r for r in records if r.get("kind") == kind and is_number(r.get("step"))}
    return [latest[s] for s in sorted(latest)]


@dataclass
class RunData:
    path: Path
    name: str
    train: list[dict] = field(default_factory=list)  # metrics.jsonl train lines, by step
    evals: list[dict] = field(default_factory=list)  # metrics.jsonl eval lines, by step
    train_memory: list[dict] = field(default_factory=list)  # memory.jsonl, file order (all ranks)
    infer_memory: list[dict] = field(default_factory=list)  # inference-memory.jsonl, file order
    summary: dict | None = None
    eval_results: list[dict] = field(default_factory=list)  # RUN/eval/*.json (gptoss eval), oldest first
    task_results: list[dict] = field(default_factory=list)  # RUN/eval/tasks/*/results.json (eval --tasks)
    config: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def has_data(self) -> bool:
        return bool(
            self.train
            or self.evals
            or self.train_memory
            or self.infer_memory
            or self.summary
            or self.eval_results
            or self.task_results
        )


def read_run_logs(path: Path, name: str, warn: Warn) -> RunData:
    if not path.is_dir():
        raise GptossError(f"run directory not found: {path} (train one: gptoss train --config tiny --run {path})")
    run = RunData(path=path, name=name)

    def note(message: str) -> None:  # keep warnings for report.md as well as showing them now
        run.warnings.append(message)
        warn(message)

    metrics = read_jsonl(path / METRICS, note)
    run.train, run.evals = _by_step(metrics, "train"), _by_step(metrics, "eval")
    run.train_memory = read_jsonl(path / TRAIN_MEMORY, note)
    run.infer_memory = read_jsonl(path / INFER_MEMORY, note)
    if (path / SUMMARY).is_file():
        try:
            summary = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
            run.summary = summary if isinstance(summary, dict) else None
        except (OSError, ValueError) as err:
            note(f"{path / SUMMARY}: unreadable, ignored ({err})")
    run.eval_results = read_eval_results(path / EVAL_DIR, note)
    run.task_results = read_task_results(path / EVAL_DIR / EVAL_TASKS, note)
    if (path / CONFIG).is_file():
        import yaml

        try:
            config = yaml.safe_load((path / CONFIG).read_text(encoding="utf-8"))
            run.config = config if isinstance(config, dict) else {}
        except (OSError, yaml.YAMLError) as err:
            note(f"{path / CONFIG}: unreadable, ignored ({str(err).splitlines()[0]})")
    return run
