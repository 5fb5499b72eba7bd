"""A key/value cache with one slot per running request, for the server's continuous batching.

Same layout as model/kv_cache.py's KVCache (keys after RoPE, a ring of `sliding_window` slots on sliding
layers, a buffer on full-attention layers, the absolute position of every slot with -1 = empty), but each
batch row is a request with its own length. A forward covers a contiguous range of rows: `select` gives
the SlotRows the model takes as its cache. A row's tokens sit at full-layer index = their position and
at ring index = position % ring, so rows of different lengths decode together in one (R, 1) forward and
the mask (built from positions) keeps each row to its own keys. The engine keeps the decoding rows
packed at 0..R-1 (`move` fills a finished request's slot with the last row), so a step reads a slice,
never a gather.

Several prompts of different lengths are prefilled in one (R, T) forward as right-padded rows: a padding
token has position -1, is never written (only real tokens are, with index_put_), and as a key it is
invisible (-1 = empty); as a query it sees nothing but the sink, and its output is thrown away.
"""

from __future__ import annotations

import torch

from ..model import ModelConfig


class SlotKVCache:
    def __init__(
        self, config: ModelConfig, slots: int, max_length: int, dtype: torch.dtype, device: torch.device | str
    ):
        self.config = config
        self.slots, self.max_length = slots, max_length
        self.window = config.sliding_window
        ring = min(self.window, max_length) if self.window else 0
        nkv, d = config.num_key_value_heads, config.head_dim
        self.k, self.v = [], []
        for layer in range(config.num_hidden_layers):
            length = ring if config.is_sliding(layer) else max_length
            self.k.append(torch.zeros(slots, length, nkv, d, dtype=dtype, device=device))
            self.v.append(torch.zeros(slots, length, nkv, d, dtype=dtype, device=device))
        self.pos_full = torch.full((slots, max_length), -1, dtype=torch.long, device=device)
        self.pos_ring = torch.full((slots, ring), -1, dtype=torch.long, device=device)

    def select(self, start: int, stop: int, end: int, padded: bool = False) -> SlotRows:
        """The cache a forward over rows start..stop-1 takes; `end` = 1 + the largest position it writes.
        `padded`: some rows end in padding (position -1)."""
        if end > self.max_length:
            raise ValueError(f"KV cache slots hold {self.max_length} tokens; position {end - 1} does not fit")
        return SlotRows(self, slice(start, stop), end, padded)

    def reset(self, slot: int) -> None:
        """Empty one slot for a new request: stale keys are masked by their -1 positions."""
        self.pos_full[slot].fill_(-1)
        self.pos_ring[slot].fill_(-1)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src (its first `length` positions) into slot dst, to keep the running rows packed."""
        for layer in range(len(self.k)):
            n = self.k[layer].shape[1] if self.config.is_sliding(layer) else length
            self.k[layer][dst, :n] = self.k[layer][src, :n]
            self.v[layer][dst, :n] = self.v[layer][src, :n]
        self.pos_full[dst] = self.pos_full[src]
        self.pos_ring[dst] = self.pos_ring[src]


class SlotRows:
    """Rows start..stop-1 of a SlotKVCache for one forward: the model's KVCacheProtocol (model/kv_cache.py).

    A new object per forward, rather than the selection stored on the cache, so that a compiled decode
    step (serve/compiled.py) can take the row count and the length as symbolic sizes: nothing it creates
    outlives the graph, and no attribute of a long-lived object changes inside it (which would specialise
    the graph to one row count and length)."""

    def __init__(self, cache: SlotKVCache, rows: slice, end: int, padded: bool):
        self.config, self.cache = cache.config, cache
        self._rows, self._end, self._padded = rows, end, padded
        # padded rows: (row, column) in the chunk of the tokens written, and (row, index) where they go
        self._full_at = self._ring_at = self._full_put = self._ring_put = None
        self._positions = self._ring_dst = None
        self._ring_src = slice(0, 0)

    def positions(self, batch: int, t: int, device: torch.device) -> torch.Tensor:
        raise ValueError("every slot has its own positions: pass them to the model")

    def begin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (R, T) of the selected rows, consecutive within a row -> the key positions that full
        layers (R, end) and sliding layers (R, ring+T) attend over. Called by the model before its layers."""
        t = positions.shape[1]
        self._positions = positions
        pos_full = self.cache.pos_full[self._rows]  # a view: scatter_ writes into the cache
        pos_ring = self.cache.pos_ring[self._rows]
        # Read before the chunk overwrites the ring. Ring keys at the chunk's own positions or later are stale,
        # left by a forward that failed part-way (the engine then runs each row again alone): seen next to
        # the chunk's keys they would count twice, so they are hidden (-1).
        stale = pos_ring >= positions[:, :1]
        kpos_ring = torch.cat([pos_ring.masked_fill(stale, -1), positions], dim=1)
        ring = pos_ring.shape[1]
        if self._padded:
            self._begin_padded(positions, pos_full, pos_ring)
            return pos_full[:, : self._end], kpos_ring
        pos_full.scatter_(1, positions, positions)
        if ring:
            keep = min(t, ring)  # only a row's last `ring` tokens survive in its ring
            self._ring_src = slice(t - keep, t)
            self._ring_dst = positions[:, self._ring_src] % ring  # (R, keep), distinct within a row
            pos_ring.scatter_(1, self._ring_dst, positions[:, self._ring_src])
        return pos_full[:, : self._end], kpos_ring

    def _begin_padded(self, positions: torch.Tensor, pos_full: torch.Tensor, pos_ring: torch.Tensor) -> None:
        """begin() for right-padded rows: (row, column) of each real token, and of the last `ring` real tokens
        of each row for the ring, so that only those are written (index_put_), padding nowhere."""
        real = positions >= 0  # (R, T)
        at = real.nonzero(as_tuple=True)
        self._full_at, self._full_put = at, (at[0], positions[at])
        pos_full.index_put_(self._full_put, positions[at])
        ring = pos_ring.shape[1]
        if ring:
            last = positions.max(dim=1, keepdim=True).values  # (R, 1) a row's last real position
            at = (real & (positions > last - ring)).nonzero(as_tuple=True)  # distinct ring indices per row
            self._ring_at, self._ring_put = at, (at[0], positions[at] % ring)
            pos_ring.index_put_(self._ring_put, positions[at])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (R, T, NKV, D) of the current chunk -> the keys and values this layer attends over."""
        kc, vc = self.cache.k[layer][self._rows], self.cache.v[layer][self._rows]
        if self._padded:
            sliding = self.config.is_sliding(layer)
            if sliding:
                k_all, v_all = torch.cat([kc, k], dim=1), torch.cat([vc, v], dim=1)  # read before overwriting
            at, dst = (self._ring_at, self._ring_put) if sliding else (self._full_at, self._full_put)
            kc.index_put_(dst, k[at])
            vc.index_put_(dst, v[at])
            return (k_all, v_all) if sliding else (kc[:, : self._end], vc[:, : self._end])
        if self.config.is_sliding(layer):
            k_all = torch.cat([kc, k], dim=1)  # (R, ring+T, NKV, D), read before overwriting
            v_all = torch.cat([vc, v], dim=1)
            index = self._ring_dst[:, :, None, None].expand(-1, -1, k.shape[2], k.shape[3])
            kc.scatter_(1, index, k[:, self._ring_src])
            vc.scatter_(1, index, v[:, self._ring_src])
            return k_all, v_all
        index = self._positions[:, :, None, None].expand(-1, -1, k.shape[2], k.shape[3])
        kc.scatter_(1, index, k)
        vc.scatter_(1, index, v)
        return kc[:, : self._end], vc[:, : self._end]
