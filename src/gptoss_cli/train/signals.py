"""Ctrl-C and SIGTERM during training: a flag the loop reads at its step boundary, and the signal's name
for the exit status (128 + its number) and summary.json."""

from __future__ import annotations

import os
import signal
import sys
import threading

from ..output import console


class StopRequest:
    """Ctrl-C / SIGTERM set a flag: the loop finishes its step, saves, and exits. A second Ctrl-C exits
    130 at once, without saving."""

    def __init__(self, announce: bool):
        self.requested = False
        self.signal: str | None = None  # SIGINT or SIGTERM: the exit status is 128 + its number
        self.announce = announce
        self.step_s: float | None = None  # how long the last step took (set by the loop)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            self._abort()
        self.requested = True
        self.signal = signal.Signals(signum).name
        if self.announce:
            console.print(f"[yellow]stop requested: {self._what_now()} (Ctrl-C again to abort without saving)[/]")

    def _what_now(self) -> str:
        """What the first Ctrl-C waits for, with how long that may take when it is long."""
        if self.step_s is None:
            return "finishing the first step (it can take long on a big model) and saving a checkpoint"
        if self.step_s >= 10:
            return f"finishing this step (steps take about {self.step_s:.0f} s here) and saving a checkpoint"
        return "finishing this step and saving a checkpoint"

    @staticmethod
    def _abort() -> None:
        """The second Ctrl-C: exit 130 now, wherever the main thread is. Raising KeyboardInterrupt instead
        would surface inside whatever runs, e.g. as a RuntimeError out of a module being imported, and
        end as "unexpected error", exit 1. Exiting at once loses nothing a guarantee covers: checkpoints
        are renamed into place whole, a cut last metrics line is skipped by readers, the flock dies with
        the process."""
        console.print("[red]aborted: the step in progress is not saved[/]")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
