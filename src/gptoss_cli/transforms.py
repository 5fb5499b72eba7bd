"""Building a model and changing it from outside: the model transforms, in one ordered list per use.

The model package is single-device code that knows nothing of precision policies, recomputation, compilers,
adapters or quantized storage. Those are applied to a built model from outside, as named steps in a fixed
order (torchtitan's habit), by the two places that build models for use:

    train/setup.py   build -> [before weights] -> load weights -> [after weights] -> wrap -> optimizer
    run/open.py      build -> [before weights] -> load weights -> [after weights] -> use

A transform marked `before_weights` changes which tensors the model holds before a checkpoint fills them
(packed MXFP4 experts: `checkpoint_transforms` picks those a checkpoint's tensor names call for); the others
change how the loaded tensors are stored or computed (precision, device, activation checkpointing, compile,
freezing) or add tensors that bring their own values: LoRA adapters (`lora_adapters`), drawn from a seed or
copied from a LoRA checkpoint, on a base whose weights are then frozen. The training list is
    precision -> device -> activation checkpointing -> compile [-> LoRA adapters, kept fp32]
and the inference list
    [LoRA adapters ->] device -> precision -> frozen, eval mode.
The optimizer is built afterwards over the parameters that still require gradients (`trainable`), so a
transform that freezes the base weights leaves them out of the optimizer and its checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from .config import LoraConfig
from .devices import apply_precision
from .errors import GptossError
from .memory import release_freed_memory_if_due
from .model import ModelConfig, Transformer


@dataclass(frozen=True)
class ModelTransform:
    name: str  # shown in logs and tests: "precision bf16", "activation checkpointing", ...
    apply: Callable[[Transformer], None]  # changes the model in place
    before_weights: bool = False  # True: changes the set of tensors, so it runs before the weights are loaded

    def __call__(self, model: Transformer) -> None:
        self.apply(model)


def build_model(config: ModelConfig, *, seed: int | None = None, device: torch.device | None = None) -> Transformer:
    """A Transformer of `config`. With a seed its weights are initialised from it (the same on every rank);
    without one they are left uninitialised for a checkpoint to fill, created straight on `device`."""
    if seed is None:
        with torch.device(device or "cpu"):  # parameters on the device; the rope table is built on the CPU
            model = Transformer(config)
        # On the meta device (shapes only, for devices.materialize) the rope table stays the real CPU one.
        return model.to(device) if device is not None and device.type != "meta" else model
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def apply_transforms(model: Transformer, transforms: Iterable[ModelTransform]) -> list[str]:
    """Apply each transform in order; returns their names."""
    names = []
    for transform in transforms:
        transform(model)
        names.append(transform.name)
    return names


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter that requires a gradient: what the optimizer takes."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


# ---- the standard transforms ---------------------------------------------------------------------


def precision(dtype: torch.dtype) -> ModelTransform:
    """Parameters in `dtype`, except what the precision policy keeps fp32 (devices.py)."""
    return ModelTransform(f"precision {str(dtype).removeprefix('torch.')}", lambda m: apply_precision(m, dtype))


def to_device(device: torch.device) -> ModelTransform:
    return ModelTransform(f"device {device.type}", lambda m: m.to(device))


def activation_checkpointing(before_block: Callable[[], object] | None = None) -> ModelTransform:
    """Each block's forward is recomputed in the backward pass instead of keeping its activations.
    `before_block` runs before each block's forward and before each recomputation (the backward pass reaches
    no module hook there)."""

    def apply(model: Transformer) -> None:
        from torch.utils.checkpoint import checkpoint

        for blk in model.block:
            inner = blk.forward if before_block is None else _preceded(before_block, blk.forward)

            def forward(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            blk.forward = forward

    return ModelTransform("activation checkpointing", apply)


def _preceded(before: Callable[[], object], fn: Callable) -> Callable:
    def run(*args, **kwargs):
        before()
        return fn(*args, **kwargs)

    return run


def compile_blocks() -> ModelTransform:
    """torch.compile per block, as torchtitan: names and state dicts stay unchanged."""

    def apply(model: Transformer) -> None:
        for blk in model.block:
            blk.compile()

    return ModelTransform("compile", apply)


def frozen_eval() -> ModelTransform:
    """No gradients, eval mode (the MoE skips its training losses): how every inference stage runs."""
    return ModelTransform("frozen, eval mode", lambda m: m.requires_grad_(False).eval())


def training_transforms(
    precision_name: str, device: torch.device, *, checkpointing: bool, compile: bool
) -> list[ModelTransform]:
    """The training list: bf16 weights for `bf16` precision (bf16-mixed keeps fp32 weights under autocast),
    then the device, activation checkpointing and compile when asked for."""
    out = [precision(torch.bfloat16)] if precision_name == "bf16" else []
    out.append(to_device(device))
    if checkpointing:  # on a CPU, freed heap is handed back between blocks (memory.py); not inside a compiled graph
        release = release_freed_memory_if_due if device.type == "cpu" and not compile else None
        out.append(activation_checkpointing(release))
    if compile:
        out.append(compile_blocks())
    return out


def packed_experts() -> ModelTransform:
    """The expert matrices as MXFP4 blocks and scales (model/mxfp4.py): on a meta-device model, the tensors a
    packed checkpoint fills; on a real one, its weights quantised."""
    from .model.mxfp4 import pack_experts

    return ModelTransform("mxfp4 experts", pack_experts, before_weights=True)


def checkpoint_transforms(tensor_names: Iterable[str]) -> list[ModelTransform]:
    """The structural transforms a checkpoint's tensors call for: packed experts where it stores `.blocks`."""
    from .model.mxfp4 import SUFFIXES

    return [packed_experts()] if any(n.endswith(SUFFIXES[0]) for n in tensor_names) else []


def lora_adapters(
    lora: LoraConfig, *, seed: int | None = None, tensors: Mapping[str, torch.Tensor] | None = None, source: str = ""
) -> ModelTransform:
    """Low-rank adapters on the loaded base weights (model/lora.py), every other parameter frozen: drawn from
    `seed` (a new LoRA run: A random, B zero, so the model starts as its base) or copied from `tensors` (a
    LoRA checkpoint's, named `source` in errors). It runs after the base weights are loaded, which fill
    everything but the adapters; they are created in fp32 on the base's device."""
    from .model.lora import adapter_tensors, add_adapters, init_adapters

    def apply(model: Transformer) -> None:
        add_adapters(model, lora.rank, lora.alpha, lora.dropout, lora.projections(), lora.layers)
        if tensors is None:
            init_adapters(model, torch.Generator().manual_seed(seed or 0))
            return
        own = adapter_tensors(model)
        for name in sorted(set(own) | set(tensors)):
            if name not in tensors or name not in own:
                what = "is missing" if name not in tensors else "is not an adapter of this lora config"
                raise GptossError(f"{source}: adapter {name} {what} (was it saved with another lora section?)")
            if tensors[name].shape != own[name].shape:
                raise GptossError(
                    f"{source}: adapter {name} has shape {tuple(tensors[name].shape)}, the lora config gives "
                    f"{tuple(own[name].shape)}"
                )
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(tensors[name])

    where = f"layers {','.join(map(str, lora.layers))}" if lora.layers is not None else "every layer"
    return ModelTransform(f"lora rank {lora.rank} on {', '.join(lora.projections())} ({where})", apply)


def inference_transforms(device: torch.device, dtype: torch.dtype) -> list[ModelTransform]:
    """The inference list: on the device, in `dtype` under the precision policy, frozen and in eval mode."""
    return [to_device(device), precision(dtype), frozen_eval()]
