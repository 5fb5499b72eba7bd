"""Progress of long work: rich's live bars on a terminal, plain lines everywhere else.

Off a terminal (a pipe, a log file, nohup, Slurm, CI) rich draws nothing until the end, so a job that runs
for minutes would print nothing at all. `progress(...)` returns rich's Progress on a terminal and
PlainProgress otherwise, with the same methods (add_task, update, advance, remove_task, console): a line
when a task starts, at most one every GPTOSS_PROGRESS_SECONDS (default 30) while it moves

    training: 40/100 (40%), loss 4.512  13,799 tok/s; 12 s elapsed, about 18 s left

and one when it reaches its total.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

from rich.console import Console

EVERY_S = 30.0


def byte_progress(show: bool):
    """`gptoss prepare`'s bar of bytes read (size, MB/s, time left), transient, or plain lines off a terminal;
    a null context when not `show`."""
    if not show:
        return contextlib.nullcontext(None)
    from rich import progress as rp

    from .output import console

    columns = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.DownloadColumn(), rp.TransferSpeedColumn())
    return progress(*columns, rp.TimeRemainingColumn(), console=console, transient=True, unit="B")


def progress(*columns, console: Console, transient: bool = True, disable: bool = False, unit: str = ""):
    """rich.progress.Progress(*columns) on a terminal, PlainProgress elsewhere, nothing when `disable`.
    `unit` names what the plain lines count ("tokens", "B" for bytes shown as MB)."""
    from rich.progress import Progress

    if disable or console.is_terminal:
        return Progress(*columns, console=console, transient=transient, disable=disable)
    return PlainProgress(console, unit=unit)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    fields: dict
    start: float = field(default_factory=time.monotonic)
    said: float = field(default_factory=time.monotonic)
    finished: bool = False


class PlainProgress:
    def __init__(self, console: Console, unit: str = "", every_s: float | None = None):
        self.console, self.unit = console, unit
        self.every_s = every_s if every_s is not None else float(os.environ.get("GPTOSS_PROGRESS_SECONDS", EVERY_S))
        self._tasks: dict[int, _Task] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        task_id = len(self._tasks)
        self._tasks[task_id] = _Task(description, total, completed, fields)
        self._say(self._tasks[task_id], "started" if not completed else None)
        return task_id

    def update(self, task_id: int, *, completed=None, advance=None, total=None, description=None, **fields) -> None:
        task = self._tasks[task_id]
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if total is not None:
            task.total = total
        if description is not None:
            task.description = description
        task.fields.update(fields)
        if task.total is not None and task.completed >= task.total and not task.finished:
            task.finished = True
            self._say(task, "done")
        elif time.monotonic() - task.said >= self.every_s:
            self._say(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    def _say(self, task: _Task, event: str | None = None) -> None:
        task.said = time.monotonic()
        elapsed = task.said - task.start
        parts = [self._amount(task)]
        info = task.fields.get("info")
        if info:
            parts.append(str(info))
        timing = f"{elapsed:,.0f} s elapsed"
        if event is None and task.total and task.completed:
            left = elapsed * (task.total - task.completed) / task.completed
            timing += f", about {left:,.0f} s left"
        head = f"{task.description}: " + (f"{event}, " if event == "done" else "")
        line = head + ", ".join(p for p in parts if p) + f"; {timing}"
        self.console.print(line if event != "started" else f"{task.description}: started", highlight=False)

    def _amount(self, task: _Task) -> str:
        done, total = task.completed, task.total
        if self.unit == "B":  # bytes, as MB
            text = f"{done / 1e6:,.1f}" + (f" of {total / 1e6:,.1f} MB" if total else " MB")
        else:
            unit = f" {self.unit}" if self.unit else ""
            text = f"{done:,.0f}" + (f"/{total:,.0f}" if total else "") + unit
        return text + (f" ({done / total:.0%})" if total else "")
