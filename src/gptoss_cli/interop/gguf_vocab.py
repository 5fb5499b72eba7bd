"""A run's tokenizer as llama.cpp's GGUF vocabulary (`tokenizer.ggml.*`), or the reason it cannot be one.

llama.cpp runs byte-level BPE ("gpt2" model) itself: it splits the text into words with the expression of a
named pre-tokenizer (`tokenizer.ggml.pre`; src/llama-vocab.cpp), maps bytes to the byte-level alphabet and
merges by the ranks of `tokenizer.ggml.merges`. A tokenizer.json goes to GGUF when llama.cpp implements its
split, which `pre_tokenizer` decides from the tokenizer's own JSON:

    Split(data/tokenizer.py's SPLIT_PATTERN) + ByteLevel    "gpt-4o", split exactly alike (gptoss's tokenizers)
    Split(o200k's own expression) + ByteLevel               "gpt-4o", with a caveat (openai/gpt-oss's tokenizer:
                                                            llama.cpp runs a rewrite of the expression)
    ByteLevel(use_regex=true) (the GPT-2 expression)        "gpt-2" (tokenizers of earlier gptoss versions)

anything else (a normalizer, another split, another model) is refused with the reason. Special tokens are
`control` tokens, which llama.cpp matches in a prompt and never writes out as text; other added tokens are
`user-defined`; ids the model has beyond the tokenizer's are `unused` placeholders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gguf import TokenType
from tokenizers import Tokenizer

from ..data.tokenizer import SPLIT_PATTERN
from ..errors import GptossError

# o200k's expression as openai/gpt-oss's tokenizer.json (and tiktoken's o200k_base) write it.
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
O200K_CAVEAT = (
    "llama.cpp splits with its rewrite of o200k's expression, which tells letter case apart for A-Z only and "
    "does not count combining marks as letters, so some non-English text tokenizes differently there"
)


class GgufTokenizerError(GptossError):
    """The tokenizer has no llama.cpp counterpart; the message says why."""


@dataclass(frozen=True)
class PreTokenizer:
    name: str  # tokenizer.ggml.pre
    caveat: str | None = None  # how llama.cpp's split can differ; None: identical


@dataclass
class GgufVocab:
    pre: PreTokenizer
    tokens: list[str]  # one per model id (vocab_size), byte-level text as in tokenizer.json
    types: list[int]  # gguf.TokenType per id
    merges: list[str]  # "left right", by rank
    special: dict[str, int]  # bos, eos, pad ids


def _byte_level(step: dict, use_regex: bool) -> bool:
    return (
        step.get("type") == "ByteLevel"
        and not step.get("add_prefix_space", False)
        and bool(step.get("use_regex", True)) == use_regex
    )


def _describe(pre: dict | None) -> str:
    if not pre:
        return "none"
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return " + ".join(str(s.get("type")) for s in steps)


def pre_tokenizer(spec: dict, source: str) -> PreTokenizer:
    """The llama.cpp pre-tokenizer that splits text as tokenizer.json `spec` does, or GgufTokenizerError."""
    if spec.get("normalizer"):
        raise GgufTokenizerError(
            f"{source}: its normalizer ({spec['normalizer'].get('type')}) has no llama.cpp counterpart for "
            "byte-level BPE, so llama.cpp would tokenize text differently"
        )
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise GgufTokenizerError(f"{source}: not a byte-level BPE tokenizer (model {model.get('type')})")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GgufTokenizerError(f"{source}: its decoder is not ByteLevel, so it is not byte-level BPE")
    pre = spec.get("pre_tokenizer") or {}
    if _byte_level(pre, use_regex=True):
        return PreTokenizer("gpt-2")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and _byte_level(steps[1], use_regex=False):
        split = steps[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        if split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert"):
            if pattern == SPLIT_PATTERN:
                return PreTokenizer("gpt-4o")
            if pattern == O200K_PATTERN:
                return PreTokenizer("gpt-4o", O200K_CAVEAT)
    raise GgufTokenizerError(
        f"{source}: its pre-tokenizer ({_describe(pre)}) splits text in a way llama.cpp does not implement; "
        "tokenizers trained by gptoss split as llama.cpp's gpt-4o pre-tokenizer does: train a new run to export it"
    )


def _merges(model: dict) -> list[str]:
    """tokenizer.json writes a merge as "a b" (older) or ["a", "b"] (tokenizers >= 0.20)."""
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def gguf_vocab(tok: Tokenizer, vocab_size: int, special: dict[str, str], source: str) -> GgufVocab:
    """The GGUF vocabulary of `tok` for a model with `vocab_size` ids; `special`: bos/eos/pad token texts."""
    spec = json.loads(tok.to_str())
    pre = pre_tokenizer(spec, source)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # llama.cpp wants a text for every id the model has
    types = [int(TokenType.UNUSED)] * vocab_size
    for text, i in spec["model"]["vocab"].items():
        tokens[i], types[i] = text, int(TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        i = added["id"]
        tokens[i] = added["content"]
        types[i] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    ids = {key: tok.token_to_id(text) for key, text in special.items()}
    return GgufVocab(pre, tokens, types, _merges(spec["model"]), ids)
