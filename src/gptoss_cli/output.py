"""Where command output goes: rich for people (stderr for chatter), JSON on stdout for machines."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from typing import Any

from rich.console import Console

# Everything a person reads (tables, progress, log lines, warnings) goes to stderr, so stdout carries only
# what a program reads: --json objects and generated text. Long lines are not re-wrapped.
console = Console(stderr=True, soft_wrap=True)


def report_console() -> Console:
    """stdout, for a command whose product is a report a person reads (`gptoss env > env.txt` keeps it)."""
    return Console(soft_wrap=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}", highlight=False)


def byte_progress(show: bool):
    """A transient progress bar of bytes read (size, MB/s, time left) on the console; a null context when
    `show` is false (under --json, or when stderr is not a terminal)."""
    if not show:
        return nullcontext(None)
    from rich import progress as rp

    return rp.Progress(
        rp.TextColumn("{task.description}"),
        rp.BarColumn(),
        rp.DownloadColumn(),
        rp.TransferSpeedColumn(),
        rp.TimeRemainingColumn(),
        console=console,
        transient=True,
    )
