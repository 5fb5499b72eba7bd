"""The LoRA side of training setup (`lora.rank > 0`): adapters trained on a frozen base.

    check_start        what a LoRA run needs before anything is read: a base (--init-from) or a LoRA run
                       to resume with the same adapters, one process or DDP
    build_lora_model   the base built on the meta device, its packed MXFP4 experts kept packed, the base
                       weights loaded in the training dtype (on a CPU those stored in it are views of the
                       mapped file, run/checkpoint.py `load_weights`); and the adapters' transform, which
                       joins the end of the training list (transforms.py)
    checkpoint_weights what a LoRA checkpoint's model.safetensors holds: the adapters alone
    start_line         the start-up line: what trains, how many parameters, the estimated peak memory

The base is never copied: a new run records where it is and the sha256 of its weights (run/base.py), every
checkpoint's state.json carries that record, and a resume finds and verifies the base again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import RunConfig
from ..devices import materialize
from ..errors import GptossError
from ..model import Transformer
from ..model.lora import adapter_tensors
from ..output import console
from ..run import checkpoint as ckpt
from ..run.base import find_base, record_base
from ..run.layout import RunDir
from ..transforms import ModelTransform, apply_transforms, build_model, checkpoint_transforms, lora_adapters
from . import distributed

# Keys of the lora section that change the function the adapters compute: a resume must keep them.
SHAPING = ("rank", "alpha", "targets", "layers")


def check_start(cfg: RunConfig, resume_ckpt: Path | None, init_ckpt: Path | None, state, init_state=None) -> None:
    """Refuse, before any data or weights are read, a LoRA run that cannot start or continue as configured,
    and any run started from a LoRA run's adapters (they are not a whole model)."""
    if init_state is not None and init_state.base is not None:
        raise GptossError(
            f"--init-from: {init_ckpt} holds LoRA adapters, not a whole model; merge them first "
            "(gptoss export --run RUN --out DIR, then gptoss import DIR --run NEW) and start from NEW"
        )
    enabled = cfg.lora.enabled
    if resume_ckpt is not None:
        lora_run = state.base is not None
        if lora_run != enabled:
            what = "LoRA adapters" if lora_run else "every weight (no adapters)"
            raise GptossError(
                f"--resume: {resume_ckpt} trained {what}; the config has lora.rank={cfg.lora.rank} "
                "(resume with the run's own config)"
            )
        saved = (state.config or {}).get("lora", {})
        for key in SHAPING if enabled else ():
            now = getattr(cfg.lora, key)
            if key in saved and saved[key] != now:
                raise GptossError(
                    f"--resume: {resume_ckpt} was trained with lora.{key}={saved[key]!r}, the config has {now!r}"
                )
        return
    if enabled and init_ckpt is None:
        raise GptossError(
            f"lora.rank={cfg.lora.rank} trains adapters on a trained model: name it with --init-from RUN "
            "(e.g. an imported gpt-oss-20b), or set lora.rank=0 to train every weight"
        )
    if enabled and cfg.train.parallel == "fsdp":
        raise GptossError(
            "lora with train.parallel=fsdp is not supported: use ddp (the frozen base is replicated, the "
            "adapters' gradients are averaged)"
        )


def build_lora_model(
    cfg: RunConfig,
    run: RunDir,
    resume_ckpt: Path | None,
    init_ckpt: Path | None,
    state,
    device: torch.device,
    precision: str,
    before_weights: Sequence[ModelTransform] = (),
    main: bool = True,
) -> tuple[Transformer, dict | None, ModelTransform, Path]:
    """(model with the base loaded and frozen-to-be, the base's record (rank 0), the adapters' transform, the
    base checkpoint). The base's weights are in bf16 under train.precision=bf16, else fp32; norms and the
    router stay fp32 (devices.py); a packed base keeps its experts packed."""
    if resume_ckpt is not None:
        record = state.base
        base = find_base(record, RunDir.of_checkpoint(resume_ckpt), str(resume_ckpt))
        tensors = ckpt.read_adapters(resume_ckpt)
    else:
        base, tensors = init_ckpt, None
        record = record_base(init_ckpt, run) if main else None
    weights = base / ckpt.MODEL
    if resume_ckpt is None:  # checked in the file: the model's mapped weights stay untouched (load_weights)
        bad = ckpt.file_non_finite(weights)
        if bad is not None:
            raise GptossError(f"--init-from: {base} holds non-finite weights ({bad})")
    torch.manual_seed(
        cfg.train.seed
    )  # as build_model(seed=) does: the adapters' dropout repeats (a resume restores it)
    model = build_model(cfg.model, device=torch.device("meta"))
    apply_transforms(model, [*checkpoint_transforms(ckpt.tensor_names(weights)), *before_weights])
    materialize(model, device, torch.bfloat16 if precision == "bf16" else torch.float32)
    ckpt.load_weights(model, weights, frozen=True)  # the base is never trained: mapped where it can be
    transform = lora_adapters(cfg.lora, seed=cfg.train.seed, tensors=tensors, source=str(resume_ckpt))
    if main:
        console.print(f"training LoRA adapters on the frozen weights of {base}", highlight=False, soft_wrap=True)
    return model, record, transform, base


def checkpoint_weights(model: torch.nn.Module, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """What a checkpoint's model.safetensors holds: a LoRA run's adapters alone (detached, on the CPU; the base
    stays where state.json's `base` says), else every weight gathered (a collective under FSDP)."""
    if not cfg.lora.enabled:
        return distributed.full_weights(model, cfg.model.tie_word_embeddings)
    return {name: t.detach().contiguous().cpu() for name, t in adapter_tensors(model).items()}


def start_line(cfg: RunConfig, model: torch.nn.Module, precision: str, device: torch.device, base: Path) -> str:
    """What a LoRA run trains and the peak memory sizing.py estimates for it (as `gptoss build` shows it)."""
    import dataclasses

    from ..model.mxfp4 import PackedExperts
    from ..sizing import GIB, lora_training

    trainable = sum(p.numel() for p in adapter_tensors(model).values())
    total = sum(p.numel() for n, p in model.named_parameters() if n not in adapter_tensors(model))
    packed = any(isinstance(m, PackedExperts) for m in model.modules())
    total += sum(m.shape.numel() for m in model.modules() if isinstance(m, PackedExperts))
    sized = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    memory = lora_training(sized, build_model(cfg.model, device=torch.device("meta")), device.type == "cuda")
    peak = memory["memory_bytes"]["peak_mxfp4_experts" if packed else "peak_decoded"]
    lo = cfg.lora
    where = f"layers {', '.join(map(str, sorted(lo.layers)))}" if lo.layers is not None else "every layer"
    return (
        f"LoRA rank {lo.rank} (alpha {lo.alpha:g}) on {', '.join(lo.projections())} of {where}: {trainable:,} "
        f"trainable parameters ({trainable / total:.2%} of {total:,}); base {base} "
        f"({'MXFP4' if packed else 'dense'} experts, frozen, {precision}); estimated peak {peak / GIB:.2f} GiB"
    )
