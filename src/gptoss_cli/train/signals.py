"""Ctrl-C and SIGTERM during training: a flag the loop reads at its step boundary, and the signal's name
for the exit status (128 + its number) and summary.json."""

from __future__ import annotations

import signal
import threading

from ..output import console


class StopRequest:
    """Ctrl-C / SIGTERM set a flag: the loop finishes its step, saves, and exits. A second Ctrl-C aborts."""

    def __init__(self, announce: bool):
        self.requested = False
        self.signal: str | None = None  # SIGINT or SIGTERM: the exit status is 128 + its number
        self.announce = announce
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signal.Signals(signum).name
        if self.announce:
            console.print(
                "[yellow]stop requested: finishing this step and saving a checkpoint "
                "(Ctrl-C again to abort without saving)[/]"
            )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
