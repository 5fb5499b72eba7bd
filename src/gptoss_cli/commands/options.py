"""Options every command shares, declared once so they read (and alias) the same everywhere.

--config/-c NAME|PATH    a shipped config name or a YAML file
--set/-s SECTION.KEY=V   one override, repeatable
--run/--run-dir/-r DIR   the run directory (torchrun takes --run itself, so under torchrun write --run-dir)
--checkpoint/--model C   a checkpoint directory, its model.safetensors, or a run (its newest checkpoint)
--device auto|cpu|cuda   --dtype auto|fp32|bf16
--json                   one JSON object on stdout (JsonOpt), or one per result, JSON Lines (JsonLinesOpt)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

ConfigOpt = Annotated[
    str, typer.Option("--config", "-c", help="Config name (compact, tiny, gpt-oss-20b, ...) or a YAML path.")
]
OptionalConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="Config name (compact, tiny, gpt-oss-20b, ...) or a YAML path.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override one key, e.g. --set train.lr=3e-4 (repeatable).", metavar="SECTION.KEY=VALUE"
    ),
]
RUN_FLAGS = ("--run", "--run-dir", "-r")
RunOpt = Annotated[
    Path | None,
    typer.Option(
        *RUN_FLAGS,
        help="Run directory (default: a new one, or the newest, under ./runs). Under torchrun write "
        "--run-dir or -r: torchrun takes --run for its --run-path.",
    ),
]
ReadRunOpt = Annotated[
    Path | None,
    typer.Option(
        *RUN_FLAGS, help="The run to read (its newest complete checkpoint; default: the newest run under ./runs)."
    ),
]
RunsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        *RUN_FLAGS, metavar="DIR", help="Run directory (default: the newest under ./runs); repeat to compare."
    ),
]
NewRunOpt = Annotated[Path, typer.Option(*RUN_FLAGS, help="The run directory to create (must not exist, or be empty).")]
CheckpointsOpt = Annotated[
    list[Path] | None,
    typer.Option("--checkpoint", metavar="DIR", help="A checkpoint directory (RUN/checkpoints/step-N); repeatable."),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint", "--model", help="A checkpoint directory, its model.safetensors, or a run (newest checkpoint)."
    ),
]
DeviceOpt = Annotated[Literal["auto", "cpu", "cuda"], typer.Option("--device", help="Where to compute.")]
DtypeOpt = Annotated[
    Literal["auto", "fp32", "bf16"],
    typer.Option(
        "--dtype", help="auto: bf16 on a GPU that computes it natively, else fp32 (norms and router stay fp32)."
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads for torch (default: the free physical cores, or OMP_NUM_THREADS; never more).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
JsonLinesOpt = Annotated[
    bool, typer.Option("--json", help="One JSON object per result (JSON Lines) on stdout instead of text.")
]

# The sampling options of infer and chat (each None = the run's infer section).
TokensOpt = Annotated[
    int | None,
    typer.Option(
        "--max-new-tokens", "--max-tokens", "-n", help="Tokens to generate (default: the run's infer.max_new_tokens)."
    ),
]
TemperatureOpt = Annotated[float | None, typer.Option("--temperature", "-t", help="0 means greedy.")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Sample among the k most likely tokens (0 = off).")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus: the smallest set with this mass (1 = off).")]
PenaltyOpt = Annotated[float | None, typer.Option("--repetition-penalty", help="> 1 discourages repeated tokens.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Same seed, same text.")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this string (repeatable); not printed.")]
CompileOpt = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="Compile the decode step (CUDA graphs on CUDA): a one-time compile for faster steps. "
        "Default: compiled for generations of 2048 steps or more (-n); infer's summary line says which ran.",
        show_default=False,
    ),
]
