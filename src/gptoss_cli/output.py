"""Where command output goes: rich for people (stderr for chatter), JSON on stdout for machines."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

console = Console(soft_wrap=True)  # human-readable results; long lines are not re-wrapped
err_console = Console(stderr=True, soft_wrap=True)  # progress, warnings, errors: keeps stdout pipeable


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False)
