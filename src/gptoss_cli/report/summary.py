"""`gptoss report`: read a run's JSONL telemetry, summarise it, draw the PNGs and write a shareable report.md.

Inputs (see run/layout.py): RUN/metrics.jsonl (train and eval lines, train/loop.py), RUN/memory.jsonl and
RUN/inference-memory.jsonl (memory.py), RUN/summary.json (written only when training ends) and
RUN/config.yaml. Any of them may be missing or cut short by a killed run: the report plots what exists,
names what is missing and skips unreadable lines with a warning. Bad data never crashes it; only "no run
at all" is an error. The figures are drawn in figures.py; docs/report.md explains how to read them.

Two definitions the summary and the heatmap rely on:
- expert load: each expert's share of its layer's token-slots, summed over every logged training interval
  of the run (a row sums to 1; perfect balance is 1 / num_experts).
- dead expert: an expert routed 0 token-slots over the last DEAD_WINDOW logged training intervals, in a
  layer that did route tokens then. Early collapse that later recovers is not dead; late collapse is.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GptossError
from ..run.layout import RunDir
from .logs import (
    DEAD_WINDOW,
    GIB,
    INFER_MEMORY,
    METRICS,
    SUMMARY,
    TRAIN_MEMORY,
    RunData,
    Warn,
    expert_totals,
    first_number,
    is_number,
    numbers,
    read_run_logs,
)
from .tasks import summarize_tasks, tasks_markdown

# The figures, in report order: file name, section title, what it shows (for report.md).
FIGURES = [
    (
        "loss.png",
        "Loss",
        "Training and validation LM loss per optimizer step; perplexity on the right axis; learning rate below.",
    ),
    ("throughput.png", "Throughput", "Training tokens per second per logging interval; dotted: the median."),
    (
        "expert-load.png",
        "Expert load",
        "Share of each layer's token-slots routed to each expert over the run; "
        f"white is balanced, blue underused, red overloaded; black cells are dead (0 tokens in the last "
        f"{DEAD_WINDOW} logs).",
    ),
    (
        "train-gpu-memory.png",
        "Training memory",
        "Memory over time in GiB (GPU: torch allocated, reserved, peak, "
        "NVML device used; CPU: process RSS); training steps on the top axis.",
    ),
    (
        "inference-gpu-memory.png",
        "Inference memory",
        "Memory over time in GiB during generation; tokens generated on the top axis.",
    ),
]


def expert_shares(totals: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray | None, list[tuple[int, int]]]:
    """logs.expert_totals -> (shares (layers, experts) over the whole run, dead experts as (layer, expert));
    (None, []) without counts."""
    if totals is None:
        return None, []
    total, window = totals  # (layers, experts) each
    rows = total.sum(axis=1, keepdims=True)
    shares = np.divide(total, rows, out=np.full_like(total, np.nan), where=rows > 0)
    live_layers = window.sum(axis=1) > 0  # a layer that routed nothing was not logged, not dead
    dead = [(int(layer), int(e)) for layer, e in np.argwhere((window == 0) & live_layers[:, None])]
    return shares, dead


def expert_load(train: Sequence) -> tuple[np.ndarray | None, list[tuple[int, int]]]:
    """expert_shares of train lines (oldest first) that carry their `expert_counts`."""
    return expert_shares(expert_totals(r.get("expert_counts") for r in reversed(train)))


def _peak_memory(records: list[dict]) -> tuple[int | None, str | None]:
    """(peak bytes, what was measured) over every rank: torch's peak allocated on CUDA, process RSS on CPU."""
    cuda = [r for r in records if r.get("device") == "cuda"]
    if cuda:
        peaks = [first_number(r.get("peak_bytes"), r.get("allocated_bytes")) for r in cuda]
        kind = "GPU, torch peak allocated"
    else:
        peaks, kind = [r.get("rss_bytes") for r in records], "CPU, process RSS"
    peaks = [p for p in peaks if is_number(p)]
    ranks = {r.get("rank", 0) for r in records}
    if len(ranks) > 1:
        kind += f", max over {len(ranks)} ranks"
    return (int(max(peaks)), kind) if peaks else (None, None)


def summarize(run: RunData) -> dict[str, Any]:
    """The numbers a person wants at a glance; logs first (they survive a killed run), summary.json second."""
    s = run.summary or {}
    last = run.train[-1] if run.train else {}
    last_eval = run.evals[-1] if run.evals else {}
    loss = first_number(last.get("loss"), s.get("final_loss"))
    val_loss = first_number(last_eval.get("val_loss"), s.get("final_val_loss"))
    vals = numbers(run.evals, "val_loss")
    elapsed = np.concatenate([numbers(run.train, "elapsed_s"), numbers(run.evals, "elapsed_s")])
    elapsed = first_number(s.get("elapsed_s"), float(elapsed.max()) if elapsed.size else None)
    tokens = first_number(s.get("tokens"), last.get("tokens"))
    logged_tps = numbers(run.train, "tokens_per_s")
    # Overall tokens / wall time when known; the median logged rate otherwise.
    tps = first_number(
        s.get("tokens_per_s"),
        tokens / elapsed if tokens and elapsed else None,
        float(np.median(logged_tps)) if logged_tps.size else None,
    )
    train_peak, train_kind = _peak_memory(run.train_memory)
    if train_peak is None and is_number(s.get("peak_memory_bytes")):
        train_peak, train_kind = int(s["peak_memory_bytes"]), f"{s.get('device', '?')}, from summary.json"
    infer_peak, infer_kind = _peak_memory(run.infer_memory)
    shares, dead = expert_shares(run.experts)
    memory = itertools.chain(run.train_memory, run.infer_memory)
    devices = sorted({r["device"] for r in memory if isinstance(r.get("device"), str)})
    train_cfg = run.config.get("train") if isinstance(run.config.get("train"), dict) else {}

    missing = []
    if not run.train:
        missing.append(f"training metrics (no train lines in {METRICS}): gptoss train --run {run.path}")
    elif not run.evals:
        missing.append("validation loss (no eval lines yet: evaluation runs every train.eval_every steps)")
    if run.train and shares is None:
        missing.append(f"expert load (no expert_counts in {METRICS})")
    if not run.train_memory:
        missing.append(f"training memory ({TRAIN_MEMORY})")
    if not run.infer_memory:
        missing.append(f'inference memory ({INFER_MEMORY}): gptoss infer "Hello" --run {run.path}')
    if run.summary is None and run.train:
        missing.append(f"{SUMMARY} (training did not finish: killed or still running); figures come from the logs")
    return {
        "name": run.name,
        "path": str(run.path),
        "config": run.config.get("name"),
        "status": (f"{s['status']} ({s['signal']})" if s.get("signal") else s.get("status"))
        or ("unfinished (no summary.json)" if run.train else "not trained"),
        "device": s.get("device") or ", ".join(devices) or None,
        "precision": s.get("precision") or last.get("precision") or train_cfg.get("precision"),
        "steps": first_number(s.get("steps"), last.get("step")),
        # Epochs done, a fraction included; a log line's "epoch" is the zero-based index of the one in
        # progress, so a killed run's count is read from "epochs" (older logs: the epochs completed).
        "epochs": first_number(s.get("epochs"), last.get("epochs"), last.get("epoch")),
        "elapsed_s": elapsed,
        "tokens": tokens,
        "tokens_per_s": tps,
        "final_loss": loss,
        "final_ppl": first_number(last.get("ppl"), math.exp(min(loss, 700)) if loss is not None else None),
        "final_val_loss": val_loss,
        "final_val_ppl": first_number(
            last_eval.get("val_ppl"), math.exp(min(val_loss, 700)) if val_loss is not None else None
        ),
        "best_val_loss": first_number(float(vals.min()) if vals.size else None, s.get("best_val_loss")),
        "train_peak_memory_bytes": train_peak,
        "train_memory_measure": train_kind,
        "infer_peak_memory_bytes": infer_peak,
        "infer_memory_measure": infer_kind,
        "num_layers": None if shares is None else int(shares.shape[0]),
        "num_experts": None if shares is None else int(shares.shape[1]),
        # max over layers of (busiest expert's share / uniform share): 1.0 is perfect balance
        "expert_max_load": None if shares is None else round(float(np.nanmax(shares) * shares.shape[1]), 3),
        "dead_experts": [list(d) for d in dead],
        "dead_window_logs": DEAD_WINDOW,
        "eval_results": [{k: r.get(k) for k in EVAL_FIELDS} for r in run.eval_results],
        "task_results": summarize_tasks(run.task_results),
        "missing": missing,
        "warnings": list(run.warnings),
    }


EVAL_FIELDS = (
    "checkpoint",
    "step",
    "data",
    "text_digest",
    "tokens",
    "bytes",
    "loss",
    "ppl",
    "bits_per_byte",
    "accuracy",
    "context",
    "stride",
    "device",
    "dtype",
    "time",
)


def _number(value: Any, fmt: str) -> str:
    return fmt.format(value) if is_number(value) else "—"


def eval_markdown(summaries: list[dict]) -> list[str]:
    """The `gptoss eval` results of every run as one markdown table (no lines when there are none)."""
    rows = [(s["name"], r) for s in summaries for r in s["eval_results"]]
    if not rows:
        return []
    lines = [
        "",
        "## Evaluation",
        "",
        "Scored by `gptoss eval` (docs/eval.md). Bits per byte compare runs with "
        "different tokenizers; rows with the same text digest scored exactly the same text.",
        "",
        "| run | checkpoint | text (digest) | tokens | bytes | loss | ppl | bits/byte | top-1 | context / stride "
        "| device |",
        "|---" * 11 + "|",
    ]
    for name, r in rows:
        data = ", ".join(map(str, r["data"])) if isinstance(r.get("data"), list) else str(r.get("data") or "?")
        cells = [
            name,
            Path(str(r.get("checkpoint") or "?")).name,
            f"{data} ({r.get('text_digest') or '?'})",
            _number(r.get("tokens"), "{:,}"),
            _number(r.get("bytes"), "{:,}"),
            _number(r.get("loss"), "{:.4f}"),
            _number(r.get("ppl"), "{:,.2f}"),
            _number(r.get("bits_per_byte"), "{:.4f}"),
            _number(r.get("accuracy"), "{:.2%}"),
            f"{r.get('context', '?')} / {r.get('stride', '?')}",
            f"{r.get('device', '?')} {r.get('dtype', '')}".strip(),
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _loss(loss: float | None, ppl: float | None) -> str:
    if loss is None:
        return "—"
    return f"{loss:.4f}" + (f" (ppl {ppl:,.2f})" if ppl is not None else "")


def _memory(peak: int | None, measure: str | None, missing: str = "—") -> str:
    return missing if peak is None else f"{peak / GIB:.2f} GiB ({measure})"


def _dead(s: dict) -> str:
    if s["num_experts"] is None:
        return "—"
    dead = s["dead_experts"]
    total = s["num_layers"] * s["num_experts"]
    if not dead:
        return f"none of {total} (busiest at {s['expert_max_load']:.2f}x a uniform share)"
    names = ", ".join(f"L{layer}.E{e}" for layer, e in dead[:8]) + (", ..." if len(dead) > 8 else "")
    return f"{len(dead)} of {total}: {names}"


def summary_rows(summaries: list[dict]) -> list[tuple[str, list[str]]]:
    """(label, one cell per run) rows shared by the terminal table and report.md."""

    def row(label: str, cell: Callable[[dict], Any]) -> tuple[str, list[str]]:
        return label, [str(cell(s)) for s in summaries]

    def count(v: float | None) -> str:
        return "—" if v is None else f"{v:,.0f}"

    def epochs(v: float | None) -> str:
        return "—" if v is None else f"{v:,.2f}".rstrip("0").rstrip(".") + (" epoch" if v == 1 else " epochs")

    return [
        row("config / device", lambda s: f"{s['config'] or '?'} / {s['device'] or '?'} ({s['precision'] or '?'})"),
        row("status", lambda s: s["status"]),
        row("steps (epochs)", lambda s: f"{count(s['steps'])} ({epochs(s['epochs'])})"),
        row("wall time", lambda s: _duration(s["elapsed_s"])),
        row("tokens", lambda s: count(s["tokens"])),
        row("tokens/s (training)", lambda s: count(s["tokens_per_s"])),
        row("final training loss", lambda s: _loss(s["final_loss"], s["final_ppl"])),
        row("final validation loss", lambda s: _loss(s["final_val_loss"], s["final_val_ppl"])),
        row("best validation loss", lambda s: _loss(s["best_val_loss"], None)),
        row("peak memory, training", lambda s: _memory(s["train_peak_memory_bytes"], s["train_memory_measure"])),
        row(
            "peak memory, inference",
            lambda s: _memory(s["infer_peak_memory_bytes"], s["infer_memory_measure"], "missing (no inference run)"),
        ),
        row(f"dead experts (last {DEAD_WINDOW} logs)", _dead),
    ]


def summary_table(summaries: list[dict]):
    """The terminal summary: a rich Table with one column per run."""
    from rich.table import Table

    table = Table(title="Run summary", show_header=len(summaries) > 1)
    table.add_column("")
    for s in summaries:
        table.add_column(s["name"], overflow="fold")
    for label, cells in summary_rows(summaries):
        table.add_row(label, *cells)
    return table


def write_markdown(path: Path, summaries: list[dict], figures: list[str]) -> None:
    """report.md: the summary table, the figures (relative links, so the folder can be shared as is), gaps."""
    names = ", ".join(f"`{s['name']}`" for s in summaries)
    lines = [
        f"# gptoss run report: {names}",
        "",
        f"Written by `gptoss report` on {time.strftime('%Y-%m-%d %H:%M')} from "
        + ", ".join(f"`{s['path']}`" for s in summaries)
        + ".",
        "",
        "## Summary",
        "",
    ]
    rows = summary_rows(summaries)
    lines.append("| | " + " | ".join(s["name"] for s in summaries) + " |")
    lines.append("|---" * (len(summaries) + 1) + "|")
    lines += [f"| {label} | " + " | ".join(c.replace("|", "/") for c in cells) + " |" for label, cells in rows]
    lines += eval_markdown(summaries) + tasks_markdown(summaries)
    for file, title, caption in FIGURES:
        if file in figures:
            lines += ["", f"## {title}", "", caption, "", f"![{title}]({file})"]
    gaps = [(s["name"], m) for s in summaries for m in s["missing"]]
    if gaps:
        lines += ["", "## Missing", ""] + [f"- {name}: {m}" for name, m in gaps]
    warnings = [(s["name"], w) for s in summaries for w in s["warnings"]]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {name}: {w}" for name, w in warnings]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _names(paths: list[Path]) -> list[str]:
    """Run names for legends: the directory name, with its parent when two runs share one."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    return names


def make_report(runs: list[Path], out: Path | None = None, warn: Warn = lambda message: None) -> dict[str, Any]:
    """Read the runs (default: the newest under ./runs), draw the figures and report.md into `out`.

    Returns {"out": dir, "files": [written paths], "runs": [summarize() per run]}.
    """
    from . import figures as plots

    paths = list(runs) or [RunDir.newest().path]
    loaded = [read_run_logs(p, n, warn) for p, n in zip(paths, _names(paths), strict=True)]
    for run in loaded:
        if not run.has_data:
            warn(f"{run.path}: nothing to report yet (no {METRICS}, {TRAIN_MEMORY} or {INFER_MEMORY}); skipped")
    loaded = [run for run in loaded if run.has_data]
    if not loaded:
        raise GptossError(
            f"nothing to report in {', '.join(map(str, paths))}: no {METRICS}, {TRAIN_MEMORY} or "
            f"{INFER_MEMORY}; train first: gptoss train --config tiny --run {paths[0]}"
        )
    out_dir = Path(out) if out is not None else loaded[0].path / "report"
    out_dir.mkdir(parents=True, exist_ok=True)

    summaries = [summarize(run) for run in loaded]
    loads = [(run.name, *expert_shares(run.experts)) for run in loaded]
    draw = {
        "loss.png": lambda p: plots.plot_loss(loaded, p),
        "throughput.png": lambda p: plots.plot_throughput(loaded, p),
        "expert-load.png": lambda p: plots.plot_expert_load(loads, DEAD_WINDOW, p),
        "train-gpu-memory.png": lambda p: plots.plot_memory(loaded, "train", p),
        "inference-gpu-memory.png": lambda p: plots.plot_memory(loaded, "infer", p),
    }
    figures = []
    for file, _, _ in FIGURES:
        target = out_dir / file
        if draw[file](target):
            figures.append(file)
        else:  # a figure from an earlier report would no longer match this report.md
            target.unlink(missing_ok=True)
    write_markdown(out_dir / "report.md", summaries, figures)
    files = [str(out_dir / f) for f in figures] + [str(out_dir / "report.md")]
    return {"out": str(out_dir), "files": files, "runs": summaries}
