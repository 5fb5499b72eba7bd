"""Per-token log-probabilities of token sequences, batched: what `gptoss eval --tasks` scores with.

    score_tokens(model, rows, ...)   rows of (tokens, n) -> for each row, log p(t_i | t_<i) of its last n
                                     tokens and whether each was the model's top-1 choice

A row's input is tokens[:-1] and its last n tokens are the targets, so each target is predicted from every
token before it in the row (the caller cuts a row to the model's context, as lm-evaluation-harness does:
the last max_length + 1 tokens). Rows are sorted longest first and batched with right padding (a causal
model's real tokens never see the pads after them); the logits are computed only at the n target
positions of each row (the model's `logits_at`), so a long context costs no (T, V) logits, and a batch
holds at most `max_logits` of them (B x K x V: rolling windows score every position, and K x V fp32 logits
of a 4,096-token window over a 201,088-token vocabulary are 3.3 GB). The log-probabilities are
infer/logprobs.py's, the same the server reports for `echo` and `logprobs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..infer.logprobs import log_probs

MAX_LOGITS = 2**28  # logits per forward (1 GiB in fp32; the log-softmax holds as much again)


@dataclass(frozen=True)
class Scored:
    logprobs: list[float]  # log p of each of the row's last n tokens, in order
    greedy: list[bool]  # whether each was the argmax of its distribution

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


def check_rows(rows: list[tuple[list[int], int]]) -> None:
    for tokens, n in rows:
        if not 1 <= n < len(tokens):
            raise ValueError(f"a row scores 1 .. len(tokens) - 1 tokens after the first; got {n} of {len(tokens)}")


@torch.inference_mode()
def score_tokens(
    model: torch.nn.Module,
    rows: list[tuple[list[int], int]],
    *,
    batch_size: int,
    pad_id: int = 0,
    on_batch: Callable[[int], None] | None = None,
    max_logits: int = MAX_LOGITS,
) -> list[Scored]:
    """Score the last n tokens of each (tokens, n) row with `model` (a Transformer in eval mode); results
    in the order of `rows`. A batch holds at most `batch_size` rows and `max_logits` logits (one row always
    fits). on_batch(rows done) is called after every batch (a progress bar)."""
    check_rows(rows)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # stable: equal lengths keep their order
    out: list[Scored | None] = [None] * len(rows)
    for part in _batches(order, [n for _, n in rows], batch_size, model.config.vocab_size, max_logits):
        inputs, at, targets = _batch([rows[i] for i in part], pad_id)
        logits = model(inputs.to(device), logits_at=at.to(device)).logits  # (B, K, V) fp32
        lp = log_probs(logits)
        targets = targets.to(device)
        chosen = lp.gather(2, targets[:, :, None])[:, :, 0]  # (B, K)
        greedy = lp.argmax(dim=-1) == targets  # (B, K)
        for i, values, hits in zip(part, chosen.tolist(), greedy.tolist(), strict=True):
            n = rows[i][1]
            out[i] = Scored(values[:n], hits[:n])
        if on_batch is not None:
            on_batch(len(part))
    return out  # type: ignore[return-value]


def _batches(order: list[int], scored: list[int], batch_size: int, vocab: int, max_logits: int):
    """Consecutive runs of `order` with at most batch_size rows and (rows x widest K x vocab) <= max_logits."""
    batch: list[int] = []
    for i in order:
        k = max([scored[j] for j in batch] + [scored[i]])
        if batch and (len(batch) == batch_size or (len(batch) + 1) * k * vocab > max_logits):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _batch(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs (B, T) right-padded, the K target positions of each row (B, K) and their targets (B, K);
    rows with fewer than K targets repeat their first position (its extra columns are dropped)."""
    width = max(len(tokens) - 1 for tokens, _ in rows)
    k = max(n for _, n in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    at = torch.zeros(len(rows), k, dtype=torch.long)
    targets = torch.zeros(len(rows), k, dtype=torch.long)
    for r, (tokens, n) in enumerate(rows):
        length = len(tokens) - 1
        inputs[r, :length] = torch.tensor(tokens[:-1])
        first = length - n  # the input position that predicts tokens[-n]
        at[r] = first
        at[r, :n] = torch.arange(first, length)
        targets[r, :n] = torch.tensor(tokens[-n:])
    return inputs, at, targets
