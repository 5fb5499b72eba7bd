"""Tokenizing prepare's chunks: in the main process or in worker processes that end with their parent.

Each worker holds one single-threaded tokenizer (the workers are the parallelism) and a thread that ends
the worker once its parent is gone, however the parent ended (`kill -9` included): a worker would otherwise
wait forever for work that never comes. The other way round, SIGTERM to the parent unwinds it like Ctrl-C
(sigterm_unwinds), so it shuts its pool down instead of dying with the pool's semaphores leaked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import numpy as np

_WORKER_TOKENIZER = None


def init_worker(tok_json: str, parent: int) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(tok_json)


def _exit_with(parent: int) -> None:
    """End this worker once its parent is gone (killed with -9, say): it would otherwise wait forever."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def encode(
    pieces: list[str], val: list[bool], last: list[bool], eos: int, dtype: str, tok=None
) -> tuple[np.ndarray, np.ndarray]:
    """A chunk of pieces -> (train ids, val ids), each document (its last piece) followed by <|endoftext|>."""
    tok = tok or _WORKER_TOKENIZER
    batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster where available
    out: tuple[list[int], list[int]] = ([], [])
    for enc, is_val, ends in zip(batch(pieces), val, last, strict=True):
        ids = out[is_val]
        ids.extend(enc.ids)
        if ends:
            ids.append(eos)
    return np.array(out[0], dtype=dtype), np.array(out[1], dtype=dtype)


@contextlib.contextmanager
def sigterm_unwinds():
    """SIGTERM (kill, a scheduler's stop) unwinds like Ctrl-C, so the worker pool is shut down and the
    finished shards stay named in progress.json; the process then exits 143. Without it the process dies
    on the spot and multiprocessing warns about the pool's semaphores it leaked."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        from ..output import console

        console.print("prepare stopped (SIGTERM): finished shards are kept; the same command continues it")
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
