"""Where a prepare of one dataset directory stands, so a killed or damaged one is continued, never refused.

A prepare writes progress.json into its directory before anything else, and rewrites it each time it
closes a shard of each split; every shard entry records how many pieces of the corpus (documents, or pieces
of a long one: data/corpus.py) had been read when it was closed, and how many documents it ends. So:
- a complete dataset (index.json) whose shards are intact is already prepared;
- an unfinished one (progress.json) keeps the shards it finished, each checked against its sha256, and the
  rest is prepared again from where they end;
- either one with a damaged shard (missing, another size, another checksum) keeps the shards closed before
  the first damaged one and prepares the rest again, so "prepare the data again" always works;
- a directory holding only what an interrupted prepare of an older gptoss writes is started afresh.
Anything else in the directory is refused and left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import GptossError
from . import shards

# What a prepare writes into its directory, and nothing else (the hidden atomic-write siblings included).
_OWN = re.compile(
    r"^(?:(?:train|val)-\d{5}\.bin(?:\.tmp)?|tokenizer\.json|progress\.json|index\.json|\.lock"
    r"|\.(?:tokenizer|progress|index)\.json\.tmp-\d+)$"
)


@dataclass
class Resume:
    state: dict | None  # None: start afresh
    complete: bool = False  # an intact, finished dataset: nothing to do
    redone: list[str] = field(default_factory=list)  # damaged shard files, dropped with those after them


def fresh_state(key: str) -> dict:
    return {
        "format": shards.FORMAT,
        "key": key,
        "train": {"tokens": 0, "shards": []},
        "val": {"tokens": 0, "shards": []},
        "documents": {"train": 0, "val": 0},
        "pieces_done": 0,
    }


def _advice(out: Path, flag: str | None, keep: bool = False) -> str:
    """What to do about `out`: `flag` names it (None: train's own cache entry, which the user never named);
    `keep`: it holds a finished dataset, so deleting it is not the advice."""
    if flag is None:
        return f"delete {out} (a gptoss data cache entry) and run again"
    return f"choose another {flag}" if keep else f"delete it or choose another {flag}"


def resume_at(out: Path, key: str, flag: str | None = "--out") -> Resume:
    """How to go on in `out` for the dataset `key`. `flag`: how the user named `out` (None: a cache entry).
    A one-line error when `out` holds anything else (nothing is changed then)."""
    if (out / shards.INDEX).is_file():
        state = shards.read_json(out / shards.INDEX)
        if state.get("key") != key:
            raise GptossError(
                f"{out}: already holds a prepared dataset of other data or settings; {_advice(out, flag, keep=True)} "
                "(nothing was changed)"
            )
        return _checked(out, state, full=False)
    if (out / shards.PROGRESS).is_file():
        state = shards.read_json(out / shards.PROGRESS)
        if state.get("key") != key and _finished_shards(state):
            raise GptossError(f"{out}: holds an unfinished prepare of other data or settings; {_advice(out, flag)}")
        if state.get("key") != key:  # it stopped before finishing a shard (e.g. refused bad bytes): nothing to lose
            discard(out)
            return Resume(None)
        return _checked(out, state, full=True)
    if out.exists() and not out.is_dir():
        raise GptossError(f"{out}: exists and is not a directory; {_advice(out, flag, keep=True)}")
    if out.is_dir():
        other = [p.name for p in out.iterdir() if not _OWN.match(p.name)]
        if other:
            advice = _advice(out, None) if flag is None else f"choose a new or empty {flag}"
            raise GptossError(f"{out}: exists and is not a prepared dataset (it holds {other[0]}); {advice}")
        discard(out)  # an older gptoss's interrupted prepare, before it wrote progress.json first
    return Resume(None)


def _finished_shards(state: dict) -> int:
    return sum(len(state.get(split, {}).get("shards", [])) for split in shards.SPLITS)


def _checked(out: Path, state: dict, full: bool) -> Resume:
    """`state` (an index or a progress) with its shards checked (`full`: every sha256; else as training
    checks them); rolled back to before the first damaged shard."""
    if "pieces_done" not in state and not state.get("complete"):  # an older format of progress: start afresh
        discard(out)
        return Resume(None)
    dtype = np.dtype(state.get("dtype", "<u2"))
    entries = [(split, e) for split in shards.SPLITS for e in state[split]["shards"]]
    bad = [e for _, e in entries if shards.shard_problem(out, e, dtype, full)]
    if not bad:
        return Resume(state, complete=bool(state.get("complete")))
    if any("pieces_done" not in e for _, e in entries):  # an index of an older gptoss: no way back, redo all
        cut = 0
    else:
        cut = min(e["pieces_done"] for e in bad)
    kept = {split: [e for e in state[split]["shards"] if cut and e["pieces_done"] < cut] for split in shards.SPLITS}
    dropped = [e["file"] for _, e in entries if e not in kept["train"] and e not in kept["val"]]
    for name in dropped:
        (out / name).unlink(missing_ok=True)
    state = {k: v for k, v in state.items() if k != "complete"}
    for split in shards.SPLITS:
        state[split] = {"tokens": sum(e["tokens"] for e in kept[split]), "shards": kept[split]}
        state["documents"][split] = sum(e["documents"] for e in kept[split])
    state["pieces_done"] = max((e["pieces_done"] for s in shards.SPLITS for e in kept[s]), default=0)
    shards.write_json(out / shards.PROGRESS, state)
    (out / shards.INDEX).unlink(missing_ok=True)
    return Resume(state, redone=[e["file"] for e in bad])


def discard(out: Path) -> None:
    """Remove what a prepare wrote into `out` (only its own files), to start afresh."""
    for path in out.iterdir():
        if _OWN.match(path.name) and path.name != ".lock":
            path.unlink(missing_ok=True)
