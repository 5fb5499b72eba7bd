"""Strided-window scoring: every token of every document scored once, with as much left context as the
stride allows, as summed next-token loss (nats), top-1 hits and a count.

A document of n tokens is scored as the sequence s = [EOS] + ids: training joins documents with EOS
after each, so EOS is what the first token of a document is predicted from. The input s[a:b] (at most C
tokens, C = the context) predicts s[a+1:b+1]. Right edges b_0 = min(C, n), b_k = min(b_{k-1} + S, n)
(S = the stride) and a_k = max(0, b_k - C); window k scores only the targets b_{k-1}+1 .. b_k, so each
target is scored exactly once and, past the first window, sees at least C - S + 1 tokens before it.
S = C is non-overlapping chunks (fast); S = 1 gives every token min(its position, C) tokens of context.

Windows are sorted by length (stable) and batched with right padding: a causal model's real tokens do
not see the pads after them, and padded targets are ignored. The result depends only on the text, the
model and (context, stride, batch size), never on timing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.cross_entropy import IGNORE_INDEX


@dataclass(frozen=True)
class Window:
    doc: int  # index into the sequences
    start: int  # a: the first input position in s
    end: int  # b: one past the last input position; the last target is s[b]
    first: int  # the first target scored here: s[first] .. s[end]

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class Totals:
    loss: float = 0.0  # summed next-token cross-entropy in nats
    tokens: int = 0  # targets scored
    correct: int = 0  # targets that were the model's top-1 guess

    def add(self, other: Totals) -> None:
        self.loss += other.loss
        self.tokens += other.tokens
        self.correct += other.correct


def plan_windows(lengths: list[int], context: int, stride: int) -> list[Window]:
    """Windows for documents of `lengths` tokens each (targets, the EOS in front not counted)."""
    if context < 1 or not 1 <= stride <= context:
        raise ValueError(f"need 1 <= stride <= context, got stride {stride}, context {context}")
    windows = []
    for doc, n in enumerate(lengths):
        done = 0  # targets 1..done are scored
        while done < n:
            end = min(done + stride, n) if done else min(context, n)
            windows.append(Window(doc, max(0, end - context), end, done + 1))
            done = end
    return windows


def _batch(sequences: list[list[int]], windows: list[Window], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, T) int64 with T the longest window; targets not scored here are ignored."""
    width = max(w.length for w in windows)
    inputs = torch.full((len(windows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)
    for row, w in enumerate(windows):
        s = sequences[w.doc]
        inputs[row, : w.length] = torch.tensor(s[w.start : w.end])
        skip = w.first - w.start - 1  # columns whose targets an earlier window scored
        targets[row, skip : w.length] = torch.tensor(s[w.first : w.end + 1])
    return inputs, targets


@torch.inference_mode()
def score_sequences(
    model: torch.nn.Module,
    sequences: list[list[int]],
    *,
    context: int,
    stride: int,
    batch_size: int,
    pad_id: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> Totals:
    """Score each sequence s = [EOS] + document ids (targets s[1:]) with `model` (a Transformer in eval mode).

    on_batch(tokens) is called after every batch with the number of targets it scored (a progress bar).
    """
    device = next(model.parameters()).device
    windows = plan_windows([len(s) - 1 for s in sequences], context, stride)
    windows.sort(key=lambda w: -w.length)  # stable: equal lengths keep document order
    totals = Totals()
    for i in range(0, len(windows), batch_size):
        inputs, targets = _batch(sequences, windows[i : i + batch_size], pad_id)
        count = int((targets != IGNORE_INDEX).sum())
        # The fused unembedding + cross-entropy: no (B, T, V) logits. lm_loss and accuracy are means over
        # the counted targets, computed in fp32; the sums are kept in float64 on the host.
        out = model(inputs.to(device), targets=targets.to(device))
        part = Totals(float(out.lm_loss) * count, count, round(float(out.accuracy) * count))
        totals.add(part)
        if on_batch is not None:
            on_batch(count)
    return totals
