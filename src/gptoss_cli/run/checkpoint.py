"""Checkpoints: safetensors weights and trainer state, written atomically, loaded without unpickling.

    RUN/checkpoints/step-00000100/
        model.safetensors     weights keyed by openai/gpt-oss names; a tied unembedding is stored once
        trainer.safetensors   AdamW moments and RNG states (tensors only)
        state.json            step, epoch, data position, scheduler, optimizer hyper-parameters, hashes

A checkpoint is written into a hidden temporary directory, fsynced, then renamed into place, so a crash
or a kill mid-write leaves the previous checkpoint intact and never a directory that looks complete.
Loading picks the newest `step-*` directory whose files are all present and whose state.json parses.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import GptossError

STEP_PREFIX = "step-"
FILES = ("model.safetensors", "trainer.safetensors", "state.json")


class CheckpointError(GptossError):
    pass


def weights_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, each shared tensor once (named_parameters de-duplicates tied weights)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters()}


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load model.safetensors into `model`, naming the first missing, extra or mis-shaped tensor."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read weights ({err})") from None
    expected = dict(model.named_parameters())
    for name, p in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name} is missing")
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, the config expects {tuple(p.shape)}"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]} (was it saved from another config?)")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(tensors[name])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def save_checkpoint(ckpt_root: Path, step: int, weights: dict[str, torch.Tensor],
                    trainer_tensors: dict[str, torch.Tensor], state: dict[str, Any], keep: int) -> Path:
    """Write one checkpoint atomically and keep the newest `keep`. Returns its directory."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        save_file({k: v.cpu().contiguous() for k, v in trainer_tensors.items()}, str(tmp / "trainer.safetensors"))
        # state.json last: its presence is part of what makes a directory a checkpoint.
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        for name in ("model.safetensors", "trainer.safetensors"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. resumed, then interrupted): replace it
            old = ckpt_root / f".old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(ckpt_root)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            previous = list_checkpoints(ckpt_root)
            kept = (f"the previous checkpoint is intact ({previous[-1].name})" if previous
                    else "no checkpoint was saved before this one")
            raise CheckpointError(f"could not save checkpoint {final.name} ({err.strerror or err}); {kept}") from None
        raise
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _is_valid(path: Path) -> bool:
    if not all((path / f).is_file() for f in FILES):
        return False
    try:
        json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Valid checkpoint directories, oldest first (temporary and incomplete ones are skipped)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit() and _is_valid(p):
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def resolve_checkpoint(path: Path) -> Path:
    """A run directory, its checkpoints/ folder or one step directory -> the checkpoint to load."""
    path = Path(path)
    if path.is_file() and path.name == "model.safetensors":
        path = path.parent
    if (path / "state.json").is_file() or (path / "model.safetensors").is_file():
        if not _is_valid(path):
            raise CheckpointError(f"{path}: incomplete or corrupt checkpoint (needs {', '.join(FILES)})")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(f"no complete checkpoint under {path}")
    return found[-1]


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))


def read_trainer_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt / "trainer.safetensors"))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{ckpt}: cannot read trainer state ({err})") from None


# ---- optimizer state as tensors + JSON (no pickle) ----------------------------------------------
# The state is keyed by parameter name (torch.distributed.checkpoint's full optimizer state dict), so it
# does not depend on how many processes trained it or how they sharded it.

def optimizer_to_tensors(osd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{name}.{key}"] = value
            else:
                scalars[f"{name}.{key}"] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict[str, Any]] = {}
    for full, value in tensors.items():
        if full.startswith("optim."):
            name, key = full[len("optim."):].rsplit(".", 1)
            state.setdefault(name, {})[key] = value
    for full, value in meta.get("scalars", {}).items():
        name, key = full.rsplit(".", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
