"""Options every command shares, so `--config`, `--set`, `--run` and `--json` read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[
    str, typer.Option("--config", "-c", help="Config name (compact, tiny, gpt-oss-20b, ...) or a YAML path.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key, e.g. --set train.lr=3e-4 (repeatable).",
                 metavar="SECTION.KEY=VALUE"),
]
RunOpt = Annotated[
    Path | None, typer.Option("--run", "--run-dir", "-r",
                              help="Run directory (default: a new one, or the newest, under ./runs). Under "
                                   "torchrun write --run-dir or -r: torchrun takes --run for its --run-path.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
