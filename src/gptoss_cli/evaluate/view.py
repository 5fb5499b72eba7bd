"""What `gptoss eval` shows on stderr: a progress bar per model (plain lines off a terminal) and the results
side by side: the text scores or the lm-eval task metrics (rich tables)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..progress import progress
from ..report.tasks import task_metrics
from .evaluator import Progress as Callbacks

ROWS = [  # (label, result key, format)
    ("step", "step", "{:,}"),
    ("loss (nats/token)", "loss", "{:.4f}"),
    ("perplexity", "ppl", "{:,.2f}"),
    ("bits per byte", "bits_per_byte", "{:.4f}"),
    ("top-1 accuracy", "accuracy", "{:.2%}"),
    ("tokens", "tokens", "{:,}"),
    ("bytes", "bytes", "{:,}"),
    ("bytes per token", "bytes_per_token", "{:.2f}"),
    ("context / stride", None, None),
    ("device / dtype", None, None),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
]


def _cell(result: dict[str, Any], key: str | None, fmt: str | None, label: str) -> str:
    if label == "context / stride":
        return f"{result['context']} / {result['stride']}"
    if label == "device / dtype":
        return f"{result['device']} / {result['dtype']}"
    value = result.get(key)
    return "—" if value is None else fmt.format(value)


def results_table(results: list[dict[str, Any]]) -> Table:
    """One column per run or checkpoint, scored on the same text."""
    docs = results[0]["documents"] if results else 0
    table = Table(title=f"Evaluation on {', '.join(results[0]['data']) if results else '?'} ({docs:,} documents)")
    table.add_column("")
    for r in results:
        table.add_column(r["name"], justify="right", overflow="fold")
    for label, key, fmt in ROWS:
        table.add_row(label, *(_cell(r, key, fmt, label) for r in results))
    return table


def tasks_table(results: list[dict[str, Any]]) -> Table:
    """lm-eval's metrics (value ± standard error), one row per task and metric, one column per run."""
    table = Table(title="lm-evaluation-harness tasks")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("n", justify="right")
    for r in results:
        table.add_column(r["gptoss"]["name"], justify="right", overflow="fold")
    rows: dict[tuple[str, str], list[str]] = {}
    for i, r in enumerate(results):
        for task, metric, value, stderr in task_metrics(r):
            n = r.get("n-samples", {}).get(task, {}).get("effective")
            cells = rows.setdefault((task, metric), ["" if n is None else f"{n:,}"] + ["—"] * len(results))
            cells[1 + i] = _metric(value, stderr)
    for (task, metric), cells in rows.items():
        table.add_row(task, metric, *cells)
    return table


def _metric(value: Any, stderr: Any) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    text = f"{value:.4f}"
    return text + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else "")


class EvalProgress:
    """A progress bar for each model (or request type) in turn; plain lines when stderr is not a terminal.
    `unit` is what it counts: tokens (a text) or requests (lm-eval tasks)."""

    def __init__(self, console: Console, disable: bool = False, unit: str = "tokens"):
        self._bar = progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=disable,
            unit=unit,
        )
        self._task = None
        self.callbacks = Callbacks(start=self._start, advance=self._advance, done=self._done)

    def _start(self, label: str, total: int) -> None:
        self._task = self._bar.add_task(f"scoring {label}", total=total)

    def _advance(self, tokens: int) -> None:
        self._bar.update(self._task, advance=tokens)

    def _done(self) -> None:
        if self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None

    def __enter__(self) -> EvalProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)
