"""The "open the data" step of training setup: the tokenizer a run uses and its training and validation
batches, from conversations (supervised fine-tuning) or from text (prepared token shards).

    conversations (data.paths name .jsonl chats)   the loss on assistant tokens, conversations packed per row
    text (anything else, or data.prepared)         data/dataset.py prepares or opens the shards; every rank
                                                   walks the same global order and draws its own slice

The tokenizer is the one given (--tokenizer, data.tokenizer), else the one the starting checkpoint was
trained with, else one trained on the data. Every rank finds the same answer by itself (no collective),
except a tokenizer trained on conversations, which rank 0 trains and broadcasts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig
from ..data import conversations
from ..data.batches import TokenBatches
from ..data.corpus import split_documents
from ..data.dataset import open_training_data
from ..data.tokenizer import check_vocab, load_tokenizer, tokenizer_hash, train_tokenizer
from ..errors import GptossError
from ..output import warn
from ..run.layout import RunDir
from ..run.open import find_tokenizer
from . import distributed


@dataclass
class TrainingInputs:
    tokenizer: object  # tokenizers.Tokenizer
    train: TokenBatches  # or conversations.ConversationBatches; batch_size = the micro-batch of all ranks
    val: TokenBatches | None
    tok_hash: str
    times: dict = field(default_factory=dict)  # read_s, tokenizer_s, tokenize_s (seconds)
    root: Path | None = None  # the prepared dataset trained on (None: conversations)


def source_run(checkpoint: Path | None) -> RunDir | None:
    """RUN for RUN/checkpoints/step-N (where an imported chat template lives), else None."""
    if checkpoint is None or RunDir.of_checkpoint(checkpoint).path == checkpoint:
        return None
    return RunDir.of_checkpoint(checkpoint)


def tokenizer_source(cfg: RunConfig, run: RunDir, start_ckpt: Path | None, given: Path | None) -> Path | None:
    """The tokenizer.json a run must use (given, or the one its checkpoint was trained with); None: the
    data's own."""
    source = given or (Path(cfg.data.tokenizer) if cfg.data.tokenizer else None)
    if source is None and start_ckpt:  # the tokenizer the checkpoint was trained with
        source = find_tokenizer(RunDir.of_checkpoint(start_ckpt), start_ckpt)
        if source is None and run.tokenizer.is_file():
            source = run.tokenizer
    return source


def _conversation_tokenizer(cfg, run: RunDir, start_ckpt, given, texts, info):
    """Rank 0 loads the run's tokenizer (or trains one on the conversations' text); the others receive its
    JSON."""
    from tokenizers import Tokenizer

    text = None
    if info.main:
        source = tokenizer_source(cfg, run, start_ckpt, given)
        if source is not None:
            if not Path(source).is_file():
                raise GptossError(f"tokenizer: {source} does not exist")
            tok = load_tokenizer(Path(source))
            check_vocab(tok, cfg.model.vocab_size, str(source))
        else:
            tok = train_tokenizer(texts, cfg.model.vocab_size)
            if tok.get_vocab_size() < cfg.model.vocab_size:
                warn(
                    f"the corpus fills only {tok.get_vocab_size()} of {cfg.model.vocab_size} vocabulary entries; "
                    "the model keeps model.vocab_size"
                )
        text = tok.to_str()
    return Tokenizer.from_str(distributed.broadcast_object(text, info))


def _conversation_inputs(cfg, chats, run: RunDir, start_ckpt, given, info) -> TrainingInputs:
    t = cfg.train
    train_chats, val_chats = split_documents(chats, cfg.data.val_fraction, t.seed)
    texts = conversations.conversation_text(train_chats)
    tok = _conversation_tokenizer(cfg, run, start_ckpt, given, texts, info)
    template = (source_run(start_ckpt) or run).chat_template
    batch = t.batch_size * info.world
    tok, train_data, val_data = conversations.conversation_data(
        tok, template, train_chats, val_chats, t.seq_len, batch, t.seed, cfg.model.vocab_size, "tokenizer"
    )
    return TrainingInputs(tok, train_data, val_data, tokenizer_hash(tok))


def _text_inputs(cfg, run: RunDir, start_ckpt, given, info, progress: bool) -> TrainingInputs:
    t = cfg.train
    data = open_training_data(
        cfg, tokenizer_source(cfg, run, start_ckpt, given), info.rank, show=progress and info.main
    )
    # Every rank walks the same global order and draws only its own slice of each global micro-batch.
    train_data = TokenBatches(data.train.arrays, t.seq_len, t.batch_size * info.world, t.seed)
    if train_data.batches_per_epoch < 1:
        raise GptossError(
            f"data: {train_data.tokens} training tokens make {train_data.num_samples} sequences of "
            f"{t.seq_len}+1 tokens, fewer than one batch of {train_data.batch_size}; add text or lower them"
        )
    val_data = None
    val_len = min(t.seq_len, data.val.tokens - 1)
    if val_len >= 2:
        val_data = TokenBatches(data.val.arrays, val_len, t.batch_size, t.seed)
    tok = data.tokenizer
    return TrainingInputs(tok, train_data, val_data, tokenizer_hash(tok), data.times, data.root)


def open_inputs(
    cfg: RunConfig, run: RunDir, start_ckpt: Path | None, given: Path | None, info, progress: bool
) -> TrainingInputs:
    """The tokenizer and batches of this run; `start_ckpt` is the checkpoint it resumes or starts from."""
    chats = conversations.read_conversation_paths(cfg.data.paths) if cfg.data.prepared is None else None
    if chats is not None:
        return _conversation_inputs(cfg, chats, run, start_ckpt, given, info)
    return _text_inputs(cfg, run, start_ckpt, given, info, progress)
