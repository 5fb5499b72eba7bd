"""The dataset a run trains on: data.prepared as it is, or data.paths prepared into a cache first.

Plain data.paths are prepared (`data/prepare.py`) into GPTOSS_CACHE/datasets/KEY, where KEY hashes the
files (path, size, modification time), the data settings and the tokenizer's origin, so an unchanged
corpus is read, tokenized and its tokenizer trained only once; an entry whose preparation was killed is
continued, and one with a damaged shard is prepared again from that shard, by the next run. Every process
computes KEY alone, with no collective: under torchrun rank 0 prepares while the other ranks poll for the
index file, so a long preparation never meets a collective timeout; a file lock keeps two runs from
preparing one entry at once.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GptossError
from . import shards
from .corpus import find_sources
from .prepare import TRAINED, Settings, cache_root, dataset_key, prepare_dataset
from .tokenizer import check_vocab, load_tokenizer, tokenizer_hash


@dataclass
class TrainingData:
    root: Path
    index: dict
    tokenizer: object  # tokenizers.Tokenizer
    train: shards.Split
    val: shards.Split
    trained_tokenizer: bool  # trained from data.paths (not given, not from a checkpoint)
    times: dict = field(default_factory=dict)  # read_s, tokenizer_s, tokenize_s (0 when cached)


def settings_of(cfg) -> Settings:
    d = cfg.data
    return Settings(
        vocab_size=cfg.model.vocab_size,
        text_field=d.text_field,
        val_fraction=d.val_fraction,
        seed=cfg.train.seed,
        tokenizer_sample_bytes=d.tokenizer_sample_bytes,
        invalid_utf8=d.invalid_utf8,
    )


@contextmanager
def _locked(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wait_for(path: Path, rank: int) -> None:
    """Poll for a file another rank writes (no collective, so no timeout while it works)."""
    from ..output import console

    told = False
    while not path.is_file():
        if not told:
            console.print(f"rank {rank}: waiting for rank 0 to prepare the data", highlight=False)
            told = True
        time.sleep(0.2)


def _trained_entry_holds(sources, settings, tok_hash: str) -> bool:
    """Whether the cache entry of this data with a tokenizer trained on it is complete and was encoded by the
    tokenizer of hash `tok_hash`: then a run that gives that very tokenizer (a resume, a run --init-from one
    trained on the same corpus) reads it instead of tokenizing the corpus again into an entry of its own."""
    root = cache_root() / "datasets" / dataset_key(sources, settings, TRAINED)[:32]
    try:
        index = shards.read_index(root)
    except GptossError:
        return False
    return bool(index.get("complete")) and index.get("tokenizer_hash") == tok_hash


def open_training_data(cfg, tokenizer_source: Path | None, rank: int = 0, show: bool = True) -> TrainingData:
    """The run's tokenized data and tokenizer. `tokenizer_source`: a tokenizer.json the run must use
    (--tokenizer, data.tokenizer or the checkpoint's); rank 0 alone prepares and warns."""
    from ..output import warn

    given = None
    if tokenizer_source is not None:
        if not Path(tokenizer_source).is_file():
            raise GptossError(f"tokenizer: {tokenizer_source} does not exist")
        given = load_tokenizer(Path(tokenizer_source))
        check_vocab(given, cfg.model.vocab_size, str(tokenizer_source))
    times = {"read_s": 0.0, "tokenizer_s": 0.0, "tokenize_s": 0.0}
    trained = False
    if cfg.data.prepared:
        root = Path(cfg.data.prepared).expanduser()
        index = shards.read_index(root)
    else:
        sources = find_sources(cfg.data.paths, warn if rank == 0 else None)
        settings = settings_of(cfg)
        if given is not None and _trained_entry_holds(sources, settings, tokenizer_hash(given)):
            given = None  # a resume: its tokenizer is the one trained on this data, whose entry is complete
        key = dataset_key(sources, settings, tokenizer_hash(given) if given is not None else TRAINED)
        root = cache_root() / "datasets" / key[:32]
        trained = given is None
        if rank == 0:
            with _locked(root.with_suffix(".lock")):
                result = prepare_dataset(sources, root, settings, given, show=show, flag=None)
            times.update(result.times)
            index = result.index
            if result.redone:
                warn(f"{root}: damaged shard(s) {', '.join(result.redone[:3])} of the data cache prepared again")
        else:
            _wait_for(root / shards.INDEX, rank)
            index = shards.read_index(root)
    tok = load_tokenizer(root / shards.TOKENIZER)
    if tokenizer_hash(tok) != index["tokenizer_hash"]:
        raise GptossError(f"{root / shards.TOKENIZER}: differs from the tokenizer the shards were encoded with")
    if given is not None and tokenizer_hash(given) != tokenizer_hash(tok):
        raise GptossError(
            f"data.prepared: {root} was tokenized with another tokenizer than {tokenizer_source}; "
            f"prepare it again with --tokenizer {tokenizer_source}"
        )
    check_vocab(tok, cfg.model.vocab_size, str(root / shards.TOKENIZER))
    if rank == 0 and trained and tok.get_vocab_size() < cfg.model.vocab_size:
        warn(
            f"the corpus fills only {tok.get_vocab_size()} of {cfg.model.vocab_size} vocabulary entries; "
            "the model keeps model.vocab_size"
        )
    try:
        train, val = shards.open_split(root, index, "train"), shards.open_split(root, index, "val")
    except GptossError as err:
        if cfg.data.prepared:
            raise
        raise GptossError(f"{err} (a cache entry: delete {root} and train again)") from None
    return TrainingData(root, index, tok, train, val, trained, times)


def prepare_paths(cfg, out: Path, tokenizer: Path | None, workers: int = 0, show: bool = True) -> dict:
    """`gptoss prepare`'s core: cfg.data.paths tokenized into `out` (with the given tokenizer.json, else one
    trained on a sample); returns the summary the command prints (times, counts, the tokenizer's hash)."""
    from ..output import warn

    given = None
    if tokenizer is not None or cfg.data.tokenizer:
        source = tokenizer or Path(cfg.data.tokenizer)
        if not source.is_file():
            raise GptossError(f"--tokenizer: {source} does not exist")
        given = load_tokenizer(source)
        check_vocab(given, cfg.model.vocab_size, str(source))
    sources = find_sources(cfg.data.paths, warn)
    result = prepare_dataset(sources, out, settings_of(cfg), given, workers=workers, show=show)
    index = result.index
    return {
        "out": str(result.root),
        "cached": result.cached,
        "redone": result.redone,
        "sources": len(index["sources"]),
        "source_bytes": sum(s["size"] for s in index["sources"]),
        "documents": index["documents"],
        "train_tokens": index["train"]["tokens"],
        "val_tokens": index["val"]["tokens"],
        "shards": len(index["train"]["shards"]) + len(index["val"]["shards"]),
        "dtype": index["dtype"],
        "tokenizer_hash": index["tokenizer_hash"],
        "invalid_utf8": {"policy": cfg.data.invalid_utf8, "bytes": index.get("invalid_utf8_bytes", 0)},
        "vocab_size": index["vocab_size"],
        "times_s": result.times,
    }
