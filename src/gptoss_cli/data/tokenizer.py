"""The byte-level BPE tokenizer, trained with `tokenizers` on the training text and saved as tokenizer.json.

Text is split into words by SPLIT_PATTERN, the o200k split of gpt-oss's own tokenizer exactly as llama.cpp
runs it (its `gpt-4o` pre-tokenizer), then mapped to bytes (ByteLevel, no prefix space) and merged by BPE;
there is no normalizer. So a GGUF export tokenizes every text as gptoss does (interop/gguf_vocab.py). The
ByteLevel decoder makes decode(encode(x)) == x for any UTF-8 text. `<|endoftext|>` separates documents;
`<|pad|>` pads batched prompts; the conversation tokens (`<|start|>`, `<|message|>`, `<|end|>`, `<|return|>`,
`<|channel|>`, as in openai's harmony format) are reserved so a run can later be fine-tuned on conversations
(data/chat_format.py is what uses them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import GptossError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
START = "<|startoftext|>"  # the released gpt-oss tokenizer (o200k_harmony) has one; our BPE does not
CHAT_TOKENS = ["<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|channel|>"]  # see data/chat_format.py
SPECIAL_TOKENS = [EOS, PAD, *CHAT_TOKENS]

# The o200k word split (letters with an optional leading non-letter and an English contraction, 1-3 digits,
# punctuation runs, newlines, other whitespace) as llama.cpp executes it for `tokenizer.ggml.pre = "gpt-4o"`
# (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT4O). o200k's own expression (the tokenizer.json of
# openai/gpt-oss) tells upper from lower case with \p{Lu}/\p{Ll} and counts combining marks (\p{M}) as
# letters; llama.cpp's rewrite, which its regex engine can run, tells case apart for A-Z/a-z only and
# leaves marks out. Training with the rewrite makes both split every text alike.
_UPPER = r"((?=[\p{L}])([^a-z]))"  # a letter that is not a-z
_LOWER = r"((?=[\p{L}])([^A-Z]))"  # a letter that is not A-Z
_CONTRACTION = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
SPLIT_PATTERN = "|".join(
    (
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    )
)
# Part of the cache keys of trained tokenizers and of data tokenized with them: a new split is a new tokenizer.
PRETOKENIZER_VERSION = "o200k-llama.cpp-1"


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """SPLIT_PATTERN's words (each match its own word), then bytes -> the byte-level alphabet."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Train byte-level BPE on `texts` (streamed: memory stays bounded by the merge statistics).
    `show_progress`: the tokenizers library's own progress bars, on stderr."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=show_progress,
    )
    length = len(texts) if isinstance(texts, list) else None
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def check_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode; else a one-line error naming `what` and the first bad byte. Python decodes
    command-line arguments (and a pipe, under some locales) with surrogateescape, so bytes that are not UTF-8
    arrive as lone surrogates, which the tokenizer refuses with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise GptossError(f"{what}: not UTF-8 text ({byte} at character {err.start + 1})") from None
    return text


def decode_utf8(data: bytes, what: str) -> str:
    """Bytes read from a file or a pipe -> text; a one-line error naming `what`, the line and the bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise GptossError(f"{what}: line {line} is not UTF-8 text (byte 0x{data[err.start]:02x})") from None


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a plain Exception for bad JSON
        raise GptossError(f"{path}: not a valid tokenizer.json ({err})") from None
    if tok.token_to_id(EOS) is None:
        raise GptossError(f"{path}: tokenizer has no {EOS} token")
    return tok


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]


def check_vocab(tok: Tokenizer, vocab_size: int, source: str) -> None:
    """The model's embedding must cover every id the tokenizer can produce."""
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise GptossError(f"{source}: tokenizer has {n} tokens but model.vocab_size is {vocab_size}")


def bos_id(tok: Tokenizer) -> int:
    """The id a text starts after: START where the tokenizer has it (the released gpt-oss tokenizer), else
    EOS (our runs put EOS between documents, so EOS is what a document's first token is predicted from).
    It is the BOS the export declares, which is what transformers-based tools prefix a text with."""
    start = tok.token_to_id(START)
    return start if start is not None else tok.token_to_id(EOS)


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): printable Latin-1 bytes stand for themselves, the other 68
    bytes, in order, for chr(256), chr(257), ... (the characters `pre_tokenizers.ByteLevel.alphabet()` lists)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)}
    alphabet, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + shifted)] = byte
            shifted += 1
    return alphabet


BYTE_LEVEL = _byte_level_alphabet()


def token_bytes(tok: Tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for. A byte-level BPE token may hold part of a UTF-8 character, which
    decode() cannot show (it gives U+FFFD), so its bytes are read from its byte-level spelling; a special
    token is its own text."""
    added = tok.get_added_tokens_decoder().get(token_id)
    if added is not None:
        return added.content.encode("utf-8")
    piece = tok.id_to_token(token_id)
    if piece is not None and isinstance(tok.decoder, decoders.ByteLevel) and all(c in BYTE_LEVEL for c in piece):
        return bytes(BYTE_LEVEL[c] for c in piece)
    return tok.decode([token_id], skip_special_tokens=False).encode("utf-8")
