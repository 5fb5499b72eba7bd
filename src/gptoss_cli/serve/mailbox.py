"""Events from the decode thread to the HTTP event loop, handed over in batches.

The decode thread emits one event per request and token: at 16 requests, 16 events per step. Handing each
over with its own `loop.call_soon_threadsafe` costs a write to the loop's wake-up socket per event (a
system call on the decode thread, a wake-up of the loop), which took a sixth of the decode thread's time
at 16 streaming clients (docs/performance.md). Here an event joins a list, and only the first event of a
batch schedules a delivery: the loop then puts every event that has arrived by then into its request's
asyncio queue, in order, in one callback.
"""

from __future__ import annotations

import asyncio
import threading


class Mailbox:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, object]] = []

    def post(self, queue: asyncio.Queue, item: object) -> None:
        """From any thread: `item` will be put into `queue` on the loop (dropped if the loop is closed)."""
        with self._lock:
            self._pending.append((queue, item))
            if len(self._pending) > 1:  # a delivery is already scheduled and will take this one too
                return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is gone (shutdown): nobody to tell
            with self._lock:
                self._pending.clear()

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)
