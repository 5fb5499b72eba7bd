"""Which device a command runs on, and whether it computes bf16 natively (shared by train, infer, bench)."""

from __future__ import annotations

import torch

from .errors import GptossError


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
