"""What `gptoss eval --tasks` shows: progress off a terminal in requests, and lm-eval's metrics as rows of
task, metric, value ± standard error."""

from __future__ import annotations

import io

from rich.console import Console

from gptoss_cli.evaluate.view import EvalProgress, tasks_table
from gptoss_cli.report.tasks import task_metrics


def test_task_progress_off_a_terminal_counts_requests(monkeypatch):
    """progress.py's plain lines (tested there), counting lm-eval requests per request type."""
    monkeypatch.setenv("GPTOSS_PROGRESS_SECONDS", "0")
    out = io.StringIO()
    progress = EvalProgress(Console(file=out, width=200), unit="requests").callbacks
    progress.start("demo/step-1 loglikelihood", 10)
    progress.advance(4)
    progress.advance(6)
    progress.done()
    progress.done()  # a second done (the next request type's start calls it) prints nothing
    lines = out.getvalue().splitlines()
    assert lines[0] == "scoring demo/step-1 loglikelihood: started"
    assert lines[1].startswith("scoring demo/step-1 loglikelihood: 4/10 requests (40%); ")
    assert lines[2].startswith("scoring demo/step-1 loglikelihood: done, 10/10 requests (100%); ") and len(lines) == 3


RESULT = {
    "results": {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25},
        "gsm8k": {"exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": "N/A"},
    },
    "groups": {"mmlu": {"acc,none": 0.3, "acc_stderr,none": 0.01}},
    "n-samples": {"arc_easy": {"original": 2376, "effective": 100}},
    "gptoss": {"name": "demo/step-00000010"},
}


def test_task_metrics_read_lm_evals_keys():
    assert task_metrics(RESULT) == [
        ("arc_easy", "acc", 0.5, 0.1),
        ("arc_easy", "acc_norm", 0.25, None),
        ("gsm8k", "exact_match (strict-match)", 0.125, None),
        ("mmlu", "acc", 0.3, 0.01),
    ]


def test_tasks_table_has_one_row_per_task_and_metric():
    out = io.StringIO()
    Console(file=out, width=200).print(tasks_table([RESULT]))
    text = out.getvalue()
    assert "0.5000 ± 0.1000" in text and "exact_match (strict-match)" in text and "100" in text
    assert sum("arc_easy" in line for line in text.splitlines()) == 2
