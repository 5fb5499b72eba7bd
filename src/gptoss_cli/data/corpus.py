"""Training text: find documents named by data.paths and split them into train and validation.

What one document is:
- `.txt` files: documents are separated by one or more blank lines (a file without blank lines is one
  document);
- `.jsonl` files: each line is a JSON object and its `text` field is one document;
- a directory means every .txt/.jsonl file below it (sorted); a glob means every match (sorted);
- no paths at all means the built-in sample corpus shipped with the package.
"""

from __future__ import annotations

import glob
import json
import os
import random
from importlib import resources
from pathlib import Path

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


def expand_paths(spec: str) -> list[Path]:
    """One data.paths entry -> its files (data/conversations.py reads the same paths)."""
    return _expand(spec)
