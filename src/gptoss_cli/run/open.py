"""Opening a run for use: the one module every stage that reads a trained run comes through.

    open_run(run, checkpoint)    config + checkpoint state + tokenizer, verified together (export, resume,
                                 --init-from: no model needed)
    load_run(run, checkpoint)    the same plus the model, built, transformed and loaded for inference
                                 (infer, chat, serve, eval, bench --run); a LoRA run's base weights
                                 with its adapters applied on the fly (transforms.lora_adapters)

so "which checkpoint", "which config", "is this the tokenizer the weights were trained with" and "how are
the weights placed" are answered once, with one set of error messages. The records travel whole: the run
directory as a RunDir, never a bare path.

    --checkpoint C     that step directory (or the newest under C); its run is C's RUN/ (or C itself)
    --run R            R's newest complete checkpoint
    neither            the newest run under ./runs that holds checkpoints
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..config import RunConfig, config_from_dict
from ..data.tokenizer import check_vocab, load_tokenizer, tokenizer_hash
from ..devices import materialize, pick_device, resolve_dtype
from ..errors import GptossError
from ..model import Transformer
from ..transforms import (
    ModelTransform,
    apply_transforms,
    build_model,
    checkpoint_transforms,
    inference_transforms,
    lora_adapters,
)
from .base import find_base
from .checkpoint import CheckpointState, load_weights, read_adapters, read_state, resolve_checkpoint, tensor_names
from .layout import CHECKPOINTS, MODEL, STATE, TOKENIZER, RunDir


@dataclass
class OpenRun:
    run: RunDir
    checkpoint: Path  # the step directory
    state: CheckpointState
    config: RunConfig  # config.yaml's infer/train sections; the model shapes the weights were saved with
    tokenizer: Tokenizer | None  # None only when opened with need_tokenizer=False and the run has none
    tokenizer_path: Path | None
    base: Path | None  # a LoRA run's base checkpoint, found and verified (run/base.py); else None

    @property
    def weights(self) -> Path:
        """The checkpoint's model.safetensors (a LoRA run's: its adapters)."""
        return self.checkpoint / MODEL

    @property
    def base_weights(self) -> Path:
        """The weights the model's base tensors come from: the base's for a LoRA run, else `weights`."""
        return self.base / MODEL if self.base is not None else self.weights

    @property
    def step(self) -> int:
        return self.state.step


def locate(run: Path | None, checkpoint: Path | None) -> tuple[RunDir, Path]:
    """(run directory, checkpoint directory) from --run and/or --checkpoint (default: the newest run)."""
    if checkpoint is not None:
        if not Path(checkpoint).exists():
            raise GptossError(f"checkpoint {checkpoint} does not exist")
        ckpt = resolve_checkpoint(checkpoint)
        return (RunDir(run) if run is not None else RunDir.of_checkpoint(ckpt)), ckpt
    if run is None:
        found = _newest_run()
    elif not Path(run).is_dir():
        raise GptossError(
            f"run directory {run} does not exist; train one first: gptoss train --config tiny --run {run}"
        )
    else:
        found = RunDir(run)
    return found, resolve_checkpoint(found.path)


def _newest_run() -> RunDir:
    """No --run: the newest run under ./runs that no trainer holds (a run still training has newer
    checkpoints to come), else the newest one; named on stderr, since the user did not pick it."""
    from ..output import console
    from .lock import being_trained

    runs = RunDir.by_age(need=CHECKPOINTS)
    idle = next((r for r in runs if not being_trained(r)), None)
    if idle is None:
        console.print(f"using the newest run, {runs[0]}, which is still training", highlight=False)
        return runs[0]
    skipped = "" if idle == runs[0] else f" ({runs[0]} is still training)"
    console.print(f"using the newest run, {idle}{skipped}", highlight=False, soft_wrap=True)
    return idle


def run_config(run: RunDir, ckpt: Path, state: CheckpointState) -> RunConfig:
    """RUN/config.yaml (its infer section gives the defaults); the model shapes come from the checkpoint,
    whatever config.yaml says now."""
    saved = config_from_dict(state.config, str(ckpt / STATE)) if state.config is not None else None
    if run.config.is_file():
        cfg = run.read_config()
        if saved is not None:  # what shapes the tensors: the model, and a LoRA run's adapters
            cfg.model, cfg.lora = saved.model, saved.lora
        return cfg
    if saved is None:
        raise GptossError(f"{run}: no config.yaml, and {ckpt / STATE} holds no config")
    return saved


def find_tokenizer(run: RunDir, ckpt: Path) -> Path | None:
    """RUN/tokenizer.json, else one inside the step directory (a copied lone checkpoint)."""
    return next((p for p in (run.tokenizer, ckpt / TOKENIZER) if p.is_file()), None)


def check_tokenizer(tok: Tokenizer, path: Path, state: CheckpointState, ckpt: Path) -> None:
    """The tokenizer must be the one the checkpoint was trained with (when the checkpoint recorded it)."""
    actual = tokenizer_hash(tok)
    if state.tokenizer_hash and state.tokenizer_hash != actual:
        raise GptossError(
            f"{path} (hash {actual}) is not the tokenizer checkpoint {ckpt.name} was trained "
            f"with (hash {state.tokenizer_hash}); use the run directory the checkpoint came from"
        )


def open_run(run: Path | None = None, checkpoint: Path | None = None, *, need_tokenizer: bool = True) -> OpenRun:
    """Find a run and its checkpoint, read its config and state, load and verify its tokenizer."""
    run_dir, ckpt = locate(run, checkpoint)
    state = read_state(ckpt)
    cfg = run_config(run_dir, ckpt, state)
    tok_path = find_tokenizer(run_dir, ckpt)
    tok = None
    if tok_path is None:
        if need_tokenizer:
            raise GptossError(f"{run_dir}: no tokenizer.json (the run directory that train wrote holds one)")
    else:
        tok = load_tokenizer(tok_path)
        check_tokenizer(tok, tok_path, state, ckpt)
        check_vocab(tok, cfg.model.vocab_size, str(tok_path))
    base = find_base(state.base, run_dir, str(ckpt)) if state.base is not None else None
    return OpenRun(run_dir, ckpt, state, cfg, tok, tok_path, base)


# ---- loading the model -----------------------------------------------------------------------------


@dataclass
class LoadedRun(OpenRun):
    model: Transformer  # frozen, eval mode, on `device`, in `dtype` under the precision policy (devices.py)
    device: torch.device
    dtype: torch.dtype
    transforms: list[str] = dataclasses.field(default_factory=list)  # the names, in the order applied

    @property
    def dtype_name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.dtype, str(self.dtype))


def load_run(
    run: Path | None = None,
    checkpoint: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    *,
    transforms: Sequence[ModelTransform] = (),
) -> LoadedRun:
    """open_run, then the model for inference in `dtype` ('auto': bf16 on a GPU that computes it natively,
    else fp32): built on the meta device, `transforms` applied around the weights as their `before_weights`
    says (first those the checkpoint's tensors call for: packed MXFP4 experts), every tensor then allocated
    once on the device in its final dtype, the weights loaded (shapes checked), then the inference list
    (transforms.py). Nothing of the model exists in another form first: a packed gpt-oss-20b never
    allocates its decoded experts, a bf16 model never its fp32 weights; on a CPU the tensors stored in
    their final dtype are views of the mapped checkpoint (run/checkpoint.py `load_weights`), not copies."""
    dev = pick_device(device, "--device")
    dt = resolve_dtype(dtype, dev)
    opened = open_run(run, checkpoint)
    model = build_model(opened.config.model, device=torch.device("meta"))
    adapters = []
    if opened.base is not None:  # a LoRA run: its base's weights, then its adapters on them
        tensors = read_adapters(opened.checkpoint)
        adapters = [lora_adapters(opened.config.lora, tensors=tensors, source=str(opened.weights))]
    transforms = [*checkpoint_transforms(tensor_names(opened.base_weights)), *adapters, *transforms]
    before = [t for t in transforms if t.before_weights]
    after = [t for t in transforms if not t.before_weights] + inference_transforms(dev, dt)
    names = apply_transforms(model, before)
    materialize(model, dev, dt)
    load_weights(model, opened.base_weights, frozen=True)  # inference never writes a weight: mapped on a CPU
    names += apply_transforms(model, after)
    fields = {f.name: getattr(opened, f.name) for f in dataclasses.fields(OpenRun)}
    return LoadedRun(**fields, model=model, device=dev, dtype=dt, transforms=names)
