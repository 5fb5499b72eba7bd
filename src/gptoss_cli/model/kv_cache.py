"""Key/value cache for generation: a ring of `sliding_window` slots on sliding layers, a preallocated
buffer on full-attention layers.

Keys are stored after RoPE, together with the absolute position of every slot (-1 = empty), and the
attention mask is built from those positions, so the ring's order never matters. A sliding layer attends
over [ring, new chunk] before the chunk's last W entries overwrite the oldest slots: a prefill longer
than the window stays exact. The write index is a Python counter, so a decode step needs no host sync.

Every cache implements KVCacheProtocol, which is all Transformer.forward asks of one: this module's
KVCache (generation) and StaticKVCache (a compiled decode step), and the server's slot cache
(serve/slots.py, one slot per request).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .config import ModelConfig


@runtime_checkable
class KVCacheProtocol(Protocol):
    """What the model needs of a key/value cache, called in this order by every forward:

    positions(b, t, device)  (B, T) positions of a chunk when the caller gives none (those after the cache)
    begin(positions)         record the chunk's (B, T) positions before the layers run; returns the key
                             positions full layers (B, S_full) and sliding layers (B, S_ring) attend over
    update(layer, k, v)      store the chunk's (B, T, NKV, D) keys and values (after RoPE); returns the keys
                             and values this layer attends over, (B, S, NKV, D), in begin()'s key order
    """

    def positions(self, batch: int, t: int, device: torch.device) -> torch.Tensor: ...

    def begin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class KVCache:
    def __init__(
        self, config: ModelConfig, batch_size: int, max_length: int, dtype: torch.dtype, device: torch.device | str
    ):
        self.config = config
        self.max_length = max_length
        self.length = 0  # tokens written so far, per sequence
        self.window = config.sliding_window
        b, nkv, d = batch_size, config.num_key_value_heads, config.head_dim
        ring = min(self.window, max_length) if self.window else 0
        self.k, self.v = [], []
        for layer in range(config.num_hidden_layers):
            slots = ring if config.is_sliding(layer) else max_length
            self.k.append(torch.zeros(b, slots, nkv, d, dtype=dtype, device=device))
            self.v.append(torch.zeros(b, slots, nkv, d, dtype=dtype, device=device))
        self.pos_full = torch.full((b, max_length), -1, dtype=torch.long, device=device)
        self.pos_ring = torch.full((b, ring), -1, dtype=torch.long, device=device)
        self._start = 0
        self._t = 0
        self._ring_src = self._ring_dst = None

    def positions(self, batch: int, t: int, device: torch.device) -> torch.Tensor:
        """Every row continues at the cache's length: (B, T) = length .. length+T-1."""
        return torch.arange(self.length, self.length + t, device=device).expand(batch, t)

    def begin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record a chunk's positions (B, T) before the layers run.

        Returns the key positions full layers attend over (B, length+T) and those sliding layers attend
        over (B, ring+T). Raises ValueError when the chunk does not fit in max_length.
        """
        t = positions.shape[1]
        if self.length + t > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; {self.length}+{t} do not fit")
        self._start, self._t = self.length, t
        self.pos_full[:, self.length : self.length + t] = positions
        kpos_full = self.pos_full[:, : self.length + t]
        kpos_ring = torch.cat([self.pos_ring, positions], dim=1)
        ring = self.pos_ring.shape[1]
        if ring:
            keep = min(t, ring)  # only the chunk's last `ring` tokens survive in the ring
            steps = torch.arange(self.length + t - keep, self.length + t, device=positions.device)
            self._ring_src = slice(t - keep, t)
            self._ring_dst = steps % ring
            self.pos_ring[:, self._ring_dst] = positions[:, self._ring_src]
        self.length += t
        return kpos_full, kpos_ring

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, T, NKV, D) of the current chunk -> the keys and values this layer attends over."""
        if self.config.is_sliding(layer):
            k_all = torch.cat([self.k[layer], k], dim=1)  # (B, ring+T, NKV, D), read before overwriting
            v_all = torch.cat([self.v[layer], v], dim=1)
            self.k[layer][:, self._ring_dst] = k[:, self._ring_src]
            self.v[layer][:, self._ring_dst] = v[:, self._ring_src]
            return k_all, v_all
        end = self._start + self._t
        self.k[layer][:, self._start : end] = k
        self.v[layer][:, self._start : end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]


class StaticKVCache(KVCache):
    """The same cache with fixed shapes and a device-side write index, for a compiled decode step.

    Full layers attend over their whole preallocated buffer (empty slots hold position -1 and are
    masked), slots are written with `index_copy_` at indices computed on the device, and nothing that a
    forward reads changes on the Python side between steps. A decode step (T = 1) therefore has the same
    shapes and the same Python state every time: torch.compile traces it once and, on CUDA, can replay it
    as a CUDA graph. Outputs equal KVCache's; eager decoding is a little slower (every step reads all
    `max_length` slots), so generate() uses it only when asked to compile.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, max_length: int, dtype: torch.dtype, device: torch.device | str
    ):
        super().__init__(config, batch_size, max_length, dtype, device)
        self.index = torch.zeros((), dtype=torch.long, device=device)  # tokens written, on the device
        self._slots = None

    def reset(self) -> None:
        """Empty the cache for a new generation of the same shape. Its tensors stay the same objects (a
        compiled step keeps using them); stale keys and values are masked by their -1 positions."""
        self.length = 0
        self.index.zero_()
        self.pos_full.fill_(-1)
        self.pos_ring.fill_(-1)

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor a step mutates (to mark as static addresses for CUDA graphs)."""
        return [*self.k, *self.v, self.pos_full, self.pos_ring, self.index]

    def begin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = positions.shape[1]
        if not torch.compiler.is_compiling():  # the Python-side bound check stays out of the graph
            if self.length + t > self.max_length:
                raise ValueError(f"KV cache holds {self.max_length} tokens; {self.length}+{t} do not fit")
            self.length += t
        self._slots = self.index + torch.arange(t, device=positions.device)  # (T,) slots of this chunk
        self.pos_full.index_copy_(1, self._slots, positions)
        kpos_ring = torch.cat([self.pos_ring, positions], dim=1)
        ring = self.pos_ring.shape[1]
        if ring:
            keep = min(t, ring)  # from the shape: the same on every decode step
            self._ring_src = slice(t - keep, t)
            self._ring_dst = self._slots[t - keep :] % ring
            self.pos_ring.index_copy_(1, self._ring_dst, positions[:, self._ring_src])
        self.index += t
        return self.pos_full, kpos_ring

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.is_sliding(layer):
            k_all = torch.cat([self.k[layer], k], dim=1)  # read before overwriting
            v_all = torch.cat([self.v[layer], v], dim=1)
            self.k[layer].index_copy_(1, self._ring_dst, k[:, self._ring_src])
            self.v[layer].index_copy_(1, self._ring_dst, v[:, self._ring_src])
            return k_all, v_all
        self.k[layer].index_copy_(1, self._slots, k)
        self.v[layer].index_copy_(1, self._slots, v)
        return self.k[layer], self.v[layer]
