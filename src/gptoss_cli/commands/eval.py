"""`gptoss eval`: loss, perplexity, bits per byte and top-1 accuracy of runs on any text, side by side; or,
with --tasks, lm-evaluation-harness tasks (HellaSwag, ARC, MMLU, tasks of your own) on the same runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .options import CheckpointsOpt, DeviceOpt, DtypeOpt, JsonLinesOpt, RunsOpt, ThreadsOpt

DataOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        "-d",
        metavar="PATH",
        help="Text to score: a .txt or .jsonl file, a directory or a glob, read as data.paths is; repeatable.",
    ),
]
MaxTokensOpt = Annotated[
    int | None,
    typer.Option(
        "--max-tokens",
        "-n",
        help="Score at most this many tokens (counted with the first model's tokenizer; "
        "every model scores the same text).",
    ),
]
ContextOpt = Annotated[
    int | None, typer.Option("--context", help="Window length in tokens (default: the run's train.seq_len).")
]
StrideOpt = Annotated[
    int | None,
    typer.Option(
        "--stride",
        help="Tokens a window advances; each token is scored once with at least context - stride "
        "tokens before it (default: half the context; = context for non-overlapping windows).",
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Windows per forward.")]
NoSaveOpt = Annotated[bool, typer.Option("--no-save", help="Do not write RUN/eval/*.json.")]
TasksOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--tasks",
        metavar="NAMES",
        help="lm-evaluation-harness tasks instead of --data, comma-separated or repeated "
        "(hellaswag,arc_easy,mmlu, or your own); needs the eval extra.",
    ),
]
IncludePathOpt = Annotated[
    Path | None, typer.Option("--include-path", metavar="DIR", help="A folder of task YAML files of your own.")
]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", help="At most this many documents per task (a quick, partial score).")
]
FewShotOpt = Annotated[
    int | None, typer.Option("--num-fewshot", help="Solved examples before each question (default: the task's own).")
]
LogSamplesOpt = Annotated[
    bool, typer.Option("--log-samples", help="Also save every document's requests and answers (samples_TASK.jsonl).")
]


def command(
    run: RunsOpt = None,
    checkpoint: CheckpointsOpt = None,
    data: DataOpt = None,
    max_tokens: MaxTokensOpt = None,
    context: ContextOpt = None,
    stride: StrideOpt = None,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    no_save: NoSaveOpt = False,
    threads: ThreadsOpt = None,
    json: JsonLinesOpt = False,
    tasks: TasksOpt = None,
    include_path: IncludePathOpt = None,
    limit: LimitOpt = None,
    num_fewshot: FewShotOpt = None,
    log_samples: LogSamplesOpt = False,
) -> None:
    """Score runs on a text: mean loss, perplexity, bits per byte (comparable across tokenizers) and top-1
    accuracy; or run lm-evaluation-harness tasks on them (--tasks). Results go to RUN/eval/ for gptoss report.

    Example: gptoss eval --run runs/demo --data held-out.txt
    Example: gptoss eval --run runs/demo --tasks hellaswag,arc_easy --limit 100
    """
    from ..evaluate.evaluator import Target
    from ..threads import set_threads

    set_threads(threads)
    targets = [Target(run=r) for r in run or []] + [Target(checkpoint=c) for c in checkpoint or []]
    text_options = {"--data": data, "--max-tokens": max_tokens, "--context": context, "--stride": stride}
    task_options = {"--include-path": include_path, "--limit": limit, "--num-fewshot": num_fewshot}
    if tasks:
        _refuse(text_options, "to scoring a text (--data), not to --tasks")
        _run_tasks(
            targets, tasks, include_path, limit, num_fewshot, log_samples, batch_size, device, dtype, no_save, json
        )
        return
    _refuse({**task_options, "--log-samples": log_samples or None}, "with --tasks")
    import json as jsonlib

    from ..evaluate.evaluator import evaluate
    from ..evaluate.view import EvalProgress, results_table
    from ..output import console, warn

    with EvalProgress(console) as progress:
        results = evaluate(
            targets,
            data or [],
            max_tokens=max_tokens,
            context=context,
            stride=stride,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            progress=progress.callbacks,
            save=not no_save,
            warn=warn,
        )
    if json:
        for r in results:
            sys.stdout.write(jsonlib.dumps(r) + "\n")
        sys.stdout.flush()
    console.print(results_table(results))
    for r in results:
        if r.get("saved"):
            console.print(f"saved {r['saved']}", highlight=False, soft_wrap=True)


def _refuse(given: dict, where: str) -> None:
    """Options of the other mode are an error, not silently ignored."""
    from ..errors import GptossError

    used = [flag for flag, value in given.items() if value is not None and value is not False]
    if used:
        raise GptossError(f"{', '.join(used)} {'apply' if len(used) > 1 else 'applies'} only {where}")


def _run_tasks(targets, tasks, include_path, limit, num_fewshot, log_samples, batch_size, device, dtype, no_save, json):
    """--tasks: lm-eval's tasks on every run, one results table; lm-eval's results JSON per run with --json."""
    import json as jsonlib

    from ..evaluate.harness import run_tasks
    from ..evaluate.view import EvalProgress, tasks_table
    from ..output import console, warn

    with EvalProgress(console, unit="requests") as progress:
        results = run_tasks(
            targets,
            tasks,
            include_path=include_path,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            log_samples=log_samples,
            progress=progress.callbacks,
            save=not no_save,
            warn=warn,
        )
    if json:
        for r in results:
            sys.stdout.write(jsonlib.dumps({k: v for k, v in r.items() if k != "samples"}, default=str) + "\n")
        sys.stdout.flush()
    console.print(tasks_table(results))
    for r in results:
        if r["gptoss"].get("saved"):
            console.print(f"saved {r['gptoss']['saved']}", highlight=False, soft_wrap=True)
