"""Log-probabilities in the server's answers: what the engine records, and the OpenAI shapes it is sent in.

The numbers are infer/logprobs.py's: the raw model's log_softmax, before temperature, top-k, top-p or the
repetition penalty (docs/serve.md), the same as `gptoss eval --tasks` scores with.

    sampled(logits, runs, picked)        the engine's decode step: a TokenLogprob for each row that asked
    prompt_logprobs(logits, prompt, ...) a prefill chunk's logits -> the prompt tokens' TokenLogprobs (echo)
    completion_logprobs(...)             /v1/completions: {tokens, token_logprobs, top_logprobs, text_offset}
    chat_logprobs(...)                   /v1/chat/completions: {content: [{token, logprob, bytes, top_logprobs}]}

A token is shown as its text, or as `bytes:\\xe2\\x80` when it holds only part of a UTF-8 character (as
the OpenAI API does); chat entries carry the bytes themselves.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer

from ..data.tokenizer import token_bytes
from ..infer.logprobs import TokenLogprob, token_logprobs


def sampled(logits: torch.Tensor, tops: Sequence[int | None], picked: Sequence[int]) -> dict[int, TokenLogprob]:
    """logits (R, V) of one step, each row's `logprobs` setting (None: not asked) and sampled id ->
    {row: TokenLogprob with that row's number of alternatives} for the rows that asked."""
    rows = [i for i, top in enumerate(tops) if top is not None]
    if not rows:
        return {}
    k = max(tops[i] for i in rows)
    entries = token_logprobs(logits[rows], [picked[i] for i in rows], k)
    return {i: _keep(e, tops[i]) for i, e in zip(rows, entries, strict=True)}


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], start: int, top: int) -> list[TokenLogprob]:
    """logits (C, V) of prompt positions start .. start+C-1 -> the TokenLogprobs of the prompt tokens they
    predict (start+1 ..), at most up to the prompt's end (the last position predicts the first new token)."""
    targets = prompt[start + 1 : start + 1 + logits.shape[0]]
    return token_logprobs(logits[: len(targets)], targets, top)


def _keep(entry: TokenLogprob, top: int) -> TokenLogprob:
    return entry if len(entry.top) == top else TokenLogprob(entry.token, entry.logprob, entry.top[:top])


class TokenPieces:
    """Token ids as the OpenAI API shows them: text, or `bytes:\\x..` for part of a character (cached)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        if token not in self._cache:
            raw = token_bytes(self.tokenizer, token)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._cache[token] = (text, raw)
        return self._cache[token]


def completion_logprobs(
    pieces: TokenPieces,
    tokens: Sequence[int],
    entries: Sequence[TokenLogprob | None],
    top: int,
    *,
    text_len: int,
    offset: int = 0,
    specials_shown: bool = False,
) -> dict:
    """The `logprobs` object of a completion choice (or of one streamed chunk). `entries[i]` is None for a
    token with no log-probability (the first prompt token of an echo). text_offset: where each token starts
    in the choice's text (`offset` characters precede these tokens), at most `text_len`; special tokens take
    room in the text only where it shows them (`specials_shown`: an echoed prompt does, generated text not)."""
    texts, lps, tops, offsets = [], [], [], []
    chars = offset
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token, entry in zip(tokens, entries, strict=True):
        text, raw = pieces(token)
        texts.append(text)
        offsets.append(min(chars, text_len))
        if specials_shown or token not in pieces.special:
            chars += len(decoder.decode(raw))
        if entry is None:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(entry.logprob)
        # The k most likely tokens, and the chosen one where it is not among them (the OpenAI API's
        # "up to logprobs + 1 elements"): logprobs 0 shows the chosen token alone.
        alternatives = {pieces(t)[0]: v for t, v in entry.top[:top]}
        alternatives.setdefault(text, entry.logprob)
        tops.append(alternatives)
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(pieces: TokenPieces, entries: Sequence[TokenLogprob], top: int) -> dict:
    """The `logprobs` object of a chat choice (or chunk): one entry per token with its `top` alternatives."""

    def item(token: int, logprob: float) -> dict:
        text, raw = pieces(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top[:top]]} for e in entries]
    return {"content": content, "refusal": None}


class ChoiceLogprobs:
    """One choice's log-probabilities as the engine sends them (the prompt's once, with echo; then one per
    sampled token), shaped for the completions or the chat API: whole, or one streamed chunk at a time.

    top None means the request did not ask for logprobs: every shape is then None. A completion with echo
    starts its text with the prompt (special tokens shown); chat leaves out the end-of-turn ids, which are
    not part of the reply."""

    def __init__(
        self,
        pieces: TokenPieces,
        *,
        top: int | None,
        chat: bool,
        prompt: list[int],
        echo: bool = False,
        stop_ids: frozenset[int] = frozenset(),
    ):
        self.pieces, self.top, self.chat, self.stop_ids = pieces, top, chat, stop_ids
        self.prompt = prompt if echo else []
        self.prefix = pieces.tokenizer.decode(prompt, skip_special_tokens=False) if echo else ""
        self.prompt_entries: list[TokenLogprob] = []
        self.sampled: list[TokenLogprob] = []
        self._streamed = 0  # characters of this choice's text already streamed

    def add_prompt(self, entries: list[TokenLogprob]) -> None:
        self.prompt_entries = list(entries)

    def add(self, entry: TokenLogprob | None) -> None:
        if entry is not None:
            self.sampled.append(entry)

    def whole(self, text: str) -> dict | None:
        """The choice's `logprobs` object for its whole text (the echoed prefix included)."""
        if self.top is None:
            return None
        if self.chat:
            return chat_logprobs(self.pieces, [e for e in self.sampled if e.token not in self.stop_ids], self.top)
        head = self._prompt_part()
        tail = completion_logprobs(
            self.pieces,
            [e.token for e in self.sampled],
            self.sampled,
            self.top,
            text_len=len(text),
            offset=len(self.prefix),
        )
        return {key: head[key] + tail[key] for key in tail} if head else tail

    def prompt_chunk(self, entries: list[TokenLogprob]) -> dict | None:
        """The echoed prompt's `logprobs` for the first streamed chunk of a completion."""
        self.add_prompt(entries)
        self._streamed = len(self.prefix)
        return self._prompt_part()

    def token_chunk(self, entry: TokenLogprob | None, text: str) -> dict | None:
        """One streamed token's `logprobs` (the chunk also carries `text`)."""
        start, self._streamed = self._streamed, self._streamed + len(text)
        if self.top is None or entry is None:
            return None
        if self.chat:
            return chat_logprobs(self.pieces, [entry] if entry.token not in self.stop_ids else [], self.top)
        return completion_logprobs(self.pieces, [entry.token], [entry], self.top, text_len=start, offset=start)

    def _prompt_part(self) -> dict | None:
        if not self.prompt or self.top is None:
            return None
        entries = [None, *self.prompt_entries]
        return completion_logprobs(
            self.pieces, self.prompt, entries, self.top, text_len=len(self.prefix), specials_shown=True
        )
