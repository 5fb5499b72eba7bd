"""Checkpoints: safetensors weights and trainer state, written atomically, loaded without unpickling.

    RUN/checkpoints/step-00000100/
        model.safetensors     weights keyed by openai/gpt-oss names; a tied unembedding is stored once;
                              MXFP4 experts as `<name>.blocks` / `<name>.scales` uint8 (model/mxfp4.py);
                              a LoRA run's: its adapters alone, `<name>.lora_A` / `.lora_B` (its base
                              checkpoint is named in state.json, run/base.py)
        trainer.safetensors   AdamW moments and RNG states (tensors only)
        state.json            CheckpointState: step, epoch, data position, optimizer hyper-parameters, hashes

A checkpoint is built in a hidden sibling directory and renamed into place (atomic.py), so a crash or
a kill mid-write leaves the previous checkpoint intact and never a directory that looks complete.
Loading picks the newest `step-*` directory whose files are all present and whose state.json parses.
The safetensors names and the state.json fields are the on-disk contract: checkpoints written by
earlier versions load unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..atomic import AtomicWriteError, remove_stale, staged_directory
from ..errors import GptossError
from ..model.mxfp4 import SUFFIXES, dequantize
from .layout import CHECKPOINTS, MODEL, STATE, TRAINER

STEP_PREFIX = "step-"
FINITE_CHUNK = 1 << 24  # elements per isfinite check
FILES = (MODEL, TRAINER, STATE)
FORMAT = 1


class CheckpointError(GptossError):
    pass


@dataclass
class CheckpointState:
    """state.json. Optional fields absent from a file stay None and are not written back."""

    step: int = 0
    format: int = FORMAT
    epoch: int | None = None
    batch_idx: int | None = None
    tokens: int | None = None
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    epoch_loss: list | None = None  # running [sum, count] of the current epoch
    elapsed_s: float | None = None
    tokenizer_hash: str | None = None
    world_size: int | None = None
    python_rng: list | None = None  # random.getstate() as JSON lists
    optimizer: dict | None = None  # param_groups + non-tensor state (optimizer_to_tensors)
    config: dict | None = None  # the RunConfig the weights were saved with
    imported_from: str | None = None
    source_layout: str | None = None
    quantization: str | None = None
    base: dict | None = None  # a LoRA run's base checkpoint (run/base.py); model.safetensors holds adapters only
    extra: dict[str, Any] = field(default_factory=dict)  # fields of a newer writer, kept as they are

    @classmethod
    def from_json(cls, raw: Any, source: str) -> CheckpointState:
        if not isinstance(raw, dict) or not isinstance(raw.get("step", 0), int):
            raise CheckpointError(f"{source}: not a checkpoint state (expected an object with an integer step)")
        if raw.get("format", FORMAT) > FORMAT:
            raise CheckpointError(f"{source}: written by a newer gptoss (state format {raw['format']}); upgrade gptoss")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in raw.items() if k in known}, extra={k: v for k, v in raw.items() if k not in known}
        )

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra" and v is not None}
        return out | self.extra


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of `model`, by name: its parameters, each shared tensor once
    (named_parameters de-duplicates tied weights), and its persistent buffers (packed MXFP4 experts)."""
    out = dict(model.named_parameters())
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def weights_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model_tensors, detached and contiguous: ready to save."""
    return {name: t.detach().contiguous() for name, t in model_tensors(model).items()}


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file, read from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read weights ({err})") from None


def packed_weights(names) -> set[str]:
    """The weights stored as MXFP4 `<name>.blocks` + `<name>.scales`, by their unpacked name."""
    return {n[: -len(SUFFIXES[0])] for n in names if n.endswith(SUFFIXES[0])}


def read_weights(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """model.safetensors, checked against `expected` {name: shape}: the first missing, extra or mis-shaped
    tensor is named."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read weights ({err})") from None
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name} is missing")
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, the config expects {tuple(shape)}"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]} (was it saved from another config?)")
    return tensors


def read_adapters(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's adapters: its model.safetensors, checked against the config by the LoRA transform."""
    try:
        return load_file(str(checkpoint / MODEL))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{checkpoint / MODEL}: cannot read adapters ({err})") from None


def load_weights(model: torch.nn.Module, path: Path, *, frozen: bool = False) -> None:
    """Load model.safetensors into `model` (shapes checked first), one tensor at a time (the file is read
    through a memory map). MXFP4 experts load as they are into a packed model (model/mxfp4.py
    `pack_experts`) and decoded, exactly, into a dense one (training from an imported release).

    `frozen`: the caller never trains or writes the weights (a LoRA base, inference). Then a tensor stored
    in the dtype the model holds it in on the CPU is not copied: it becomes a view of safetensors' mapping
    of the file (private, copy-on-write: the file is never written), so it costs memory only for the pages
    read (an embedding table: the rows of the tokens seen), pages the kernel can drop and read again
    under memory pressure, and loading never holds the model twice. The others are copied as always."""
    expected = model_tensors(model)
    decode = packed_weights(tensor_names(path)) & set(expected)
    shapes = {}
    for name, t in expected.items():
        if name in decode:  # (E, rows, cols) -> (E, rows, cols/32, 16) codes and (E, rows, cols/32) scales
            *lead, cols = t.shape
            shapes[name + ".blocks"], shapes[name + ".scales"] = (*lead, cols // 32, 16), (*lead, cols // 32)
        else:
            shapes[name] = tuple(t.shape)
    tensors = read_weights(path, shapes)
    with torch.no_grad():
        for name, t in expected.items():
            if name in decode:
                blocks, scales = tensors.pop(name + ".blocks"), tensors.pop(name + ".scales")
                t.copy_(dequantize(blocks, scales, t.dtype))
                continue
            stored = tensors.pop(name)
            if frozen and stored.dtype == t.dtype and t.device.type == "cpu":
                t.data = stored  # the same Parameter object (ties and names kept), now on the file's pages
            else:
                t.copy_(stored)


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None. Checked a slice
    at a time: isfinite's temporaries for a whole embedding are gigabytes (gpt-oss-20b's: several)."""
    for name, t in tensors.items():
        if t.is_floating_point():
            flat = t.reshape(-1)
            for start in range(0, flat.numel(), FINITE_CHUNK):
                if not bool(torch.isfinite(flat[start : start + FINITE_CHUNK]).all()):
                    return name
    return None


def file_non_finite(path: Path) -> str | None:
    """first_non_finite over the tensors of a safetensors file, read through a mapping of its own that is
    dropped afterwards: a model whose weights are views of the same file (load_weights `frozen`) then
    keeps only the pages it reads resident, not every page this check touched."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return next((name for name in f.keys() if first_non_finite({name: f.get_tensor(name)})), None)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read weights ({err})") from None


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    trainer_tensors: dict[str, torch.Tensor],
    state: CheckpointState,
    keep: int,
) -> Path:
    """Write one checkpoint atomically and keep the newest `keep`. Returns its directory.

    Weights holding a NaN or an infinity are refused before anything is written, so every checkpoint on
    disk is finite and rotation (which only ever deletes checkpoints older than the one just written)
    never removes the newest finite one."""
    final = ckpt_root / step_dir_name(step)
    bad = first_non_finite(weights)
    if bad is not None:
        raise CheckpointError(
            f"refusing to save {final}: tensor {bad} holds non-finite values; {newest_finite_text(ckpt_root)}"
        )
    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_stale(ckpt_root)  # hidden directories of writers that were killed
    try:
        with staged_directory(final, force=True, flag="checkpoint") as tmp:
            try:
                save_file({k: v.cpu() for k, v in weights.items()}, str(tmp / MODEL))
                save_file({k: v.cpu().contiguous() for k, v in trainer_tensors.items()}, str(tmp / TRAINER))
            except SafetensorError as err:  # safetensors reports a full disk with its own error type
                raise OSError(str(err)) from None
            # state.json last: its presence is part of what makes a directory a checkpoint.
            (tmp / STATE).write_text(json.dumps(state.to_json(), indent=1), encoding="utf-8")
    except AtomicWriteError as err:
        previous = list_checkpoints(ckpt_root)
        kept = (
            f"the previous checkpoint is intact ({previous[-1].name})"
            if previous
            else "no checkpoint was saved before this one"
        )
        raise CheckpointError(f"could not save checkpoint {final} ({err.reason}); {kept}") from None
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def newest_finite(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint whose weights are all finite (read and checked), else None."""
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            if first_non_finite(load_file(str(path / MODEL))) is None:
                return path
        except (SafetensorError, OSError, ValueError):
            continue
    return None


def newest_finite_text(ckpt_root: Path) -> str:
    """How an error names what survives: 'the newest finite checkpoint is ...' or that there is none."""
    found = newest_finite(ckpt_root)
    return f"the newest finite checkpoint is {found}" if found else "no finite checkpoint was saved"


def _is_valid(path: Path) -> bool:
    if not all((path / f).is_file() for f in FILES):
        return False
    try:
        json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Valid checkpoint directories, oldest first (temporary and incomplete ones are skipped)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit() and _is_valid(p):
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def resolve_checkpoint(path: Path) -> Path:
    """A run directory, its checkpoints/ folder or one step directory -> the checkpoint to load."""
    path = Path(path)
    if path.is_file() and path.name == MODEL:
        path = path.parent
    if (path / "config.json").is_file() and not (path / STATE).is_file():  # transformers' layout, not ours
        raise CheckpointError(
            f"{path} is a Hugging Face model directory, not a gptoss checkpoint: import it first, "
            f"gptoss import {path} --run runs/NAME, then use --run runs/NAME"
        )
    if (path / STATE).is_file() or (path / MODEL).is_file():
        if not _is_valid(path):
            raise CheckpointError(f"{path}: incomplete or corrupt checkpoint (needs {', '.join(FILES)})")
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(f"no complete checkpoint under {path}")
    return found[-1]


def read_state(ckpt: Path) -> CheckpointState:
    path = ckpt / STATE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    return CheckpointState.from_json(raw, str(path))


def read_trainer_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt / TRAINER))
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
            name, key = full[len("optim.") :].rsplit(".", 1)
            state.setdefault(name, {})[key] = value
    for full, value in meta.get("scalars", {}).items():
        name, key = full.rsplit(".", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
