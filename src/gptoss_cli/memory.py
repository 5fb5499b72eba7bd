"""Memory telemetry shared by train and infer: one JSON line per sample, read by `gptoss report`; and
giving freed heap memory back to the system between CPU training steps.

On CUDA a sample holds torch's allocated / reserved / peak bytes and the NVML device memory in use; on
CPU it holds the process RSS, labelled as such. Every line is flushed, so a killed run loses at most
the line being written (report skips a cut-off last line).
"""

from __future__ import annotations

import ctypes
import functools
import json
import time
from pathlib import Path

import psutil
import torch

# CPU training gives its freed heap back at most this often (release_freed_memory_if_due), which bounds
# what trimming, and faulting the pages in again, costs (docs/performance.md measures it).
TRIM_AFTER_S = 1.0


class MemorySampler:
    def __init__(self, path: Path, device: torch.device, rank: int = 0, phase: str = "train"):
        self.path = Path(path)
        self.device = torch.device(device)
        self.rank = rank
        self.phase = phase
        self.start = time.time()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._process = psutil.Process()
        self._nvml = None
        if self.device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
            except Exception:  # no NVML: torch's counters still work
                self._nvml = None

    def sample(self, step: int | None = None, **extra) -> dict:
        record = {
            "time": round(time.time() - self.start, 4),
            "wall": time.time(),
            "phase": self.phase,
            "rank": self.rank,
            "step": step,
            "device": self.device.type,
        }
        if self.device.type == "cuda":
            record["allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            record["reserved_bytes"] = torch.cuda.memory_reserved(self.device)
            record["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            if self._nvml is not None:
                pynvml, handle = self._nvml
                record["nvml_used_bytes"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used
        record["rss_bytes"] = self._process.memory_info().rss
        record["label"] = "GPU memory" if self.device.type == "cuda" else "CPU memory (process RSS)"
        record.update(extra)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._process.memory_info().rss

    def close(self) -> None:
        self._file.close()
        if self._nvml is not None:
            try:
                self._nvml[0].nvmlShutdown()
            except Exception:
                pass


def peak_rss() -> int:
    """The process's peak resident set size in bytes (VmHWM: unlike ru_maxrss it is not inherited over exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        import sys

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Start a new peak (Linux: writing 5 to clear_refs resets VmHWM). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> bool:
    """Hand the pages of the C heap's free chunks back to the system (glibc's malloc_trim). glibc keeps
    memory a process freed, and a training step's many large transients of different sizes leave holes it
    does not return: without this a long CPU run's resident set grows step after step (docs/performance.md).
    False where the C library has no malloc_trim (macOS, musl)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    return trim is not None


class _Released:
    """When release_freed_memory_if_due last ran (time.monotonic)."""

    last = float("-inf")


def release_freed_memory_if_due() -> bool:
    """release_freed_memory, when TRIM_AFTER_S seconds have passed since the last time this did it. CPU
    training calls it after each step, and activation checkpointing before each block's forward and before
    its recomputation in the backward pass (transforms.py): one block's transients leave holes the next
    block's allocations fault in, so a step's resident heap grows block by block while the memory in use
    does not. Short steps and blocks skip it. Returns whether it trimmed."""
    if time.monotonic() - _Released.last < TRIM_AFTER_S:
        return False
    release_freed_memory()
    _Released.last = time.monotonic()
    return True


@functools.cache
def _malloc_trim():
    """The C library's malloc_trim, looked up once; None where there is none."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
