"""Tokenizing prepare's chunks: in the main process or in worker processes that end with their parent.

Each worker holds one single-threaded tokenizer (the workers are the parallelism) and a thread that ends
the worker once its parent is gone, however the parent ended (`kill -9` included): a worker would otherwise
wait forever for work that never comes.
"""

from __future__ import annotations

import os
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
