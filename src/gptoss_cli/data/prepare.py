"""`gptoss prepare`: documents -> tokenizer (trained once on a capped sample) -> token shards on disk.

Two streaming passes over the sources: one draws the tokenizer's training sample (skipped when the
tokenizer is given or already cached), one tokenizes every document in worker processes and appends the
ids to the shards of its split. Memory stays bounded: documents are read as generators, at most
2 x workers chunks of about `CHUNK_BYTES` are in flight, and shards go to disk as they fill.

Each document goes to validation when a hash of (seed, document number) falls under data.val_fraction
(and the last document does when no other did), so the split needs no list of documents. A shard of
each split is closed together at a chunk boundary, and progress.json then records how many documents
the closed shards hold: a killed prepare, run again, keeps them and tokenizes only the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import GptossError
from . import shards
from .corpus import Meter, Source, iter_documents
from .tokenizer import EOS, PRETOKENIZER_VERSION, tokenizer_hash, train_tokenizer

CHUNK_BYTES = 1 << 20  # text per worker task: ~0.5 s of encoding, small enough to keep memory flat
SHARD_TOKENS = 1 << 26  # tokens per train shard (128 MiB at uint16)
COMPRESSED_RATIO = 4  # a guess of text bytes per stored byte of .gz/.zst/.parquet, for sampling only


@dataclass(frozen=True)
class Settings:
    """Everything besides the sources that decides the shards' content."""

    vocab_size: int
    text_field: str = "text"
    val_fraction: float = 0.05
    seed: int = 1337
    tokenizer_sample_bytes: int = 64 << 20


@dataclass
class Result:
    root: Path
    index: dict
    cached: bool  # the dataset was already complete: nothing was read or tokenized
    tokenizer_trained: bool
    times: dict = field(default_factory=dict)  # read_s, tokenizer_s, tokenize_s


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


def _split_documents(docs, settings: Settings, seen_val: bool):
    """(number, text, is_val) for every document; one look-ahead so the last can go to validation."""
    prev = None
    for n, doc in enumerate(docs):
        if prev is not None:
            yield prev
        prev = (n, doc, _is_val(settings.seed, n, settings.val_fraction))
        seen_val = seen_val or prev[2]
    if prev is not None:
        n, doc, val = prev
        yield n, doc, val or (not seen_val and settings.val_fraction > 0 and n >= 1)


# ---- progress bars --------------------------------------------------------------------------------


def _bar(show: bool):
    if not show:
        return nullcontext(None)
    from rich import progress as rp

    from ..output import console

    return rp.Progress(
        rp.TextColumn("{task.description}"),
        rp.BarColumn(),
        rp.DownloadColumn(),
        rp.TransferSpeedColumn(),
        rp.TimeRemainingColumn(),
        console=console,
        transient=True,
    )


# ---- the tokenizer --------------------------------------------------------------------------------


def _sample(sources: list[Source], settings: Settings, show: bool) -> list[str]:
    """A seeded sample of about tokenizer_sample_bytes of training documents (all of them when smaller)."""
    cap = settings.tokenizer_sample_bytes
    estimate = sum(s.size * (COMPRESSED_RATIO if s.compression or s.kind == ".parquet" else 1) for s in sources)
    keep = min(1.0, cap / max(estimate, 1))
    rng = random.Random(settings.seed)
    meter, picked, size = Meter(), [], 0
    with _bar(show) as bar:
        task = bar.add_task("reading a tokenizer sample", total=sum(s.size for s in sources)) if bar else None
        for n, doc, val in _split_documents(iter_documents(sources, settings.text_field, meter), settings, True):
            if bar and n % 256 == 0:
                bar.update(task, completed=meter.bytes)
            if val or rng.random() >= keep:
                continue
            picked.append(doc)
            size += len(doc)
            if size >= cap:
                break
    return picked


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
        raise GptossError(f"data.paths: no text found in {', '.join(str(s.path) for s in sources)}")
    t0 = time.perf_counter()
    tok = train_tokenizer(sample, settings.vocab_size, show_progress=show)
    times["tokenizer_s"] = time.perf_counter() - t0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shards.write_atomic(path, tok.to_str())
    except OSError:
        pass  # the cache is an optimisation; a read-only home must not stop the work
    return tok


# ---- tokenizing in worker processes ---------------------------------------------------------------

_WORKER_TOKENIZER = None


def _init_worker(tok_json: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(tok_json)


def _encode(docs: list[str], val: list[bool], eos: int, dtype: str, tok=None) -> tuple[np.ndarray, np.ndarray]:
    """A chunk of documents -> (train ids, val ids), each document followed by <|endoftext|>."""
    tok = tok or _WORKER_TOKENIZER
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster where available
    out: tuple[list[int], list[int]] = ([], [])
    for enc, is_val in zip(encode(docs), val, strict=True):
        ids = out[is_val]
        ids.extend(enc.ids)
        ids.append(eos)
    return np.array(out[0], dtype=dtype), np.array(out[1], dtype=dtype)


def _chunks(numbered, skip: int, chunk_bytes: int):
    """Chunks of (docs, is_val flags, number of documents after it) of about chunk_bytes of text."""
    docs, flags, size, last = [], [], 0, skip
    for n, doc, val in numbered:
        if n < skip:  # already in the shards kept from a killed run
            continue
        docs.append(doc)
        flags.append(val)
        size += len(doc)
        last = n + 1
        if size >= chunk_bytes:
            yield docs, flags, last
            docs, flags, size = [], [], 0
    if docs:
        yield docs, flags, last


# ---- the dataset directory ------------------------------------------------------------------------


def _start(out: Path, key: str) -> dict | None:
    """The progress of an interrupted prepare of the same data into `out`, None for a fresh start;
    a one-line error when `out` holds anything else (nothing is overwritten)."""
    if (out / shards.INDEX).is_file():
        index = shards.read_json(out / shards.INDEX)
        if index.get("key") != key:
            raise GptossError(
                f"{out}: already holds a prepared dataset of other data or settings; "
                "choose another --out (nothing was changed)"
            )
        return index
    if (out / shards.PROGRESS).is_file():
        progress = shards.read_json(out / shards.PROGRESS)
        if progress.get("key") != key:
            raise GptossError(
                f"{out}: holds an unfinished prepare of other data or settings; delete it or choose another --out"
            )
        return progress
    if out.exists() and (not out.is_dir() or any(p.name != ".lock" for p in out.iterdir())):
        raise GptossError(f"{out}: exists and is not a prepared dataset; choose a new or empty --out")
    return None


def prepare_dataset(
    sources: list[Source],
    out: Path,
    settings: Settings,
    tokenizer=None,
    workers: int = 0,
    show: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
    shard_tokens: int = SHARD_TOKENS,
) -> Result:
    """Prepare `sources` into `out` (or find them already prepared there). `tokenizer`: reuse this one
    instead of training one; `workers`: tokenizer processes (0 = all cores)."""
    from ..output import console

    show = show and console.is_terminal  # a bar on a pipe or a log file is only noise
    out = Path(out)
    key = dataset_key(sources, settings, tokenizer_hash(tokenizer) if tokenizer is not None else TRAINED)
    state = _start(out, key)
    if state is not None and state.get("complete"):
        return Result(out, state, cached=True, tokenizer_trained=tokenizer is None)
    fresh = state is None
    times = {"read_s": 0.0, "tokenizer_s": 0.0}
    trained = tokenizer is None
    if not fresh and (out / shards.TOKENIZER).is_file():
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(out / shards.TOKENIZER)
    elif tokenizer is None:
        tokenizer = tokenizer_for(sources, settings, show, times)
    out.mkdir(parents=True, exist_ok=True)
    shards.write_atomic(out / shards.TOKENIZER, tokenizer.to_str())

    dtype = shards.dtype_for(tokenizer.get_vocab_size(with_added_tokens=True))
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise GptossError(f"tokenizer: has no {EOS} token")
    state = state or {
        "format": shards.FORMAT,
        "key": key,
        "train": {"tokens": 0, "shards": []},
        "val": {"tokens": 0, "shards": []},
        "documents": {"train": 0, "val": 0},
        "docs_done": 0,
    }
    state.update(
        tokenizer_hash=tokenizer_hash(tokenizer),
        dtype=dtype.str,
        eos_id=eos,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        settings=asdict(settings),
        sources=[{"path": str(s.path), "size": s.size} for s in sources],
    )
    writers = {
        split: shards.ShardWriter(out, split, dtype, first=len(state[split]["shards"])) for split in shards.SPLITS
    }
    for tmp in out.glob("*.bin.tmp"):  # the half-written shards of a killed run
        tmp.unlink()
    pending_docs = {"train": 0, "val": 0}
    position = {"done": state["docs_done"]}  # documents in the chunks written so far

    def commit(done: int) -> None:
        for split, writer in writers.items():
            entry = writer.close_shard()
            if entry:
                state[split]["shards"].append(entry)
                state[split]["tokens"] += entry["tokens"]
            state["documents"][split] += pending_docs[split]
            pending_docs[split] = 0
        state["docs_done"] = done
        shards.write_json(out / shards.PROGRESS, state)

    t0 = time.perf_counter()
    meter = Meter()
    numbered = _split_documents(
        iter_documents(sources, settings.text_field, meter), settings, state["documents"]["val"] > 0
    )
    total = sum(s.size for s in sources)
    workers = workers or os.cpu_count() or 1
    pool = None
    if workers > 1 and total > 2 * chunk_bytes:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(tokenizer.to_str(),),
        )
    try:
        with _bar(show) as bar:
            task = bar.add_task("tokenizing", total=total) if bar else None
            in_flight: deque = deque()

            def drain(limit: int) -> None:
                while len(in_flight) > limit:
                    future, flags, done, read = in_flight.popleft()
                    train_ids, val_ids = future.result() if pool else future
                    writers["train"].write(train_ids)
                    writers["val"].write(val_ids)
                    pending_docs["val"] += sum(flags)
                    pending_docs["train"] += len(flags) - sum(flags)
                    position["done"] = done
                    if writers["train"].tokens >= shard_tokens or writers["val"].tokens >= shard_tokens:
                        commit(done)
                    if bar:
                        bar.update(task, completed=read)

            for docs, flags, done in _chunks(numbered, state["docs_done"], chunk_bytes):
                if pool:
                    job = pool.submit(_encode, docs, flags, eos, dtype.str)
                else:
                    job = _encode(docs, flags, eos, dtype.str, tokenizer)
                in_flight.append((job, flags, done, meter.bytes))
                drain(2 * workers if pool else 0)
            drain(0)
            commit(position["done"])
    except BaseException:
        for writer in writers.values():
            writer.abandon()  # completed shards stay; progress.json names them
        raise
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    times["tokenize_s"] = time.perf_counter() - t0
    if state["train"]["tokens"] == 0:
        if fresh:  # nothing worth keeping: leave no half-made dataset behind
            for name in (shards.PROGRESS, shards.TOKENIZER, *(e["file"] for e in state["val"]["shards"])):
                (out / name).unlink(missing_ok=True)
        where = ", ".join(str(s.path) for s in sources)
        raise GptossError(f"data.paths: no text found in {where}")
    state["complete"] = True
    state.pop("docs_done", None)
    shards.write_json(out / shards.INDEX, state)
    (out / shards.PROGRESS).unlink(missing_ok=True)
    return Result(out, state, cached=False, tokenizer_trained=trained, times=times)
