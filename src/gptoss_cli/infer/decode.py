"""The decode core: one sequence being generated, and the next token of a batch of them. Shared by
generate.py (infer, chat, bench: a fixed batch) and serve/engine.py (continuous batching: rows come and go).

    DecodeState.start(prompt, params, ...)   a sequence's generator, repetition mask, budget, text stream
    next_tokens(logits, states)              (R, V) logits -> R token ids in one host sync; a row whose
                                             sampling fails (non-finite logits) fails alone
    state.accept(token)                      the token joins the output (or ends it); returns new text

A sequence ends with a reason:
    eos      EOS or one of its stop ids (e.g. a chat format's end of turn); the id is not in the output
    stop     a stop string (the text is cut before it) or the caller's own stop (DecodeState.stop)
    length   max_new_tokens reached
    context  the context length reached before max_new_tokens (the budget was cut to fit it)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from ..config import InferConfig
from ..errors import GptossError
from .sampling import NON_FINITE, TextStream, sample


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator seeded with `seed` (None: fresh randomness)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def budget_for(prompt_len: int, max_new_tokens: int, max_length: int) -> tuple[int, bool]:
    """(new tokens that fit after the prompt in max_length, whether the context cut max_new_tokens)."""
    budget = min(max_new_tokens, max_length - prompt_len)
    return budget, budget < max_new_tokens


@dataclass(eq=False)
class DecodeState:
    params: InferConfig
    budget: int  # new tokens this sequence may take
    limited: bool  # the context cut the budget below max_new_tokens: reaching it is "context"
    generator: torch.Generator  # rows that share one are sampled in one call (generate.py's batches)
    seen: torch.Tensor | None  # (1, V) bool: tokens the repetition penalty applies to (prompt and output)
    stream: TextStream | None  # text and stop strings (None: ids only)
    stop_ids: frozenset[int]  # ids that end the sequence without joining it (EOS, end of turn)
    out: list[int] = field(default_factory=list)
    reason: str | None = None  # set once the sequence ends

    @classmethod
    def start(
        cls,
        prompt: list[int],
        params: InferConfig,
        *,
        max_length: int,
        vocab_size: int,
        device: torch.device,
        tokenizer: Tokenizer | None = None,
        stop_ids: frozenset[int] = frozenset(),
        generator: torch.Generator | None = None,
        seen: torch.Tensor | None = None,
    ) -> DecodeState:
        """A sequence continuing `prompt` (ids) within `max_length` tokens in all. `generator` and `seen` (a
        (1, V) view) let a fixed batch share one generator and one mask tensor; by default the sequence
        gets its own, seeded from params.seed."""
        budget, limited = budget_for(len(prompt), params.max_new_tokens, max_length)
        if seen is None and params.repetition_penalty != 1.0:
            seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            seen[0, torch.tensor(prompt, device=device)] = True
        return cls(
            params=params,
            budget=budget,
            limited=limited,
            generator=generator if generator is not None else new_generator(params.seed, device),
            seen=seen,
            stream=TextStream(tokenizer, tuple(params.stop)) if tokenizer is not None else None,
            stop_ids=stop_ids,
        )

    @property
    def done(self) -> bool:
        return self.reason is not None

    def accept(self, token: int) -> str:
        """Take one sampled token. Returns the text it releases (with a tokenizer; the held-back tail too
        when the sequence ends here)."""
        if token in self.stop_ids:
            return self._end("eos")
        self.out.append(token)
        text = self.stream.add(token) if self.stream is not None else ""
        if self.seen is not None:
            self.seen[0, token] = True
        if self.stream is not None and self.stream.stopped:
            return text + self._end("stop")
        if len(self.out) >= self.budget:
            return text + self._end("context" if self.limited else "length")
        return text

    def stop(self) -> str:
        """End the sequence now (the caller's own stop condition); returns the held-back text."""
        return self._end("stop")

    def _end(self, reason: str) -> str:
        self.reason = reason
        return self.stream.finish() if self.stream is not None else ""

    @property
    def text(self) -> str:
        return self.stream.text if self.stream is not None else ""


def next_tokens(logits: torch.Tensor, states: list[DecodeState]) -> tuple[list[int], dict[int, str]]:
    """logits (R, V) fp32, one row per state -> (R token ids, {row: why it failed}).

    Greedy rows without a repetition penalty take one batched argmax; the other rows are sampled with their
    own settings, rows sharing a generator in one call (in row order, so a batch draws as it always has).
    One host sync for all rows. A row fails alone: its sampling raised, or its logits are not finite."""
    picks: list[torch.Tensor | None] = [None] * len(states)
    failed: dict[int, str] = {}
    greedy = [i for i, s in enumerate(states) if s.params.temperature == 0 and s.seen is None]
    if greedy:
        chosen = logits[greedy]
        best = torch.where(torch.isfinite(chosen).all(dim=-1), chosen.argmax(dim=-1), -1)  # -1: not finite
        for j, i in enumerate(greedy):
            picks[i] = best[j : j + 1]
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(states):
        if picks[i] is None:
            groups.setdefault(id(s.generator), []).append(i)
    for rows in groups.values():
        first = states[rows[0]]
        seen = None if first.seen is None else torch.cat([states[i].seen for i in rows])
        try:
            drawn = sample(logits[rows], first.params, first.generator, seen)  # (len(rows),)
        except Exception as err:  # this group's rows fail; the others go on
            failed.update({i: failure(err) for i in rows})
            continue
        for j, i in enumerate(rows):
            picks[i] = drawn[j : j + 1]
    alive = [i for i in range(len(states)) if i not in failed]
    ids = [0] * len(states)
    if alive:
        for i, token in zip(alive, torch.cat([picks[i] for i in alive]).tolist(), strict=True):
            if token < 0:
                failed[i] = NON_FINITE
            ids[i] = token
    return ids, failed


def failure(err: Exception) -> str:
    """The one-line message a failed sequence reports."""
    if isinstance(err, GptossError):
        return str(err)
    return f"generation failed: {type(err).__name__}: {err}"
