"""Progress off a terminal: plain lines at the start, every so often, and at the end (progress.py)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from gptoss_cli.progress import PlainProgress, progress


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_a_terminal_gets_rich_bars_and_anything_else_plain_lines():
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(progress(console=terminal), Progress)
    console, _ = plain_console()
    assert isinstance(progress(console=console), PlainProgress)
    assert isinstance(progress(console=console, disable=True), Progress)  # disabled: rich's no-op bar


def test_plain_lines_say_what_is_done_with_rate_info_and_time_left():
    console, out = plain_console()
    bar = PlainProgress(console, unit="steps", every_s=0.0)
    task = bar.add_task("training", total=4, info="")
    bar.update(task, completed=1, info="loss 4.500")
    bar.update(task, completed=4, info="loss 4.100")
    lines = out.getvalue().splitlines()
    assert lines[0] == "training: started"
    assert lines[1].startswith("training: 1/4 steps (25%), loss 4.500; ") and "s left" in lines[1]
    assert lines[2].startswith("training: done, 4/4 steps (100%), loss 4.100; ")


def test_lines_are_rate_limited_and_bytes_read_as_megabytes():
    console, out = plain_console()
    bar = PlainProgress(console, unit="B", every_s=3600.0)
    task = bar.add_task("tokenizing", total=3e6)
    for _ in range(5):
        bar.advance(task, 1e5)  # well before the hour: nothing more is said
    assert out.getvalue().splitlines() == ["tokenizing: started"]
    bar.update(task, completed=3e6)
    assert out.getvalue().splitlines()[-1].startswith("tokenizing: done, 3.0 of 3.0 MB (100%); ")
