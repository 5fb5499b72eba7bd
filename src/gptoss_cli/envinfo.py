"""Is this machine ready? Python, torch and its CUDA build, GPUs through NVML, nvidia-smi, nvcc, and
which attention backends, MXFP4 expert path and torch.compile work here. Never fails on a machine without
a GPU or driver."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _tool(name: str, args: list[str], pattern: str) -> dict:
    path = shutil.which(name)
    if not path:
        return {"found": False}
    text = _run([path, *args]) or ""
    match = re.search(pattern, text)
    return {"found": True, "path": path, "version": match.group(1) if match else None}


def _nvml_gpus() -> tuple[list[dict], str | None]:
    """Per-GPU facts from NVML (nvidia-ml-py); ([], reason) when NVML is not usable here."""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as err:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return [], f"NVML unavailable ({err})"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "memory_total_gib": round(mem.total / 1024**3, 2),
                    "memory_used_gib": round(mem.used / 1024**3, 2),
                    "driver": driver,
                    "compute_capability": f"{major}.{minor}",
                    "bf16": major >= 8,  # Ampere and newer; is_bf16_supported() also says yes to emulation
                }
            )
        return gpus, None
    finally:
        pynvml.nvmlShutdown()


def _attention_backends(device: str) -> dict[str, bool]:
    """Run each attention backend of the registry (model/backends.py) once on a tiny input (sinks, GQA,
    window) on `device`."""
    import torch

    from .model import backends

    results = {}
    q = torch.randn(1, 4, 8, 16, device=device)
    k = torch.randn(1, 2, 8, 16, device=device)
    v = torch.randn(1, 2, 8, 16, device=device)
    mask = torch.ones(8, 8, dtype=torch.bool, device=device).tril()[None, None]
    sinks = torch.zeros(4, device=device)
    for name, backend in backends.ATTENTION.items():
        try:
            backends.kernel(backend)(q, k, v, sinks, mask, 0.25)
            results[name] = True
        except Exception:
            results[name] = False
    return results


def _moe_backends(device: str) -> dict[str, bool]:
    """Which MoE backends of the registry can run here: grouped_mm needs torch._grouped_mm (a CUDA kernel;
    on a CPU it is a loop of matmuls, so auto never picks it there)."""
    import torch

    from .model import backends

    grouped = hasattr(torch, "_grouped_mm") and device == "cuda"
    return {name: grouped if name == "grouped_mm" else True for name in backends.MOE}


def _mxfp4_experts(device: str) -> dict:
    """Which path multiplies packed MXFP4 experts here, checked on a tiny packed matrix on `device`."""
    import importlib.util

    import torch

    from .model.mxfp4 import PackedExperts, dequantize, quantize

    try:
        blocks, scales = quantize(torch.randn(2, 8, 64))
        weight = PackedExperts(blocks.to(device), scales.to(device))
        x = torch.randn(3, 64, device=device)
        ref = x @ dequantize(blocks, scales, torch.float32).to(device)[1].t()
        works = bool(torch.allclose(weight.linear(1, x), ref, rtol=1e-4, atol=1e-4))
    except Exception:
        works = False
    fused = importlib.util.find_spec("triton_kernels") is not None
    return {
        "path": "torch: each expert decoded a few rows at a time inside its matmul (model/mxfp4.py)",
        "device": device,
        "works": works,
        "fused_kernel": (
            "triton_kernels is installed, but gptoss does not call its fused MXFP4 matmul"
            if fused
            else "none installed (transformers and openai use triton_kernels' matmul_ogs on CUDA)"
        ),
    }


def _compile_prerequisites(cuda: bool) -> dict:
    """Whether torch.compile's default backend can work here (checked without compiling: instant)."""
    if sys.platform == "win32":
        return {"available": False, "why": "torch.compile's inductor backend is not supported on Windows"}
    if cuda:
        try:
            import triton  # noqa: F401
        except ImportError:
            return {"available": False, "why": "triton is not installed"}
        return {"available": True, "why": "triton found"}
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return {"available": False, "why": "no C/C++ compiler for inductor's CPU backend"}
    return {"available": True, "why": f"C compiler {compiler}"}


def collect() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    gpus, nvml_note = _nvml_gpus()
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpus": gpus,
        "nvml": nvml_note or "ok",
        "nvidia_smi": _tool("nvidia-smi", ["--query-gpu=driver_version", "--format=csv,noheader"], r"([\d.]+)"),
        "nvcc": _tool("nvcc", ["--version"], r"release ([\d.]+)"),
        "attention_backends": _attention_backends("cuda" if cuda else "cpu"),
        "moe_backends": _moe_backends("cuda" if cuda else "cpu"),
        "mxfp4_experts": _mxfp4_experts("cuda" if cuda else "cpu"),
        "compile": _compile_prerequisites(cuda),
        "cpu_threads": torch.get_num_threads(),
    }
    if cuda:
        bf16 = all(g["bf16"] for g in gpus) if gpus else torch.cuda.is_bf16_supported()
        n = info["gpu_count"]
        info["ready"] = True
        info["verdict"] = f"ready: CUDA, {n} GPU{'s' if n > 1 else ''}, {'bf16' if bf16 else 'fp32 (no bf16)'}"
    else:
        info["ready"] = False
        info["verdict"] = "CPU only: use tiny.yaml to try things out"
    return info
