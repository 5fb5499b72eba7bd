"""Training text: find documents, split train/validation, tokenize (cached), and serve batches.

What one document is:
- `.txt` files: documents are separated by one or more blank lines (a file without blank lines is one
  document);
- `.jsonl` files: each line is a JSON object and its `text` field is one document;
- a directory means every .txt/.jsonl file below it (sorted); a glob means every match (sorted);
- no paths at all means the built-in sample corpus shipped with the package.

Documents are joined into one token stream with `<|endoftext|>` after each. Training samples are the
non-overlapping windows stream[i*T : i*T + T + 1] (inputs and next-token targets), visited in an order
that is a pure function of (seed, epoch), so a data position (epoch, batch) is all resume needs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import GptossError

SUFFIXES = (".txt", ".jsonl")


def builtin_corpus_text() -> str:
    return resources.files("gptoss_cli").joinpath("assets/sample_corpus.txt").read_text(encoding="utf-8")


def _split_paragraphs(text: str) -> list[str]:
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def _expand(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise GptossError(f"data.paths: directory {spec} holds no .txt or .jsonl files")
        return files
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise GptossError(f"data.paths: {spec} is neither .txt nor .jsonl")
        return [path]
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)
                       if Path(p).suffix in SUFFIXES and Path(p).is_file())
        if not files:
            raise GptossError(f"data.paths: pattern {spec} matches no .txt or .jsonl files")
        return files
    raise GptossError(f"data.paths: {spec} does not exist")


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise GptossError(f"{path}:{n}: invalid JSON ({err.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise GptossError(f"{path}:{n}: expected an object with a string 'text' field")
            if obj["text"].strip():
                docs.append(obj["text"])
    return docs


def load_documents(paths: list[str]) -> list[str]:
    """All documents named by data.paths (or the built-in corpus), in a stable order."""
    if not paths:
        return _split_paragraphs(builtin_corpus_text())
    docs = []
    for spec in paths:
        for path in _expand(spec):
            try:
                if path.suffix == ".jsonl":
                    docs.extend(_read_jsonl(path))
                else:
                    docs.extend(_split_paragraphs(path.read_text(encoding="utf-8")))
            except UnicodeDecodeError:
                raise GptossError(f"{path}: not UTF-8 text") from None
            except OSError as err:
                raise GptossError(f"{path}: cannot read ({err.strerror or err})") from None
    if not docs:
        raise GptossError(f"data.paths: no text found in {', '.join(paths)}")
    return docs


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split: a seeded shuffle of document indices; at least one validation document
    whenever val_fraction > 0 and there are two or more documents."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = round(len(docs) * val_fraction)
    if val_fraction > 0 and len(docs) >= 2:
        n_val = max(1, min(n_val, len(docs) - 1))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


def _cache_dir() -> Path:
    root = os.environ.get("GPTOSS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gptoss")
    return Path(root) / "tokens"


def tokenize_stream(docs: list[str], tokenizer, tok_hash: str) -> torch.Tensor:
    """Documents -> one int32 stream, each followed by <|endoftext|>. Cached by content and tokenizer."""
    from .tokenizer import EOS

    h = hashlib.sha256(tok_hash.encode())
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8")).digest())
    path = _cache_dir() / f"{h.hexdigest()[:32]}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["tokens"]
        except Exception:  # a damaged cache entry is rebuilt below
            pass
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.int32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"tokens": stream}, str(tmp))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old entry or the new one
    except OSError:
        pass  # the cache is an optimisation; a read-only home must not stop training
    return stream


@dataclass
class TokenBatches:
    """Fixed-length samples from a token stream, in a per-epoch order derived from (seed, epoch)."""

    stream: torch.Tensor  # (N,) int32
    seq_len: int
    batch_size: int
    seed: int

    @property
    def num_samples(self) -> int:
        return max(0, (self.stream.numel() - 1) // self.seq_len)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def batch(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` of `epoch` -> inputs, targets (B/world, T) int64; rank takes its slice."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_samples, generator=g)
        picks = order[index * self.batch_size:(index + 1) * self.batch_size]
        per_rank = self.batch_size // world
        picks = picks[rank * per_rank:(rank + 1) * per_rank]
        return self._gather(picks)

    def _gather(self, picks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = picks * self.seq_len
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None]  # (B, T+1)
        rows = self.stream[idx].long()
        return rows[:, :-1], rows[:, 1:]

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first n batches in stream order (fixed, so validation losses compare across steps)."""
        total = min(n, max(1, -(-self.num_samples // self.batch_size)))
        return [self._gather(torch.arange(i * self.batch_size, min((i + 1) * self.batch_size, self.num_samples)))
                for i in range(total) if i * self.batch_size < self.num_samples]
