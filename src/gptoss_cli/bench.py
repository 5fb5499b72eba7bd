"""`gptoss bench`: how fast a config trains and generates on this machine, and how close it runs to the peak.

    train    random token batches through the trainer's own pieces (model, loss, clipping, build_optimizer,
             autocast, activation checkpointing, compile): tokens/s and ms per step split into forward
             (loss included) / backward / optimizer (clipping included), MFU, peak memory
    infer    prefill tokens/s (one prompt through the KV cache) and decode tokens/s at batch 1 and a larger
             batch, through generate.py's real loop (greedy sampling, one host sync per step), eager or
             with its compiled decode step; a decode figure is the median time between two tokens, so a
             step that compiles drops out; batch 1 against its memory-bandwidth bound (bandwidth / bytes
             of the active weights)

Warm-up steps are run first and left out; every figure is a median over the measured repeats. On CUDA each
phase ends with a synchronize, so the split is real. MFU = training FLOPs per token (sizing.describe: 3x the
forward, no recompute counted) x tokens/s / peak. The peak is a table of dense bf16 tensor-core figures for
known GPUs, else a measured GEMM: on a CPU the fastest of a few fp32 GEMMs shaped like the model's own
matmuls, so the CPU "MFU" reads as the share of the matmul throughput this machine reaches on these shapes.
"""

from __future__ import annotations

import itertools
import platform
import statistics
import time

import torch

from .config import RunConfig, seed64
from .devices import native_bf16, resolve_dtype, resolve_precision
from .memory import peak_rss, reset_peak_rss
from .model import KVCache, Transformer
from .sizing import describe
from .train.loss import objective
from .transforms import apply_transforms, build_model, inference_transforms

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' datasheets. Matched in this order
# against torch.cuda.get_device_name(); an unknown GPU gets a measured bf16 GEMM instead.
GPU_BF16_PEAKS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
)
# HBM bandwidth, bytes/s, from the datasheets (same matching): decoding at batch 1 reads every active weight
# once per token, so bandwidth / active bytes bounds its tokens/s.
GPU_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100", 2.0e12),
    ("L4", 0.3e12),
    ("RTX 4090", 1.008e12),
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    from .threads import describe

    info = {
        "type": device.type,
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "threads": describe(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["cuda"] = torch.version.cuda
    return info


# ---- the peak ------------------------------------------------------------------------------------


def _gemm_flops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Median FLOP/s of (m, k) @ (k, n), after one warm-up call."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    calls = max(1, int(2e8 // (2 * m * k * n)) + 1) if device.type == "cpu" else 20  # ~0.1 s per repeat on a CPU
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        _sync(device)
        times.append((time.perf_counter() - start) / calls)
    return 2 * m * k * n / statistics.median(times)


def peak_flops(cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if dtype == torch.bfloat16:
            for key, flops in GPU_BF16_PEAKS:
                if key in name:
                    return flops, f"datasheet dense bf16 peak for {key}"
        flops = _gemm_flops(8192, 8192, 8192, dtype, device)
        return flops, f"measured {str(dtype).removeprefix('torch.')} GEMM 8192^3"
    m = cfg.model
    tokens = cfg.train.batch_size * cfg.train.seq_len
    shapes = {  # (rows, in, out) of the model's own matmuls at the training batch
        "expert mlp1": (max(1, tokens * m.experts_per_token // m.num_experts), m.hidden_size, 2 * m.intermediate_size),
        "qkv": (tokens, m.hidden_size, m.q_dim + 2 * m.kv_dim),
        "unembedding": (tokens, m.hidden_size, m.vocab_size),
    }
    best, where = 0.0, ""
    for label, (rows, k, n) in shapes.items():
        rows = min(rows, 4096)  # throughput has flattened out by then; keeps the probe short
        flops = _gemm_flops(rows, k, n, dtype, device)
        if flops > best:
            best, where = flops, f"measured {str(dtype).removeprefix('torch.')} GEMM {rows}x{k}x{n} ({label})"
    return best, where


def memory_bandwidth(device: torch.device) -> tuple[float, str]:
    """(bytes/s, where it comes from): the datasheet for known GPUs, else a measured read of 512 MiB."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bandwidth in GPU_BANDWIDTH:
            if key in name:
                return bandwidth, f"datasheet HBM bandwidth for {key}"
    x = torch.ones(128 * 2**20, device=device)  # 512 MiB of fp32
    x.sum()
    times = []
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        x.sum()
        _sync(device)
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times), "measured read of 512 MiB (sum)"


# ---- training ------------------------------------------------------------------------------------


def bench_train(cfg: RunConfig, device: torch.device, steps: int, warmup: int) -> dict:
    from .train.optim import build_optimizer
    from .train.setup import model_for_training, training_autocast

    t, m = cfg.train, cfg.model
    # The trainer's own steps: bf16 by default only where the GPU computes it natively, its transforms,
    # its optimizer and its autocast rule.
    precision = resolve_precision(t.precision, native_bf16(device))
    model = model_for_training(cfg, device, precision).train()
    optimizer = build_optimizer(model, t, device)
    autocast = training_autocast(precision, device)
    gen = torch.Generator().manual_seed(t.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fresh = reset_peak_rss()
    phases = {"forward": [], "backward": [], "optimizer": []}
    for step in range(warmup + steps):
        batch = torch.randint(0, m.vocab_size, (t.batch_size, t.seq_len + 1), generator=gen).to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        _sync(device)
        t0 = time.perf_counter()
        loss = objective(model, inputs, targets, t, autocast).loss  # the trainer's own loss
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        t3 = time.perf_counter()
        if step >= warmup:
            phases["forward"].append(t1 - t0)
            phases["backward"].append(t2 - t1)
            phases["optimizer"].append(t3 - t2)
    totals = [sum(parts) for parts in zip(*phases.values(), strict=True)]
    step_s = statistics.median(totals)
    tokens = t.batch_size * t.seq_len
    flops_per_token = describe(cfg, cuda=device.type == "cuda")["train_flops_per_token"]
    compute = torch.bfloat16 if precision in ("bf16", "bf16-mixed") else torch.float32
    peak, peak_source = peak_flops(cfg, device, compute)
    tps = tokens / step_s
    result = {
        "precision": precision,
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "tokens_per_step": tokens,
        "steps": steps,
        "warmup": warmup,
        "tokens_per_s": tps,
        "ms_per_step": {name: 1e3 * statistics.median(v) for name, v in phases.items()} | {"total": 1e3 * step_s},
        "flops_per_token": flops_per_token,
        "achieved_tflops": flops_per_token * tps / 1e12,
        "peak_tflops": peak / 1e12,
        "peak_source": peak_source,
        "mfu": flops_per_token * tps / peak,
        "activation_checkpointing": t.activation_checkpointing,
        "compile": t.compile,
    }
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        result["memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_memory_bytes"] = peak_rss()
        result["memory_kind"] = "process peak RSS while training" if fresh else "process peak RSS"
    del model, optimizer
    return result


# ---- inference -----------------------------------------------------------------------------------


def build_infer_model(cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Random weights from train.seed, through the inference transforms a loaded run gets (run/open.py)."""
    model = build_model(cfg.model, seed=cfg.train.seed)
    apply_transforms(model, inference_transforms(device, dtype))
    return model


def _decode_at(model, b: int, gen, repeats: int, warmup: int, new_tokens: int, compile_decode: bool) -> dict:
    """Decode at batch `b` through generate.py's real loop: the median time between two tokens."""
    from .config import InferConfig
    from .infer.generate import generate_tokens

    m = model.config
    prompt_len = min(32, m.max_context_length // 4)
    new_tokens = max(4, min(new_tokens, m.max_context_length - prompt_len))
    params = InferConfig(max_new_tokens=new_tokens, temperature=0.0)
    prompts = torch.randint(0, m.vocab_size, (b, prompt_len), generator=gen).tolist()
    steps = []  # every decode step of every measured run: forward, greedy sample, the host sync
    for run in range(warmup + repeats):
        stamps: list[float] = []

        def stamp(row: int, _token: int, stamps=stamps) -> bool:
            if row == 0:  # called for every row after each step's sample: row 0 marks the step
                stamps.append(time.perf_counter())
            return False  # never stops a row

        generate_tokens(model, prompts, params, pad_id=0, eos_id=None, on_token=stamp, compile_decode=compile_decode)
        if run >= warmup:  # the first decode step may (re)compile: left out
            steps += [later - earlier for earlier, later in itertools.pairwise(stamps[1:])]
    step_s = statistics.median(steps)
    return {
        "batch": b,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "ms_per_step": 1e3 * step_s,
        "tokens_per_s": b / step_s,
    }


@torch.inference_mode()
def _prefill_s(model: Transformer, prompt: torch.Tensor, dtype: torch.dtype) -> float:
    cache = KVCache(model.config, prompt.shape[0], prompt.shape[1] + 1, dtype, prompt.device)
    _sync(prompt.device)
    start = time.perf_counter()
    model(prompt, cache=cache, last_only=True)
    _sync(prompt.device)
    return time.perf_counter() - start


def bench_infer(
    cfg: RunConfig,
    device: torch.device,
    repeats: int,
    warmup: int,
    new_tokens: int,
    batches: tuple[int, ...],
    compile_decode: bool = False,
    prefill_tokens: int | None = None,
) -> dict:
    m = cfg.model
    dtype = resolve_dtype("auto", device)
    model = build_infer_model(cfg, device, dtype)
    gen = torch.Generator().manual_seed(seed64(cfg.train.seed + 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fresh = reset_peak_rss()

    prefill_len = min(prefill_tokens or cfg.train.seq_len, m.max_context_length - 1)
    prompt = torch.randint(0, m.vocab_size, (1, prefill_len), generator=gen).to(device)
    times = [_prefill_s(model, prompt, dtype) for _ in range(warmup + repeats)][warmup:]
    prefill = {
        "batch": 1,
        "tokens": prefill_len,
        "ms": 1e3 * statistics.median(times),
        "tokens_per_s": prefill_len / statistics.median(times),
    }

    decode = [_decode_at(model, b, gen, repeats, warmup, new_tokens, compile_decode) for b in batches]
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak, kind = peak_rss(), "process peak RSS while generating" if fresh else "process peak RSS"
    # Batch 1 reads every active weight once per token: that many bytes at the memory bandwidth bound it.
    info = describe(cfg)
    active_bytes = info["active_params"] * torch.finfo(dtype).bits // 8
    bandwidth, bandwidth_source = memory_bandwidth(device)
    bound = bandwidth / active_bytes
    result = {
        "dtype": str(dtype).removeprefix("torch."),
        "compile_decode": compile_decode,
        "prefill": prefill,
        "decode": decode,
        "active_weight_bytes": active_bytes,
        "bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_source": bandwidth_source,
        "decode_bound_tokens_per_s": bound,
        "decode_batch1_of_bound": decode[0]["tokens_per_s"] / bound,
        "peak_memory_bytes": peak,
        "memory_kind": kind,
    }
    return result


# ---- the command's core --------------------------------------------------------------------------


def run_bench(
    cfg: RunConfig,
    train: bool = True,
    infer: bool = True,
    steps: int = 5,
    warmup: int = 2,
    new_tokens: int = 32,
    decode_batch: int = 8,
    threads: int | None = None,
    compile_decode: bool = False,
    say=lambda line: None,
) -> dict:
    """Everything `gptoss bench` prints, as one JSON-ready dict. `say(line)` is told each phase as it starts
    (a bench of a big config takes minutes)."""
    from .devices import pick_device
    from .threads import set_threads

    set_threads(threads)
    device = pick_device(cfg.train.device, "train.device")
    report = {
        "config": cfg.name,
        "device": device_info(device),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if train:
        say(f"bench: training {cfg.name} on {device.type}, {warmup} warm-up + {steps} measured steps")
        report["train"] = bench_train(cfg, device, steps, warmup)
    if infer:
        batches = (1, decode_batch) if decode_batch > 1 else (1,)
        say(f"bench: prefill, then decoding at batch {' and '.join(map(str, batches))}")
        report["infer"] = bench_infer(cfg, device, min(3, steps), min(warmup, 1), new_tokens, batches, compile_decode)
    return report
