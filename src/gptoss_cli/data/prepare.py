"""`gptoss prepare`: documents -> tokenizer (trained once on a capped sample) -> token shards on disk.

Two streaming passes over the sources: one draws the tokenizer's training sample (skipped when the
tokenizer is given or already cached), one tokenizes every document in worker processes and appends the
ids to the shards of its split. Memory stays bounded: documents are read as generators, at most
2 x workers chunks of about `CHUNK_BYTES` are in flight, and shards go to disk as they fill.

Each document goes to validation when a hash of (seed, document number) falls under data.val_fraction
(and the last document does when no other did), so the split needs no list of documents. A document longer
than corpus.PIECE_CHARS is read, sampled and tokenized in pieces (cut where the tokens do not change), so
memory stays bounded whatever the size of one document. A shard of each split is closed together at a chunk
boundary, and progress.json then records how far into the corpus the closed shards reach: a killed
prepare, run again, keeps them and tokenizes only the rest (data/resume.py). Worker processes end when
their parent does, however it ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import AtomicWriteError
from ..errors import GptossError
from ..output import console
from ..progress import byte_progress
from . import resume, shards
from .corpus import Meter, Source, iter_pieces
from .encoding import encode as _encode
from .encoding import init_worker, sigterm_unwinds
from .tokenizer import EOS, PRETOKENIZER_VERSION, load_tokenizer, tokenizer_hash, train_tokenizer

CHUNK_BYTES = 1 << 20  # text per worker task: ~0.5 s of encoding, small enough to keep memory flat
SHARD_TOKENS = 1 << 26  # tokens per train shard (128 MiB at uint16)
COMPRESSED_RATIO = 4  # a guess of text bytes per stored byte of .gz/.zst/.parquet, for sampling only


class NoText(GptossError):
    """The sources hold no training text (after filtering blank documents)."""


@dataclass(frozen=True)
class Settings:
    """Everything besides the sources that decides the shards' content."""

    vocab_size: int
    text_field: str = "text"
    val_fraction: float = 0.05
    seed: int = 1337
    tokenizer_sample_bytes: int = 64 << 20
    invalid_utf8: str = "error"  # error | replace | skip: bytes that are not UTF-8 (data/utf8.py)


@dataclass
class Result:
    root: Path
    index: dict
    cached: bool  # the dataset was already complete: nothing was read or tokenized
    tokenizer_trained: bool
    times: dict = field(default_factory=dict)  # read_s, tokenizer_s, tokenize_s
    redone: list[str] = field(default_factory=list)  # damaged shards found, prepared again with those after them


def cache_root() -> Path:
    root = os.environ.get("GPTOSS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gptoss")
    return Path(root)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def sources_fingerprint(sources: list[Source]) -> list:
    """The sources as the cache keys see them: path, size and modification time of every file."""
    return [[str(s.path.resolve()), s.size, s.path.stat().st_mtime_ns] for s in sources]


# The tokenizer id of data tokenized with a tokenizer trained from its own settings: trained the same way.
TRAINED = f"trained-{PRETOKENIZER_VERSION}"


def dataset_key(sources: list[Source], settings: Settings, tokenizer_id: str) -> str:
    """`tokenizer_id`: the given tokenizer's hash, or TRAINED for one trained from these settings."""
    return _digest(
        {
            "format": shards.FORMAT,
            "sources": sources_fingerprint(sources),
            "settings": asdict(settings),
            "tokenizer": tokenizer_id,
        }
    )


def _is_val(seed: int, n: int, fraction: float) -> bool:
    """splitmix64 of (seed, n) under fraction x 2^64: a fixed, independent coin per document."""
    z = (seed * 0x9E3779B97F4A7C15 + (n + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) < fraction * 2.0**64


def _split_pieces(pieces, settings: Settings, seen_val: bool):
    """(document number, piece, last, is_val) for every piece of every document. The last document goes to
    validation when no other did: a one-piece look-ahead, so only a document of one piece can be moved so."""
    n, val, held = 0, None, None  # held: the last document so far, when it came in one piece
    for piece, last in pieces:
        if held is not None:
            yield held
            held = None
        if val is None:  # the first piece of document n
            val = _is_val(settings.seed, n, settings.val_fraction)
            seen_val = seen_val or val
            if last:
                held, n, val = (n, piece, True, val), n + 1, None
                continue
        yield n, piece, last, val
        if last:
            n, val = n + 1, None
    if held is not None:
        k, piece, _, val = held
        yield k, piece, True, val or (not seen_val and settings.val_fraction > 0 and k >= 1)


# ---- the tokenizer --------------------------------------------------------------------------------


def _sample(sources: list[Source], settings: Settings, show: bool) -> list[str]:
    """A seeded sample of about tokenizer_sample_bytes of training documents (all of them when smaller)."""
    cap = settings.tokenizer_sample_bytes
    estimate = sum(s.size * (COMPRESSED_RATIO if s.compression or s.kind == ".parquet" else 1) for s in sources)
    keep = min(1.0, cap / max(estimate, 1))
    rng = random.Random(settings.seed)
    meter, picked, size, first = Meter(), [], 0, None
    with byte_progress(show) as bar:
        task = bar.add_task("reading a tokenizer sample", total=sum(s.size for s in sources)) if bar else None
        pieces = iter_pieces(sources, settings.text_field, meter, settings.invalid_utf8)
        numbered = _split_pieces(pieces, settings, True)
        for i, (_, piece, _, val) in enumerate(numbered):
            if bar and i % 256 == 0:
                bar.update(task, completed=meter.bytes)
            if val:
                continue
            first = piece if first is None else first
            if rng.random() >= keep:
                continue
            picked.append(piece)
            size += len(piece)
            if size >= cap:
                break
    # The estimate of the corpus size can make the draw miss every piece of a small or one-document corpus.
    return picked or ([first] if first is not None else [])


def tokenizer_for(sources: list[Source], settings: Settings, show: bool, times: dict):
    """The tokenizer trained on a sample of these sources, from the cache when it was trained before."""
    from tokenizers import Tokenizer

    key = _digest(
        {"sources": sources_fingerprint(sources), "settings": asdict(settings), "pretokenizer": PRETOKENIZER_VERSION}
    )
    path = cache_root() / "tokenizers" / f"{key[:32]}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # a damaged cache entry is trained again below
            pass
    t0 = time.perf_counter()
    sample = _sample(sources, settings, show)
    times["read_s"] = time.perf_counter() - t0
    if not sample:
        raise NoText(f"data.paths: no text found in {', '.join(str(s.path) for s in sources)}")
    t0 = time.perf_counter()
    if show and not console.is_terminal:  # the tokenizers library's own bars draw on a terminal only
        mb = sum(map(len, sample)) / 1e6
        console.print(f"training the tokenizer on a {mb:,.1f} MB sample", highlight=False)
    tok = train_tokenizer(sample, settings.vocab_size, show_progress=show and console.is_terminal)
    times["tokenizer_s"] = time.perf_counter() - t0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shards.write_atomic(path, tok.to_str())
    except (OSError, AtomicWriteError):
        pass  # the cache is an optimisation; a read-only or full home must not stop the work
    return tok


# ---- tokenizing in chunks (data/encoding.py: in worker processes) ---------------------------------


def _chunks(numbered, skip: int, chunk_bytes: int):
    """Chunks of (pieces, is_val flags, last flags, pieces read after it) of about chunk_bytes of text."""
    pieces, flags, lasts, size, done = [], [], [], 0, skip
    for i, (_, piece, last, val) in enumerate(numbered):
        if i < skip:  # already in the shards kept from a killed run
            continue
        pieces.append(piece)
        flags.append(val)
        lasts.append(last)
        size += len(piece)
        done = i + 1
        if size >= chunk_bytes:
            yield pieces, flags, lasts, done
            pieces, flags, lasts, size = [], [], [], 0
    if pieces:
        yield pieces, flags, lasts, done


# ---- the dataset directory ------------------------------------------------------------------------


def _dataset_tokenizer(out: Path, state: dict, given, sources, settings: Settings, show: bool, times: dict):
    """The tokenizer the dataset in `out` is (or was being) encoded with, written to out/tokenizer.json;
    (tokenizer, state): when it cannot be had again (a damaged tokenizer.json, a changed cache), the shards
    kept are dropped and `state` starts afresh."""
    want = state.get("tokenizer_hash")
    tok = given
    if tok is None and want and (out / shards.TOKENIZER).is_file():
        try:
            found = load_tokenizer(out / shards.TOKENIZER)
            tok = found if tokenizer_hash(found) == want else None
        except GptossError:
            tok = None
    if tok is None:
        tok = tokenizer_for(sources, settings, show, times)
    if want and tokenizer_hash(tok) != want:  # encoded with a tokenizer there is no way back to: redo it all
        resume.discard(out)
        state = resume.fresh_state(state["key"])
    state["tokenizer_hash"] = tokenizer_hash(tok)
    shards.write_atomic(out / shards.TOKENIZER, tok.to_str())
    shards.write_json(out / shards.PROGRESS, state)
    return tok, state


def prepare_dataset(
    sources: list[Source],
    out: Path,
    settings: Settings,
    tokenizer=None,
    workers: int = 0,
    show: bool = True,
    chunk_bytes: int | None = None,
    shard_tokens: int | None = None,
    flag: str | None = "--out",
) -> Result:
    """Prepare `sources` into `out` (or find them already prepared there, or continue an interrupted or damaged
    prepare). `tokenizer`: reuse this one instead of training one; `workers`: tokenizer processes (0 = all
    cores); `flag`: how the user named `out`, for errors (None: a cache entry train chose)."""
    out = Path(out)
    key = dataset_key(sources, settings, tokenizer_hash(tokenizer) if tokenizer is not None else TRAINED)
    found = resume.resume_at(out, key, flag)
    if found.complete:
        return Result(out, found.state, cached=True, tokenizer_trained=tokenizer is None)
    state = found.state or resume.fresh_state(key)
    out.mkdir(parents=True, exist_ok=True)
    shards.write_json(out / shards.PROGRESS, state)  # first: the directory is known as ours from now on
    times = {"read_s": 0.0, "tokenizer_s": 0.0}
    trained = tokenizer is None
    try:
        tokenizer, state = _dataset_tokenizer(out, state, tokenizer, sources, settings, show, times)
    except NoText:
        resume.discard(out)  # nothing worth keeping: leave no half-made dataset behind
        raise
    dtype = shards.dtype_for(tokenizer.get_vocab_size(with_added_tokens=True))
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise GptossError(f"tokenizer: has no {EOS} token")
    state.update(
        dtype=dtype.str,
        eos_id=eos,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        settings=asdict(settings),
        sources=[{"path": str(s.path), "size": s.size} for s in sources],
    )
    for tmp in out.glob("*.bin.tmp"):  # the half-written shards of a killed run
        tmp.unlink()
    sizes = (chunk_bytes or CHUNK_BYTES, shard_tokens or SHARD_TOKENS)
    times["tokenize_s"] = _tokenize(sources, out, settings, tokenizer, state, workers, show, *sizes)
    if state["train"]["tokens"] == 0:
        resume.discard(out)  # nothing worth keeping: leave no half-made dataset behind
        where = ", ".join(str(s.path) for s in sources)
        if state["val"]["tokens"]:
            raise GptossError(
                f"data.paths: every document of {where} went to validation (data.val_fraction="
                f"{settings.val_fraction}); add documents or lower data.val_fraction"
            )
        raise NoText(f"data.paths: no text found in {where}")
    state["complete"] = True
    state.pop("pieces_done", None)
    shards.write_json(out / shards.INDEX, state)
    (out / shards.PROGRESS).unlink(missing_ok=True)
    return Result(out, state, cached=False, tokenizer_trained=trained, times=times, redone=found.redone)


def _tokenize(sources, out: Path, settings, tokenizer, state: dict, workers, show, chunk_bytes, shard_tokens) -> float:
    """Encode every piece after state["pieces_done"] into the shards, closing a shard of each split (and
    recording it in progress.json) whenever one holds shard_tokens. Returns the seconds it took."""
    dtype, eos = np.dtype(state["dtype"]), state["eos_id"]
    writers = {
        split: shards.ShardWriter(out, split, dtype, first=len(state[split]["shards"])) for split in shards.SPLITS
    }
    pending_docs = {"train": 0, "val": 0}
    position = {"done": state["pieces_done"]}  # pieces in the chunks written so far

    def commit(done: int) -> None:
        for split, writer in writers.items():
            entry = writer.close_shard()
            if entry:
                entry.update(documents=pending_docs[split], pieces_done=done)
                state[split]["shards"].append(entry)
                state[split]["tokens"] += entry["tokens"]
            state["documents"][split] += pending_docs[split]
            pending_docs[split] = 0
        state["pieces_done"] = done
        shards.write_json(out / shards.PROGRESS, state)

    t0 = time.perf_counter()
    meter = Meter()
    pieces = iter_pieces(sources, settings.text_field, meter, settings.invalid_utf8)
    numbered = _split_pieces(pieces, settings, state["documents"]["val"] > 0)
    total = sum(s.size for s in sources)
    workers = workers or os.cpu_count() or 1
    with sigterm_unwinds():  # the pool's finally runs on SIGTERM too: no leaked semaphores at exit
        pool = None
        if workers > 1 and total > 2 * chunk_bytes:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=init_worker,
                initargs=(tokenizer.to_str(), os.getpid()),
            )
        try:
            with byte_progress(show) as bar:
                task = bar.add_task("tokenizing", total=total) if bar else None
                in_flight: deque = deque()

                def drain(limit: int) -> None:
                    while len(in_flight) > limit:
                        future, flags, lasts, done, read = in_flight.popleft()
                        train_ids, val_ids = future.result() if pool else future
                        writers["train"].write(train_ids)
                        writers["val"].write(val_ids)
                        ended = [v for v, end in zip(flags, lasts, strict=True) if end]
                        pending_docs["val"] += sum(ended)
                        pending_docs["train"] += len(ended) - sum(ended)
                        position["done"] = done
                        if writers["train"].tokens >= shard_tokens or writers["val"].tokens >= shard_tokens:
                            commit(done)
                        if bar:
                            bar.update(task, completed=read)

                for pieces, flags, lasts, done in _chunks(numbered, state["pieces_done"], chunk_bytes):
                    if pool:
                        job = pool.submit(_encode, pieces, flags, lasts, eos, dtype.str)
                    else:
                        job = _encode(pieces, flags, lasts, eos, dtype.str, tokenizer)
                    in_flight.append((job, flags, lasts, done, meter.bytes))
                    drain(2 * workers if pool else 0)
                drain(0)
                # The whole corpus was read once more (kept shards' pieces too): the count is the corpus's.
                state["invalid_utf8_bytes"] = meter.invalid_bytes
                commit(position["done"])
        except BaseException:
            for writer in writers.values():
                writer.abandon()  # completed shards stay; progress.json names them
            raise
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
    return time.perf_counter() - t0
