"""RUN/metrics.jsonl as the training loop appends to it: a resumed run's stale lines are cut at its first write.

A run resumed from step N re-logs the steps after N, so their old lines (and a line cut off by a kill)
are dropped. That happens when the first new line is written, not when the run is set up: a resume that
fails before it logs anything (bad weights, an immediate divergence) leaves metrics.jsonl as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from ..atomic import write_atomic


def drop_lines_after(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (and drop unparsable ones), replacing the file atomically; the file
    is streamed, never held whole (a long run's metrics.jsonl has millions of lines)."""
    if not path.is_file():
        return

    def kept():
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        yield line.rstrip("\n") + "\n"
                except (ValueError, AttributeError):
                    continue

    write_atomic(path, kept())


class MetricsFile:
    """A file-like append target (write, flush, close) opened on the first write."""

    def __init__(self, path: Path, cut_after: int | None = None):
        self.path = Path(path)
        self.cut_after = cut_after  # the resumed step, or None for a new run
        self._file: TextIO | None = None

    def write(self, text: str) -> int:
        if self._file is None:
            if self.cut_after is not None:
                drop_lines_after(self.path, self.cut_after)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        return self._file.write(text)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
