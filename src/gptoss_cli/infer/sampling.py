"""Choosing the next token and turning tokens back into text, for `generate.py`.

(the settings are config.InferConfig: temperature, top-k, top-p, repetition penalty, seed, stop)
sample(logits, ...)   (B, V) logits -> (B,) ids on the device: penalty, then greedy or filtered sampling
TextStream            incremental detokenisation of one row, honouring stop strings
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from ..config import InferConfig
from ..errors import GptossError

# ---- sampling ------------------------------------------------------------------------------------

NON_FINITE = "the model produced non-finite logits (NaN or inf): the checkpoint's weights are diverged or damaged"


def option_label(key: str) -> str:
    """How an infer setting is named in errors from the command line: its flag."""
    return "-n/--max-new-tokens" if key == "max_new_tokens" else "--" + key.replace("_", "-")


def sample(
    logits: torch.Tensor,
    params: InferConfig,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) fp32 -> next ids (B,). `seen` (B, V) bool marks tokens the penalty applies to.

    Greedy: a row whose logits are not all finite gets id -1 (argmax of NaN is an arbitrary id, often EOS,
    which would end generation silently); the caller checks with the ids it syncs anyway."""
    if seen is not None and params.repetition_penalty != 1.0:
        p = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if params.temperature == 0:
        return torch.where(torch.isfinite(logits).all(dim=-1), logits.argmax(dim=-1), -1)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (the first is always kept).
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= params.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    try:
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
    except RuntimeError as err:  # NaN/inf probabilities: checked only on failure, so no per-step host sync
        raise GptossError(f"{NON_FINITE} ({err})") from None


# ---- streaming text ------------------------------------------------------------------------------


class TextStream:
    """Incremental detokenisation of one row, with stop strings.

    Text is released only once its UTF-8 is complete (byte-level BPE can split a character over tokens)
    and a tail that could still become a stop string is held back, so a stop string is never printed.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # complete text so far (cut before a stop string once one is found)
        self.stopped = False
        self._prefix = self._read = 0  # ids[_prefix:_read] are already in `text`
        self._emitted = 0  # characters of `text` already released

    def add(self, token: int) -> str:
        """Append one id; returns the newly releasable text (maybe empty)."""
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self._prefix : self._read])
        now = self.tokenizer.decode(self.ids[self._prefix :])
        if len(now) > len(done) and not now.endswith("\ufffd"):
            self.text += now[len(done) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever is still held back (an unfinished character is decoded lossily)."""
        if not self.stopped and self._read < len(self.ids):
            done = self.tokenizer.decode(self.ids[self._prefix : self._read])
            self.text += self.tokenizer.decode(self.ids[self._prefix :])[len(done) :]
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        longest = max(map(len, self.stop), default=0)
        search_from = max(0, self._emitted - longest)
        cuts = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:  # hold back the longest tail that is a proper prefix of a stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = max(self._emitted, len(self.text) - hold)
        chunk, self._emitted = self.text[self._emitted : end], end
        return chunk
