"""Token batches: documents -> one cached token stream -> fixed-length training samples.

Documents are joined into one token stream with `<|endoftext|>` after each. Training samples are the
non-overlapping windows stream[i*T : i*T + T + 1] (inputs and next-token targets), visited in an order
that is a pure function of (seed, epoch), so a data position (epoch, batch) is all resume needs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..run.atomic import umask_mode
from .tokenizer import EOS


def _cache_dir() -> Path:
    root = os.environ.get("GPTOSS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gptoss")
    return Path(root) / "tokens"


def tokenize_stream(docs: list[str], tokenizer, tok_hash: str) -> torch.Tensor:
    """Documents -> one int32 stream, each followed by <|endoftext|>. Cached by content and tokenizer."""
    h = hashlib.sha256(tok_hash.encode())
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8")).digest())
    path = _cache_dir() / f"{h.hexdigest()[:32]}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["tokens"]
        except Exception:  # a damaged cache entry is rebuilt below
            pass
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.int32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"tokens": stream}, str(tmp))
        umask_mode(tmp)  # safetensors creates 0600 files
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old entry or the new one
    except OSError:
        pass  # the cache is an optimisation; a read-only home must not stop training
    return stream


@dataclass
class TokenBatches:
    """Fixed-length samples from a token stream, in a per-epoch order derived from (seed, epoch)."""

    stream: torch.Tensor  # (N,) int32
    seq_len: int
    batch_size: int
    seed: int

    @property
    def num_samples(self) -> int:
        return max(0, (self.stream.numel() - 1) // self.seq_len)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def batch(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` of `epoch` -> inputs, targets (B/world, T) int64; rank takes its slice."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_samples, generator=g)
        picks = order[index * self.batch_size:(index + 1) * self.batch_size]
        per_rank = self.batch_size // world
        picks = picks[rank * per_rank:(rank + 1) * per_rank]
        return self._gather(picks)

    def _gather(self, picks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = picks * self.seq_len
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None]  # (B, T+1)
        rows = self.stream[idx].long()
        return rows[:, :-1], rows[:, 1:]

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first n batches in stream order (fixed, so validation losses compare across steps)."""
        total = min(n, max(1, -(-self.num_samples // self.batch_size)))
        return [self._gather(torch.arange(i * self.batch_size, min((i + 1) * self.batch_size, self.num_samples)))
                for i in range(total) if i * self.batch_size < self.num_samples]
