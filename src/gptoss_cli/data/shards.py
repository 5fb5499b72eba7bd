"""The prepared-dataset format on disk: token shards plus one JSON index, written atomically.

A prepared dataset is a directory:
    index.json          format version, tokenizer hash, dtype, the shards of each split (file, tokens,
                        sha256, mtime), the sources (path, size) and the settings it was made with
    tokenizer.json      the tokenizer the shards were encoded with
    train-00000.bin ... raw little-endian token ids (uint16 when the vocabulary fits, else uint32),
    val-00000.bin  ...  every document followed by <|endoftext|>
    progress.json       while `prepare` runs (written first, before anything else): the completed shards
                        and how far into the corpus they reach, so a killed prepare continues from there

Each shard is written as `NAME.tmp` and renamed when complete, so a reader sees whole shards or none.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_atomic
from ..errors import GptossError

FORMAT = 1
INDEX = "index.json"
PROGRESS = "progress.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Appends token arrays to `PREFIX-NNNNN.bin.tmp`; `close_shard()` makes it `PREFIX-NNNNN.bin`."""

    def __init__(self, out: Path, prefix: str, dtype: np.dtype, first: int = 0):
        self.out, self.prefix, self.dtype = out, prefix, dtype
        self.number = first
        self.file = None
        self.tokens = 0
        self.hash = hashlib.sha256()

    @property
    def path(self) -> Path:
        return self.out / f"{self.prefix}-{self.number:05d}.bin.tmp"

    def write(self, ids: np.ndarray) -> None:
        data = ids.astype(self.dtype, copy=False).tobytes()
        try:  # a full disk names the shard (a file object's write error carries no path)
            if self.file is None:
                self.file = open(self.path, "wb")  # noqa: SIM115
            self.file.write(data)
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(self.path)) from None
        self.hash.update(data)
        self.tokens += ids.size

    def close_shard(self) -> dict | None:
        """Finish the open shard (fsync + rename) and return its index entry; None when nothing was written."""
        if self.file is None:
            return None
        tmp = self.path
        final = tmp.with_suffix("")  # drop ".tmp"
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(tmp, final)
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(tmp)) from None
        entry = {
            "file": final.name,
            "tokens": self.tokens,
            "sha256": self.hash.hexdigest(),
            "mtime_ns": final.stat().st_mtime_ns,
        }
        self.number += 1
        self.file, self.tokens, self.hash = None, 0, hashlib.sha256()
        return entry

    def abandon(self) -> None:
        """Drop the open shard (after an error: its buffer may not even flush on a full disk)."""
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.path.unlink(missing_ok=True)
            self.file = None


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=1))


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise GptossError(f"{path}: not a readable prepared-dataset index ({err})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("format"), int):
        raise GptossError(f"{path}: not a prepared-dataset index (no format version)")
    if obj["format"] > FORMAT:
        raise GptossError(
            f"{path}: written by a newer gptoss (format {obj['format']}, this one reads "
            f"up to {FORMAT}); upgrade gptoss or prepare the data again"
        )
    return obj


def read_index(root: Path) -> dict:
    """The index of a complete prepared dataset in `root`, or a one-line error naming what is wrong."""
    path = root / INDEX
    if not path.is_file():
        if (root / PROGRESS).is_file():
            raise GptossError(f"{root}: preparation did not finish; run `gptoss prepare` again to complete it")
        raise GptossError(f"{root}: not a prepared dataset (no {INDEX}); make one with `gptoss prepare`")
    index = read_json(path)
    for key in ("tokenizer_hash", "dtype", "train", "val"):
        if key not in index:
            raise GptossError(f"{path}: no {key!r} entry; prepare the data again")
    return index


@dataclass
class Split:
    """One split's shards, memory-mapped: `arrays[i]` is shard i as a read-only (tokens,) array."""

    arrays: list[np.ndarray]

    @property
    def tokens(self) -> int:
        return sum(a.size for a in self.arrays)


def shard_problem(root: Path, entry: dict, dtype: np.dtype, full: bool = False) -> str | None:
    """What is wrong with one shard of an index, None when nothing: missing, another size, or (when its
    modification time changed, or always with `full`) another sha256."""
    path = root / entry["file"]
    try:
        st = path.stat()
    except OSError:
        return "shard missing"
    if st.st_size != entry["tokens"] * dtype.itemsize:
        return f"shard has {st.st_size} bytes, the index says {entry['tokens'] * dtype.itemsize}"
    if (full or st.st_mtime_ns != entry.get("mtime_ns")) and file_sha256(path) != entry["sha256"]:
        return "shard checksum mismatch (corrupted)"
    return None


def open_split(root: Path, index: dict, split: str) -> Split:
    """Memory-map the shards of `split`, each checked by shard_problem (the sha256 only when its mtime
    changed); `gptoss prepare` with the same arguments redoes a shard refused here."""
    dtype = np.dtype(index["dtype"])
    arrays = []
    for entry in index[split]["shards"]:
        problem = shard_problem(root, entry, dtype)
        if problem:
            raise GptossError(f"{root / entry['file']}: {problem}; prepare the data again")
        if entry["tokens"]:
            arrays.append(np.memmap(root / entry["file"], dtype=dtype, mode="r"))
    return Split(arrays)
