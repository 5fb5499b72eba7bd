"""The lm-evaluation-harness results `gptoss eval --tasks` saved into a run, for the report.

    read_task_results(folder, warn)   RUN/eval/tasks/*/results.json, oldest first (unreadable ones skipped)
    task_metrics(result)              (task, metric, value, stderr) rows of one lm-eval results dict
    tasks_markdown(summaries)         the "Standard tasks" table of report.md

lm-eval keys a metric as "name,filter" ("acc,none") next to its standard error "name_stderr,filter"; groups
(MMLU, ...) aggregate their subtasks under "groups". Only these files are read: nothing here imports lm-eval.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..run.layout import TASK_RESULTS


def read_task_results(folder: Path, warn: Callable[[str], None]) -> list[dict]:
    results = []
    for path in sorted(folder.glob(f"*/{TASK_RESULTS}")) if folder.is_dir() else []:
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            warn(f"{path}: unreadable, ignored ({err})")
            continue
        if (
            isinstance(result, dict)
            and isinstance(result.get("results"), dict)
            and isinstance(result.get("gptoss"), dict)
        ):
            results.append(result)
        else:
            warn(f"{path}: not a gptoss eval --tasks result, ignored")
    return sorted(results, key=lambda r: str(r["gptoss"].get("time", "")))


def task_metrics(result: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """(task or group, metric, value, standard error or None) in lm-eval's order, groups after tasks; a
    metric under a filter other than "none" is named "metric (filter)"."""
    out = []
    for task, metrics in {**result.get("results", {}), **result.get("groups", {})}.items():
        if not isinstance(metrics, dict):
            continue
        for key, value in metrics.items():
            name, comma, filt = key.partition(",")
            if not comma or name.endswith("_stderr"):
                continue
            label = name if filt == "none" else f"{name} ({filt})"
            stderr = metrics.get(f"{name}_stderr,{filt}")
            out.append((task, label, value, stderr if isinstance(stderr, (int, float)) else None))
    return out


def summarize_tasks(results: list[dict]) -> list[dict]:
    """One row per saved evaluation, task and metric, for summary.json and report.md."""
    rows = []
    for r in results:
        info = r["gptoss"]
        for task, metric, value, stderr in task_metrics(r):
            rows.append(
                {
                    "checkpoint": Path(str(info.get("checkpoint") or "?")).name,
                    "task": task,
                    "n_shot": r.get("n-shot", {}).get(task),
                    "samples": r.get("n-samples", {}).get(task, {}).get("effective"),
                    "limit": info.get("limit"),
                    "metric": metric,
                    "value": value,
                    "stderr": stderr,
                    "time": info.get("time"),
                }
            )
    return rows


def tasks_markdown(summaries: list[dict]) -> list[str]:
    """Every run's task metrics as one markdown table (no lines when there are none)."""
    rows = [(s["name"], r) for s in summaries for r in s.get("task_results", [])]
    if not rows:
        return []
    lines = [
        "",
        "## Standard tasks",
        "",
        "Scored by `gptoss eval --tasks` with lm-evaluation-harness (docs/eval.md): value ± standard error; "
        "n is the documents scored (fewer than the task has when --limit cut it).",
        "",
        "| run | checkpoint | task | n-shot | n | metric | value |",
        "|---" * 7 + "|",
    ]
    for name, r in rows:
        value = r["value"]
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else str(value)
        if r["stderr"] is not None:
            shown += f" ± {r['stderr']:.4f}"
        cells = [
            name,
            r["checkpoint"],
            r["task"],
            "—" if r["n_shot"] is None else str(r["n_shot"]),
            str(r["samples"] or "?"),
            r["metric"],
            shown,
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return lines
