"""`gptoss report` on long and mixed logs: metrics.jsonl is read a line at a time and held by column (memory
does not grow with the file's text), and two runs interleaved in one file are told apart from a resume.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gptoss_cli.report.logs import interleaved, read_jsonl, read_metrics, read_run_logs
from gptoss_cli.report.summary import expert_load, summarize
from gptoss_cli.run.metrics import drop_lines_after


def train_line(step: int, n: int, run: int = 0) -> dict:
    return {
        "kind": "train",
        "step": step,
        "precision": "fp32",
        "epochs": step / n,
        "loss": 3.5 + run + 1 / step,
        "lr": 3e-4,
        "tokens_per_s": 20000.0 + step % 7,
        "tokens": 2048 * step,
        "elapsed_s": step * 0.5,
        "expert_counts": [[step % 7, 3], [1, step % 5]],
    }


def write_lines(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def test_metrics_are_streamed_not_held(tmp_path):
    """60,000 train lines: the reader's peak (Python allocations, numpy's included) stays below the size of
    the file's text; reading it whole, as report once did, took about ten times that."""
    n = 60_000
    path = write_lines(tmp_path / "metrics.jsonl", (train_line(10 * i, n) for i in range(1, n + 1)))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        metrics = read_metrics(path, pytest.fail)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"
    assert len(metrics.train) == n and metrics.train[-1]["step"] == 10 * n and metrics.train[0]["loss"] == 3.6
    steps = np.arange(1, n + 1) * 10
    total, window = metrics.experts
    assert total.tolist() == [[float((steps % 7).sum()), 3.0 * n], [float(n), float((steps % 5).sum())]]
    assert window.tolist() == [[float((steps[-3:] % 7).sum()), 9.0], [3.0, float((steps[-3:] % 5).sum())]]


def test_rows_read_back_as_the_records(tmp_path):
    records = [
        {"time": 0, "rank": 0, "device": "cuda", "allocated_bytes": 2**40 + 1, "note": None, "ok": True},
        {"time": 0.5, "rank": 1, "device": "cpu", "rss_bytes": 1.5, "big": 10**400},
        {"time": float("nan"), "rank": 0},
    ]
    path = tmp_path / "memory.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    rows = read_jsonl(path, pytest.fail)
    assert dict(rows[0]) == records[0] and isinstance(rows[0]["rank"], int) and rows[0]["time"] == 0
    assert dict(rows[1]) == records[1] and rows[1].get("allocated_bytes") is None
    assert "time" not in rows[2] and rows[2]["rank"] == 0  # a NaN reads back as absent
    with pytest.raises(KeyError):
        rows[1]["note"]


@pytest.mark.parametrize(
    "steps, mixed",
    [
        ([10, 20, 30, 40], False),
        ([10, 20, 30, 40, 50, 30, 40, 50, 60], False),  # resumed from step 20 (an older gptoss did not cut)
        ([10, 20, 30, 20, 30, 40, 30, 40, 50, 60], False),  # resumed twice
        ([10, 20, 30, 40, 30], False),  # resumed, killed after its first line
        ([100, 10, 110, 20, 120, 30, 130, 40], True),  # two runs, one ahead
        ([10, 10, 20, 20, 30, 30, 40, 40], True),  # two runs in step
        ([100, 110, 10, 20, 30, 120, 40, 50, 130], True),  # in bursts: 30 -> 120 skips 100 and 110
    ],
)
def test_interleaved_runs_are_told_from_resumes(steps, mixed):
    assert bool(interleaved(np.array(steps, dtype=float))) == mixed


def test_report_says_when_two_runs_share_a_metrics_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    a = [train_line(s, 300) for s in range(10, 310, 10)]
    b = [train_line(s, 300, run=1) for s in range(10, 310, 10)]
    write_lines(run / "metrics.jsonl", [line for pair in zip(a[5:], b[:25], strict=True) for line in pair])
    warnings: list[str] = []
    summary = summarize(read_run_logs(run, "run", warnings.append))
    assert len(warnings) == 1 and "two runs seem to be logged in one file" in warnings[0], warnings
    assert summary["warnings"] == warnings  # in report.md too
    write_lines(run / "metrics.jsonl", a[:20] + a[12:])  # a resume from step 120: no warning
    warnings.clear()
    summary = summarize(read_run_logs(run, "run", warnings.append))
    assert warnings == [] and summary["steps"] == 300


def test_expert_load_of_records_equals_the_streamed_one(tmp_path):
    lines = [train_line(s, 100) for s in range(10, 110, 10)]
    lines[4]["expert_counts"] = [[1, 2, 3]]  # another layout, older than the last: left out
    path = write_lines(tmp_path / "metrics.jsonl", lines)
    shares, dead = expert_load(lines)
    streamed = read_metrics(path, pytest.fail)
    from gptoss_cli.report.summary import expert_shares

    again, dead_again = expert_shares(streamed.experts)
    assert np.array_equal(shares, again) and dead == dead_again


def test_a_resume_cuts_a_long_metrics_file_without_holding_it(tmp_path):
    n = 30_000
    path = write_lines(tmp_path / "metrics.jsonl", (train_line(10 * i, n) for i in range(1, n + 1)))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        drop_lines_after(path, 10 * (n // 2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size / 4, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"
    kept = path.read_text().splitlines()
    assert len(kept) == n // 2 and json.loads(kept[-1])["step"] == 10 * (n // 2)
