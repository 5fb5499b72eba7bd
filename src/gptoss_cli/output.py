"""Where command output goes: rich for people (stderr for chatter), JSON on stdout for machines."""

from __future__ import annotations

import json
import sys
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
