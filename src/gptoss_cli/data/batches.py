"""Token batches drawn from memory-mapped shards: fixed-length training samples in a seeded order.

The shards of a split are one token stream. Sample i is the window stream[i*T : i*T + T + 1] (inputs
and next-token targets). Epoch e visits every sample once, in the order of a bijection of [0, N) keyed
by (seed, epoch): a 4-round Feistel network on the next power of four, cycle-walked into range. So the
sample at any (epoch, position) costs O(1) to find, a batch costs O(batch) whatever the corpus size,
resume needs only (epoch, batch index), and each rank computes and reads only its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser on a Python int (round keys)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _round(r: np.ndarray, key: np.uint64) -> np.ndarray:
    """The Feistel round function: splitmix64 of (r xor key), element-wise on uint64 (wrapping)."""
    z = (r ^ key) * np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(31)
    z *= np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(29))


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """positions (k,) in [0, n) -> their sample indices under epoch's bijection of [0, n)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64(_mix64((seed & _M64) * 0x100000001B3 + epoch * 4 + r)) for r in range(4)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for key in keys:
            left, right = right, left ^ (_round(right, key) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(positions.astype(np.uint64))
    outside = out >= np.uint64(n)
    while outside.any():  # cycle walking: follow the permutation until it lands in range (< 4 rounds on average)
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


class TokenBatches:
    """Fixed-length samples of a token stream held as shards (memory-mapped arrays)."""

    def __init__(self, arrays: Sequence[np.ndarray], seq_len: int, batch_size: int, seed: int):
        self.arrays = [a for a in arrays if a.size]
        self.offsets = np.cumsum([0] + [a.size for a in self.arrays])  # (shards + 1,) stream start of each
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_samples(self) -> int:
        return max(0, (self.tokens - 1) // self.seq_len)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def batch(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` of `epoch` -> inputs, targets (B/world, T) int64; rank takes its slice."""
        per_rank = self.batch_size // world
        positions = index * self.batch_size + rank * per_rank + np.arange(per_rank)
        return self._gather(permute(positions, self.num_samples, self.seed, epoch))

    def _window(self, start: int, length: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        local = start - int(self.offsets[shard])
        piece = self.arrays[shard][local : local + length]
        if piece.size == length:
            return piece
        parts = [piece]  # the window runs on into the next shard(s)
        while sum(p.size for p in parts) < length:
            shard += 1
            parts.append(self.arrays[shard][: length - sum(p.size for p in parts)])
        return np.concatenate(parts)

    def _gather(self, picks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((len(picks), self.seq_len + 1), dtype=np.int64)  # (B, T+1)
        for row, pick in enumerate(picks.tolist()):
            rows[row] = self._window(pick * self.seq_len, self.seq_len + 1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """n batches of samples spread evenly over the split, the same at every evaluation."""
        want = min(n * self.batch_size, self.num_samples)
        picks = (np.arange(want, dtype=np.int64) * self.num_samples) // max(want, 1)
        return [self._gather(picks[i : i + self.batch_size]) for i in range(0, want, self.batch_size)]
