"""How many CPU threads torch computes with: chosen from the cores that are free, not left to OpenMP.

OpenMP's default is one thread per logical CPU. On a small or shared machine that is the slowest choice:
a thread that waits for a core another process holds stalls every parallel region it joins, and batch-1
decoding runs thousands of small parallel regions per second (docs/performance.md measures it). So by
default gptoss takes the physical cores this process may use, minus the ones the 1-minute load average
says are busy, and never fewer than one:

    --threads N          N, as given
    OMP_NUM_THREADS=N    N, as the environment says (torchrun sets 1 per process)
    neither              max(1, physical cores usable here - round(load average))

Every command that computes calls set_threads() once, before its work, and names the choice in its
summary line (`describe()`).
"""

from __future__ import annotations

import os

_CHOICE: tuple[int, str] | None = None


def free_cores() -> tuple[int, str]:
    """(cores to use, why): the physical cores this process may run on, less the busy ones."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = min(usable, psutil.cpu_count(logical=False) or usable)
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return physical, f"{physical} physical cores"
    free = max(1, min(physical, physical - round(load)))
    return free, f"{free} free of {physical} physical cores, load {load:.1f}"


def set_threads(requested: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads (see the module docstring); returns (threads, why)."""
    global _CHOICE
    import torch

    if requested is not None and requested < 1:
        from .errors import GptossError

        raise GptossError(f"--threads must be >= 1, got {requested}")
    if requested is not None:
        choice = (requested, "--threads")
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        choice = (max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS")
    else:
        choice = free_cores()
    torch.set_num_threads(choice[0])
    _CHOICE = choice
    return choice


def describe() -> str:
    """'2 threads: 2 free of 2 physical cores, load 0.1', for a summary line; torch's own count when no
    command chose."""
    if _CHOICE is None:
        import torch

        n = torch.get_num_threads()
        return f"{n} thread{'s' if n != 1 else ''}"
    n, why = _CHOICE
    return f"{n} thread{'s' if n != 1 else ''}: {why}"
