"""The text `gptoss eval` scores: documents read by the training readers, optionally cut to a token budget.

`--data` takes what `data.paths` takes (files, directories, globs; see data/corpus.py), so a held-out
file is read exactly as training would read it. Every model is scored on the same documents, so bits
per byte compare models with different tokenizers fairly; `--max-tokens` cuts that text once, with the
first model's tokenizer, at a character boundary, and the cut text is what every model sees.
"""

from __future__ import annotations

import hashlib
import json

from tokenizers import Tokenizer

from ..data.corpus import load_documents
from ..errors import GptossError


def eval_documents(specs: list[str]) -> list[str]:
    """The documents named by --data, in a stable order; an error when there is nothing to score."""
    if not specs:
        raise GptossError(
            "no text to score: give --data PATH (a .txt or .jsonl file, a directory or a glob; repeat --data for more)"
        )
    return load_documents(list(specs))


def cut_to_tokens(docs: list[str], tok: Tokenizer, max_tokens: int) -> list[str]:
    """The leading documents holding `max_tokens` tokens of `tok`; the last one is cut after the character
    where its max_tokens-th token ends (a token that ends inside a character keeps that whole character)."""
    kept, left = [], max_tokens
    for doc, enc in zip(docs, tok.encode_batch(docs), strict=True):
        if len(enc.ids) <= left:
            kept.append(doc)
            left -= len(enc.ids)
        else:
            if left > 0:
                kept.append(doc[: enc.offsets[left - 1][1]])
            break
        if left == 0:
            break
    return [d for d in kept if d]


def text_digest(docs: list[str]) -> str:
    """A hash of exactly the documents scored (their boundaries included): equal digests, equal text."""
    return hashlib.sha256(json.dumps(docs, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def utf8_bytes(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)
