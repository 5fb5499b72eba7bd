"""One logging interval of training: loss, accuracy, aux and z losses, tokens/s and expert counts summed
on the device (no extra host syncs), combined over ranks into one metrics.jsonl line."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import distributed


@dataclass
class Position:
    """Where the run is when a window is flushed (the trainer's counters)."""

    step: int
    precision: str  # resolved (never "auto"), so a killed run's report still knows it
    epoch: int  # zero-based index of the epoch in progress
    epochs: float  # passes done, a fraction included
    tokens: int
    elapsed_s: float


class MetricsWindow:
    """Sums over one logging interval (device tensors where possible: no extra host syncs)."""

    def __init__(self, layers: int, experts: int, device: torch.device):
        self.shape = (layers, experts)
        self.device = device
        self.final_loss = None
        self.last_loss, self.last_tps = math.nan, 0.0
        self._reset()

    def _reset(self):
        self.loss = 0.0
        self.n = self.tokens = 0
        self.stats = torch.zeros(3, device=self.device)  # aux, z, accuracy sums over micro-batches
        self.counts = torch.zeros(self.shape, dtype=torch.long, device=self.device)
        self.t0 = time.time()

    def add(self, out, acc, tokens: int) -> None:
        self.stats += torch.stack([out.aux_loss.detach().float(), out.z_loss.detach().float(), acc.detach()])
        self.counts += out.expert_counts
        self.tokens += tokens

    def end_step(self, loss: float, micro: int, lr: float, grad_norm) -> None:
        self.loss += loss * micro
        self.n += micro
        self.lr, self.grad_norm, self.last_loss = lr, grad_norm, loss
        self.last_tps = self.tokens / max(time.time() - self.t0, 1e-9)

    def flush(self, at: Position, dist: distributed.DistInfo) -> dict:
        """The metrics line; aux, z, accuracy and expert counts are combined over ranks (collective)."""
        n = max(self.n, 1)
        distributed.all_reduce(self.stats, dist, op="mean")
        distributed.all_reduce(self.counts, dist)
        aux, z, acc = (self.stats / n).tolist()
        loss = self.loss / n
        self.final_loss = loss
        line = {
            "kind": "train",
            "step": at.step,
            "precision": at.precision,
            "epoch": at.epoch,
            "epochs": at.epochs,
            "loss": loss,
            "aux_loss": aux,
            "z_loss": z,
            "ppl": math.exp(min(loss, 50)),
            "accuracy": acc,
            "lr": self.lr,
            "grad_norm": float(self.grad_norm),
            "tokens_per_s": self.tokens / max(time.time() - self.t0, 1e-9),
            "tokens": at.tokens,
            "elapsed_s": at.elapsed_s,
            "expert_counts": self.counts.tolist(),
        }
        self._reset()
        return line
