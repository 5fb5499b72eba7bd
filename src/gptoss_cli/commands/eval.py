"""`gptoss eval`: loss, perplexity, bits per byte and top-1 accuracy of runs on any text, side by side."""

from __future__ import annotations

import sys
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
) -> None:
    """Score runs on a text: mean loss, perplexity, bits per byte (comparable across tokenizers) and top-1
    accuracy. Results go to RUN/eval/ for gptoss report.

    Example: gptoss eval --run runs/demo --data held-out.txt
    """
    import json as jsonlib

    from ..evaluate.evaluator import Target, evaluate
    from ..evaluate.view import EvalProgress, results_table
    from ..output import console, warn
    from ..threads import set_threads

    set_threads(threads)
    targets = [Target(run=r) for r in run or []] + [Target(checkpoint=c) for c in checkpoint or []]
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
