"""A LoRA run's base: the checkpoint whose frozen weights its adapters apply to, recorded and verified.

A LoRA run's checkpoints hold its adapters alone (model.safetensors: the `*.lora_A` / `*.lora_B` tensors,
model/lora.py). The base weights stay in the checkpoint the run started from (`train --init-from`, often
an imported release), so fine-tuning gpt-oss-20b saves megabytes per checkpoint and never a copy of the
base. Every checkpoint's state.json names it:

    "base": {"checkpoint": "/abs/path/runs/gpt-oss-20b/checkpoints/step-00000000",
             "relative": "../gpt-oss-20b/checkpoints/step-00000000",    from the LoRA run's directory
             "bytes": 13766..., "mtime_ns": 17..., "sha256": "9f2c..."}  of the base's model.safetensors

Opening a LoRA run looks for the base at the recorded path, then at the relative one (a runs/ folder moved
or copied whole still opens), and checks its weights file: the size always, the sha256 whenever the file's
modification time is not the recorded one. So an untouched base is not read twice, and a copied, rewritten
or swapped one is hashed and refused unless it holds the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data.shards import file_sha256
from ..errors import GptossError
from .layout import MODEL, RunDir


def record_base(checkpoint: Path, run: RunDir) -> dict:
    """The record of `checkpoint` (a step directory) as the base of the LoRA run `run`; hashes its weights."""
    checkpoint = Path(checkpoint).resolve()
    weights = checkpoint / MODEL
    stat = weights.stat()
    return {
        "checkpoint": str(checkpoint),
        "relative": os.path.relpath(checkpoint, run.path.resolve()),
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": file_sha256(weights),
    }


def find_base(record: dict, run: RunDir, where: str) -> Path:
    """The base checkpoint `record` names, verified (see the module docstring); `where` names the LoRA
    checkpoint in errors."""
    if not isinstance(record, dict) or not {"checkpoint", "bytes", "sha256"} <= set(record):
        raise GptossError(f"{where}: the record of its base checkpoint is damaged (state.json 'base')")
    candidates = [Path(record["checkpoint"])]
    if record.get("relative"):
        candidates.append(run.path / record["relative"])
    found = next((c for c in candidates if (c / MODEL).is_file()), None)
    if found is None:
        raise GptossError(
            f"{where} holds LoRA adapters for the base checkpoint {record['checkpoint']}, which is gone "
            f"(looked there and at {candidates[-1]}); put the base back to use this run"
        )
    weights = found / MODEL
    stat = weights.stat()
    if stat.st_size == record["bytes"] and stat.st_mtime_ns == record.get("mtime_ns"):
        return found  # untouched since the run recorded it
    if stat.st_size != record["bytes"] or file_sha256(weights) != record["sha256"]:
        raise GptossError(
            f"{where} holds LoRA adapters for other base weights than {weights} now holds (size or sha256 "
            "differ): the adapters only make sense on the weights they were trained on"
        )
    return found
