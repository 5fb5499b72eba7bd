"""Conversation datasets for supervised fine-tuning: .jsonl files of {"messages": [...]} -> packed rows.

A .jsonl file whose lines hold {"messages": [{"role": ..., "content": ...}, ...]} (the OpenAI / Hugging Face
convention) is a conversation dataset. Each conversation is rendered by data/chat_format.py and becomes one
segment of a training row:

    inputs    ids[:-1]                    the conversation, as the model reads it
    targets   ids[1:], IGNORE_INDEX where the next token is not the assistant's (the loss counts assistant tokens
              only)
    positions 0 .. n-2, restarting for every conversation; -1 on the padding at the end of a row
    segments  the conversation's index in the row: attention never crosses into another conversation

Conversations are packed greedily in file order, as many per row of seq_len tokens as fit; one longer than
seq_len is cut to it (counted in one warning). The rows are visited in a per-epoch order derived from
(seed, epoch), as TokenBatches does, so resume needs only (epoch, batch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import seed64
from ..errors import GptossError
from ..model.cross_entropy import IGNORE_INDEX
from ..output import warn
from .tokenizer import CHAT_TOKENS, PAD


def is_conversation_file(path: Path) -> bool:
    """A .jsonl whose first non-empty line is an object with a "messages" field."""
    if path.suffix != ".jsonl":
        return False
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    return isinstance(obj, dict) and "messages" in obj
    except (OSError, ValueError, UnicodeDecodeError):
        return False  # the document reader reports it, naming the line
    return False


def read_conversations(path: Path) -> list[list[dict]]:
    """Every conversation in `path`; a bad line is an error naming the file and the line."""
    from .chat_format import MessageError, check_messages

    conversations = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise GptossError(f"{path}:{n}: invalid JSON ({err.msg})") from None
                if not isinstance(obj, dict) or "messages" not in obj:
                    raise GptossError(f"{path}:{n}: expected an object with a 'messages' list")
                try:
                    conversations.append(check_messages(obj["messages"], "messages"))
                except MessageError as err:
                    raise GptossError(f"{path}:{n}: {err}") from None
    except UnicodeDecodeError:
        raise GptossError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise GptossError(f"{path}: cannot read ({err.strerror or err})") from None
    return conversations


def conversation_text(conversations: list[list[dict]]) -> list[str]:
    """The messages' text, for training a tokenizer from scratch on a conversation dataset."""
    return ["\n".join(f"{m['role']}: {m['content']}" for m in c) for c in conversations]


def add_chat_tokens(tokenizer, vocab_size: int, source: str):
    """A tokenizer trained before the conversation tokens existed gets them, when the model has room."""
    missing = [t for t in CHAT_TOKENS if tokenizer.token_to_id(t) is None]
    if not missing:
        return tokenizer
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size + len(missing) > vocab_size:
        raise GptossError(
            f"{source}: the tokenizer lacks {', '.join(missing)} and fills all {vocab_size} "
            "entries of model.vocab_size, so it cannot learn a conversation format"
        )
    tokenizer.add_special_tokens(missing)
    warn(f"the tokenizer had no conversation tokens: added {len(missing)} (ids {size}..{size + len(missing) - 1})")
    return tokenizer


@dataclass
class ConversationBatches:
    """Packed conversation rows with the interface of TokenBatches; batch() also returns positions, segments."""

    inputs: torch.Tensor  # (R, T) int64
    targets: torch.Tensor  # (R, T) int64, IGNORE_INDEX outside assistant tokens and on padding
    positions: torch.Tensor  # (R, T) int64, -1 on padding
    segments: torch.Tensor  # (R, T) int64
    batch_size: int
    seed: int

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    @property
    def num_samples(self) -> int:
        return self.inputs.shape[0]

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def stream_numel(self) -> int:
        return int((self.positions >= 0).sum())

    def batch(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, ...]:
        """Batch `index` of `epoch` -> inputs, targets, positions, segments (B/world, T); rank takes its slice."""
        g = torch.Generator().manual_seed(seed64(self.seed * 1_000_003 + epoch))
        order = torch.randperm(self.num_samples, generator=g)
        picks = order[index * self.batch_size : (index + 1) * self.batch_size]
        per_rank = self.batch_size // world
        return self._gather(picks[rank * per_rank : (rank + 1) * per_rank])

    def _gather(self, picks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inputs[picks], self.targets[picks], self.positions[picks], self.segments[picks]

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, ...]]:
        """The first n batches in row order (fixed, so validation losses compare across steps)."""
        return [
            self._gather(torch.arange(s, min(s + self.batch_size, self.num_samples)))
            for s in range(0, min(n * self.batch_size, self.num_samples), self.batch_size)
        ]


def pack_conversations(
    conversations: list[list[dict]], fmt, seq_len: int, batch_size: int, seed: int, pad_id: int, what: str = "training"
) -> ConversationBatches:
    """Render, mask, truncate and pack `conversations` into rows of seq_len tokens."""
    segments_ = []  # (inputs, targets) per conversation, each at most seq_len long
    cut = dropped = 0
    for messages in conversations:
        ids, trained = fmt.render_with_mask(messages, add_generation_prompt=False)
        if len(ids) > seq_len + 1:
            ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
            cut += 1
        targets = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trained[1:], strict=True)]
        if all(t == IGNORE_INDEX for t in targets):
            dropped += 1  # no assistant token left to learn from (none at all, or cut off)
            continue
        segments_.append((ids[:-1], targets))
    if cut:
        warn(
            f"{what} data: {cut} of {len(conversations)} conversations are longer than train.seq_len={seq_len} "
            "tokens and were truncated (raise train.seq_len to keep them whole)"
        )
    if dropped:
        warn(f"{what} data: {dropped} conversation(s) have no assistant tokens within train.seq_len and are skipped")
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = seq_len  # tokens in the current row; starts "full" so the first conversation opens a row
    for seg in segments_:
        if used + len(seg[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(seg)
        used += len(seg[0])
    shape = (len(rows), seq_len)
    inputs = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.full(shape, -1, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, (ids, tgt) in enumerate(row):
            n = len(ids)
            inputs[r, at : at + n] = torch.tensor(ids)
            targets[r, at : at + n] = torch.tensor(tgt)
            positions[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = k
            at += n
    return ConversationBatches(inputs, targets, positions, segments, batch_size, seed)


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.token_to_id(PAD)
    return 0 if pad is None else pad


def read_conversation_paths(paths: list[str]) -> list[list[dict]] | None:
    """The conversations of data.paths when they are conversation files; None when they are text documents."""
    from .corpus import expand_paths

    files = [f for spec in paths for f in expand_paths(spec)]
    chats = [f for f in files if is_conversation_file(f)]
    if not chats:
        return None
    if len(chats) != len(files):
        other = next(f for f in files if f not in chats)
        raise GptossError(
            f"data.paths mixes conversations ({chats[0]}) with text documents ({other}); "
            "fine-tune on conversations alone"
        )
    conversations = [c for f in chats for c in read_conversations(f)]
    if not conversations:
        raise GptossError(f"data.paths: no conversations in {', '.join(map(str, chats))}")
    return conversations


def conversation_data(
    tokenizer,
    template: Path | None,
    train: list[list[dict]],
    val: list[list[dict]],
    seq_len: int,
    batch_size: int,
    seed: int,
    vocab_size: int,
    source: str,
):
    """-> (tokenizer, train ConversationBatches, validation ConversationBatches or None). The tokenizer gains
    the conversation tokens when it lacks them (a run trained before they were reserved)."""
    from .chat_format import chat_format

    fmt = chat_format(tokenizer, template)
    if fmt is None:
        tokenizer = add_chat_tokens(tokenizer, vocab_size, source)
        fmt = chat_format(tokenizer)
    pad = pad_id_of(tokenizer)
    train_data = pack_conversations(train, fmt, seq_len, batch_size, seed, pad)
    if train_data.batches_per_epoch < 1:
        raise GptossError(
            f"data: {len(train)} training conversations pack into {train_data.num_samples} rows of "
            f"{seq_len} tokens, fewer than one batch of {batch_size}; add conversations or lower "
            "train.batch_size"
        )
    val_data = pack_conversations(val, fmt, seq_len, batch_size, seed, pad, "validation") if val else None
    return tokenizer, train_data, (val_data if val_data is not None and val_data.num_samples else None)


UNTUNED = "format only (not fine-tuned on conversations)"


def chat_status(fmt, loaded) -> str:
    """How well a run holds a conversation: "no" without a format, UNTUNED when the format is gptoss's own
    (every tokenizer reserves its tokens) but the run was trained on text and not imported, else "yes".
    `loaded` is an OpenRun (its config and checkpoint state)."""
    from .chat_format import ChatFormat

    if fmt is None:
        return "no"
    if (
        type(fmt) is ChatFormat
        and loaded.state.imported_from is None
        and not trained_on_conversations(loaded.config.data.paths)
    ):
        return UNTUNED
    return "yes"


def trained_on_conversations(paths: list[str]) -> bool:
    """Whether data.paths name conversation files; paths that no longer resolve (moved, or relative to
    another directory) give the benefit of the doubt."""
    from .corpus import expand_paths

    try:
        return any(is_conversation_file(f) for spec in paths for f in expand_paths(spec))
    except GptossError:
        return True
