"""Devices and precision: which device a command runs on, which dtype it computes in, and the one
precision policy (which parameters stay fp32 when the rest is bf16), shared by train, infer, export and bench.

The policy, decided once for every stage:
- RMSNorm scales stay fp32: the norm computes its statistics in fp32 and multiplies by the scale there
  (model/norm.py), and a scale rounded to bf16 moves every activation of the layer.
- The router (`mlp.gate`) stays fp32: the top-k choice of experts is a discrete decision that bf16 rounding
  flips for near-ties, and the router computes in fp32 anyway (model/moe.py), so an fp32 weight costs no
  cast and keeps training and inference routing the same tokens.
Everything else (embedding, attention, experts, unembedding, biases) takes the bf16 dtype. transformers
keeps only the norms in fp32 on load (`_keep_in_fp32_modules` in modeling_gpt_oss.py); an export still
writes the router in fp32, which transformers casts on load as it likes: the file loses nothing.
"""

from __future__ import annotations

from typing import Literal

import torch

from .errors import GptossError

DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["auto", "fp32", "bf16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP32_PARAMS = (".scale", "mlp.gate.weight", "mlp.gate.bias")  # suffixes of our (openai/gpt-oss) names


def pick_device(name: str, option: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu' or 'cuda'; `option` names the setting in error messages."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise GptossError(f"{option} must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise GptossError(f"{option} cuda: no CUDA device is available (see gptoss env)")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """CUDA compute capability >= 8 (Ampere and newer). Not torch.cuda.is_bf16_supported(): that also says
    yes to the emulated bf16 of a T4 or V100."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def resolve_dtype(name: str, device: torch.device | None = None, option: str = "--dtype") -> torch.dtype:
    """'fp32', 'bf16', or 'auto': bf16 on a GPU that computes it natively, else fp32."""
    if name == "auto":
        return torch.bfloat16 if device is not None and native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise GptossError(f"{option} must be auto, fp32 or bf16, got {name!r}")
    return DTYPES[name]


def resolve_precision(name: str, bf16_ok: bool) -> str:
    """train.precision: `auto` is bf16-mixed where the device computes bf16 natively, else fp32."""
    if name == "auto":
        return "bf16-mixed" if bf16_ok else "fp32"
    return name


def keeps_fp32(name: str) -> bool:
    """Whether the parameter `name` stays fp32 under the precision policy."""
    return name.endswith(FP32_PARAMS)


def param_dtypes(names, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """{name: the dtype it is stored and computed in} for a model whose compute dtype is `dtype`."""
    return {n: torch.float32 if keeps_fp32(n) else dtype for n in names}


def materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Allocate a model built on the meta device on `device`, each parameter directly in the dtype the
    precision policy gives it (so a bf16 model never exists in fp32 first) and each buffer in its own dtype;
    the contents are uninitialised, for a checkpoint to fill. Tied parameters stay one tensor; tensors
    that are not on the meta device (the rotary frequencies) are moved."""
    made: dict[int, torch.nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                full = f"{prefix}.{name}" if prefix else name
                data = torch.empty_like(p, device=device, dtype=torch.float32 if keeps_fp32(full) else dtype)
                made[id(p)] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
            module._parameters[name] = made[id(p)]
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta and name in module._non_persistent_buffers_set:
                # no checkpoint fills it: it would stay uninitialised (the rope table is built on the CPU)
                raise ValueError(f"{prefix}.{name}: a derived buffer on the meta device cannot be materialized")
            if buf is not None:
                module._buffers[name] = torch.empty_like(buf, device=device) if buf.is_meta else buf.to(device)


def apply_precision(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters to `dtype` except those the policy keeps fp32 (.data keeps tied weights one tensor)."""
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
