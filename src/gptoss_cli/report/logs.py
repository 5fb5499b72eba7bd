"""Reading a run's telemetry for `gptoss report`: the JSONL logs, summary.json and config.yaml, tolerantly.

Any file may be missing or cut short by a killed run: unreadable lines are skipped with a warning (kept on
the run for report.md), and only a missing run directory is an error. Files are read a line at a time and
held by column (report/table.py): a million-line metrics.jsonl takes tens of megabytes, not gigabytes. Two
runs' lines interleaved in one metrics.jsonl are told apart from a resume and reported.
"""

from __future__ import annotations

import json
import math
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GptossError
from ..run.layout import CONFIG, EVAL_DIR, EVAL_TASKS, INFER_MEMORY, METRICS, SUMMARY
from ..run.layout import MEMORY as TRAIN_MEMORY
from .table import Rows, Table
from .tasks import read_task_results

GIB = 1024**3
DEAD_WINDOW = 3  # logged intervals; the tiny config logs every 10 steps, so its last 30 steps
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


def _parse(raw: bytes) -> tuple[dict | None, bool]:
    """(the record of one line or None, whether it followed a cut-off record on the same line)."""
    line = raw.decode("utf-8", errors="replace")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        obj = _tail_record(line)
        return obj, obj is not None
    return (obj if isinstance(obj, dict) else None), False


def iter_jsonl(path: Path, warn: Warn) -> Iterator[tuple[int, dict]]:
    """(byte offset of its line, record) for every JSON object in `path`, one line at a time (the file is
    never held whole); lines that do not parse are skipped with one warning once the file is read.

    memory.py and train/loop.py flush every line, so a killed run loses at most its last line, half-written:
    that one is reported as cut off rather than as corrupt.
    """
    if not path.is_file():
        return
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the last record is handed over
    except OSError as err:
        warn(f"cannot read {path}: {err}")
        return
    bad, bad_count, joined, last, offset = [], 0, [], 0, 0
    with f:
        for n, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            last = n
            obj, was_joined = _parse(raw)
            if obj is None:
                bad_count += 1
                bad = bad[:5] + [n]  # the first five and the latest
                continue
            if was_joined and len(joined) < 5:
                joined.append(n)
            yield start, obj
    if bad and bad[-1] == last:
        warn(f"{path}: skipped the last line ({bad.pop()}), cut off (was the run killed?)")
        bad_count -= 1
    if bad_count:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if bad_count > 5 else "")
        warn(f"{path}: skipped {bad_count} unreadable line(s): {shown}")
    if joined:
        warn(
            f"{path}: line(s) {', '.join(map(str, joined))} began with a record cut off by a kill; "
            "kept the record that follows it"
        )


def read_jsonl(path: Path, warn: Warn) -> Rows:
    """The JSON objects in `path`, one per line, in file order (held by column: report/table.py)."""
    table = Table()
    for _, record in iter_jsonl(path, warn):
        table.append(record)
    return table.rows()


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


def numbers(records: Sequence, key: str) -> np.ndarray:
    """The finite numbers of `key` over `records` (Rows by column, or any sequence of mappings), in order."""
    if isinstance(records, Rows):
        values = records.column(key)
    else:
        values = np.array([r.get(key) if is_number(r.get(key)) else np.nan for r in records], dtype=float)
    return values[np.isfinite(values)]


def _last_per_step(steps: np.ndarray) -> np.ndarray:
    """Row indices, one per step in step order: the last row of each step (a resumed run logged its steps
    again, and the last wins)."""
    unique, first_from_end = np.unique(steps[::-1], return_index=True)
    return len(steps) - 1 - first_from_end


def interleaved(steps: np.ndarray) -> int:
    """How many times the steps (of one kind of line, in file order) go back in a way no resume explains;
    0 for one run's lines. A resume goes back once, to where it restarted, and then logs the same steps
    again (since metrics.jsonl is cut at a resume's first line, it does not even go back). Two runs' lines
    interleaved go back over and over, and after going back they skip over steps the file already holds."""
    n = len(steps)
    back = np.flatnonzero(steps[1:] <= steps[:-1]) + 1  # positions whose step is not past the one before
    if len(back) == 0:
        return 0
    if len(back) >= 3 and 2 * len(back) >= n - 1:  # back at least as often as forward
        return len(back)
    is_back = np.zeros(n, dtype=bool)
    is_back[back] = True
    segment = np.maximum.accumulate(np.where(is_back, np.arange(n), 0))  # where each line's segment starts
    pairs = np.flatnonzero(~is_back[1:]) + 1  # i: the step rises from line i-1 to line i
    pairs = pairs[pairs > back[0]]  # within a segment that started by going back
    values, first = np.unique(steps, return_index=True)  # each step and the line where it first appears
    lo = np.searchsorted(values, steps[pairs - 1], "right")
    hi = np.searchsorted(values, steps[pairs], "left")
    for k in np.flatnonzero(hi > lo):  # steps strictly between two consecutive lines of a segment
        if first[lo[k] : hi[k]].min() < segment[pairs[k]]:  # ... that were in the file before it: skipped
            return len(back)
    return 0


def expert_totals(counts: Iterable) -> tuple[np.ndarray, np.ndarray] | None:
    """Logged expert counts, newest first -> (sum over the run, sum over the last DEAD_WINDOW logs), both
    (layers, experts), over the logs in the newest one's layout (a run resumed with another model shape
    mixes layouts); None without usable counts."""
    total = window = None
    used = 0
    for raw in counts:
        try:
            a = np.asarray(raw, dtype=float)
        except (TypeError, ValueError):  # ragged or non-numeric: a line we cannot use
            continue
        if a.ndim != 2 or not a.size or not np.isfinite(a).all() or (total is not None and a.shape != total.shape):
            continue
        total = a.copy() if total is None else total + a
        if used < DEAD_WINDOW:
            window = a.copy() if window is None else window + a
        used += 1
    return None if total is None else (total, window)


@dataclass
class Metrics:
    train: Rows  # one per step, in step order
    evals: Rows
    experts: tuple[np.ndarray, np.ndarray] | None  # expert_totals over the train rows


def read_metrics(path: Path, warn: Warn) -> Metrics:
    """metrics.jsonl streamed: train and eval lines by column, one per step; the expert counts summed in a
    second pass over the lines that won their step (so memory does not grow with the counts' size)."""
    tables = {"train": Table(), "eval": Table()}
    offsets = {"train": array("q"), "eval": array("q")}
    for offset, record in iter_jsonl(path, warn):
        kind = record.get("kind")
        if kind in tables and is_number(record.get("step")):
            tables[kind].append(record)
            offsets[kind].append(offset)
    rows = {}
    for kind, table in tables.items():
        steps = table.column("step")
        times = interleaved(steps)
        if times:
            warn(
                f"{path}: the {kind} lines' steps go back {times} time(s) in a way no resumed run does: two runs "
                "seem to be logged in one file, and the figures mix them (the last line of each step is used)"
            )
        rows[kind] = table.rows(_last_per_step(steps))
    experts = None
    if len(rows["train"]):
        with open(path, "rb") as f:

            def newest_first() -> Iterator:
                for i in rows["train"].index[::-1]:
                    f.seek(offsets["train"][i])
                    record, _ = _parse(f.readline())
                    yield (record or {}).get("expert_counts")

            experts = expert_totals(newest_first())
    return Metrics(rows["train"], rows["eval"], experts)


@dataclass
class RunData:
    path: Path
    name: str
    train: Sequence = ()  # metrics.jsonl train lines, by step (Rows of mappings)
    evals: Sequence = ()  # metrics.jsonl eval lines, by step
    train_memory: Sequence = ()  # memory.jsonl, file order (all ranks)
    infer_memory: Sequence = ()  # inference-memory.jsonl, file order
    experts: tuple | None = None  # (total, last DEAD_WINDOW) expert counts over the train lines
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

    metrics = read_metrics(path / METRICS, note)
    run.train, run.evals, run.experts = metrics.train, metrics.evals, metrics.experts
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
