"""One-shot GPU checks for the targets of docs/performance.md, for a machine with a CUDA GPU (written for an
H200; not run yet).

Installs nothing: the GPU machine already has torch and the project's dependencies. Run from the
repository root, in well under 10 minutes:

    PYTHONPATH=src python3 benchmarks/gpu_check.py            # results also go to $OUT when it is set

1. MoE: `torch._grouped_mm` (bf16) against the per-expert loop at compact shapes, forward and backward,
   both measured against an fp32 loop; then the grouped block's forward + backward under
   `torch.cuda.set_sync_debug_mode("error")`, which raises at the first host sync.
2. Attention: the SDPA sink path and the banded sliding-window path against the eager reference, fp32
   and bf16, forward and backward; the fused unembedding + cross-entropy against F.cross_entropy in bf16.
3. `gptoss bench --config compact --json` (the config as shipped: bf16, batch 2 x 512, activation
   checkpointing), a training-only run at micro-batch 8 without checkpointing, and decoding with the
   compiled CUDA-graph step (`--compile-decode`). Training MFU, decode against its bandwidth bound and
   the peak training memory (torch.cuda.max_memory_allocated) come from these reports. Each step is
   timed and failures are recorded, not fatal.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

OUT = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
RESULTS: dict = {}


def record(name: str, fn) -> None:
    start = time.perf_counter()
    try:
        RESULTS[name] = fn()
        status = "ok"
    except Exception as err:  # keep going: one failed check must not hide the others
        RESULTS[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        status = "FAILED"
    RESULTS[name] = {**RESULTS[name], "seconds": round(time.perf_counter() - start, 1)}
    print(
        f"[{status}] {name} ({RESULTS[name]['seconds']} s): "
        f"{json.dumps({k: v for k, v in RESULTS[name].items() if k != 'traceback'})[:2000]}",
        flush=True,
    )


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


# ---- 1. MoE --------------------------------------------------------------------------------------


def moe_block(backend: str, dtype: torch.dtype, tokens: int):
    from gptoss_cli.model import ModelConfig
    from gptoss_cli.model.moe import MLPBlock

    torch.manual_seed(0)
    block = MLPBlock(ModelConfig(moe_backend=backend)).cuda()  # compact: H 1536, I 3072, 16 experts, top-4
    with torch.no_grad():  # random everything; mlp1 pre-activations ~ N(0, 4^2), so some SwiGLU clamps fire
        for name, p in block.named_parameters():
            scale = (4.0 if name == "mlp1_weight" else 1.0) / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.1
            p.copy_(torch.randn_like(p) * scale + (1.0 if name.endswith("scale") else 0.0))
    block = block.to(dtype)
    for name, p in block.named_parameters():  # the trainer keeps the norm scales fp32 under bf16
        if name.endswith("scale"):
            p.data = p.data.float()
    x = torch.randn(1, tokens, 1536, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    return block, x.to(dtype).requires_grad_()


def moe_run(backend: str, dtype: torch.dtype, tokens: int):
    block, x = moe_block(backend, dtype, tokens)
    out, stats = block(x)
    up = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(2)).to(dtype)
    (out * up).sum().backward()
    return out.detach(), {"x": x.grad, **{n: p.grad for n, p in block.named_parameters()}}


def check_moe(tokens: int = 8192) -> dict:
    ref_out, ref_grads = moe_run("loop", torch.float32, tokens)
    result = {"tokens": tokens}
    for backend in ("grouped_mm", "loop"):
        out, grads = moe_run(backend, torch.bfloat16, tokens)
        result[f"{backend}_bf16_vs_fp32"] = {
            "out": rel_err(out, ref_out),
            **{n: rel_err(g, ref_grads[n]) for n, g in grads.items()},
        }
    g, lp = result["grouped_mm_bf16_vs_fp32"], result["loop_bf16_vs_fp32"]
    # grouped_mm must be as close to fp32 as the bf16 loop is (both round to bf16; 2x slack for the order).
    result["grouped_as_accurate_as_loop"] = all(g[k] <= 2 * lp[k] + 1e-3 for k in g)
    for backend in ("grouped_mm", "loop"):
        block, x = moe_block(backend, torch.bfloat16, tokens)
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out, _ = block(x)
            out.float().square().mean().backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result[f"{backend}_fwd_bwd_ms"] = 1e3 * sorted(times[1:])[len(times[1:]) // 2]
    return result


def check_no_host_sync(tokens: int = 8192) -> dict:
    block, x = moe_block("grouped_mm", torch.bfloat16, tokens)
    out, _ = block(x)  # warm-up outside the guard (lazy initialisations may sync once)
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, stats = block(x)
        loss = out.float().square().mean() + stats.aux_loss
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return {"no_host_sync_in_grouped_fwd_bwd": True}


# ---- 2. attention --------------------------------------------------------------------------------


def check_attention() -> dict:
    from gptoss_cli.model import attention_mask
    from gptoss_cli.model.attention import banded_sdpa_attention, eager_attention, sdpa_attention

    b, nh, nkv, t, d = 2, 24, 4, 512, 64
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        for window in (0, 128):
            g = torch.Generator("cuda").manual_seed(0)
            q, k, v = (
                torch.randn(b, n, t, d, device="cuda", generator=g).to(dtype).requires_grad_() for n in (nh, nkv, nkv)
            )
            sinks = torch.randn(nh, device="cuda", generator=g).requires_grad_()
            pos = torch.arange(t, device="cuda").expand(b, t)
            mask = attention_mask(pos, pos, window)
            up = torch.randn(b, nh, t, d, device="cuda", generator=g).to(dtype)
            outs = {}
            fns = [("eager", eager_attention), ("sdpa", sdpa_attention)]
            if window:  # the block-skipping path of sliding layers (model/attention.py)
                fns.append(("banded", lambda *a, w=window: banded_sdpa_attention(*a, w)))
            for name, fn in fns:
                o = fn(q, k, v, sinks, mask, 1 / math.sqrt(d))
                outs[name] = (o, torch.autograd.grad((o.float() * up.float()).sum(), (q, k, v, sinks)))
            oe, ge = outs["eager"]
            limit = 1e-4 if dtype == torch.float32 else 3e-2
            for name in outs.keys() - {"eager"}:
                o, gr = outs[name]
                errs = {"out": rel_err(o, oe), **{n: rel_err(a, e) for n, a, e in zip("qkvs", gr, ge, strict=True)}}
                result[f"{name}_{str(dtype)[6:]}_window{window}"] = {**errs, "pass": max(errs.values()) < limit}
    return result


def check_fused_loss(tokens: int = 1024, hidden: int = 1536, vocab: int = 32000) -> dict:
    """The fused unembedding + cross-entropy against F.cross_entropy, bf16 (compact's pure bf16), with times."""
    import torch.nn.functional as F

    from gptoss_cli.model.cross_entropy import linear_cross_entropy

    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) / math.sqrt(hidden)).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    runs = {
        "plain": lambda: F.cross_entropy((x @ w.T).float(), targets),
        "fused": lambda: linear_cross_entropy(x, w, targets)[0],
    }
    result, grads = {}, {}
    for name, fn in runs.items():
        times = []
        for _ in range(6):
            x.grad = w.grad = None
            torch.cuda.synchronize()
            start = time.perf_counter()
            loss = fn()
            loss.backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        grads[name] = (loss.item(), x.grad, w.grad)
        result[f"{name}_fwd_bwd_ms"] = 1e3 * sorted(times[1:])[len(times[1:]) // 2]
    (lp, dxp, dwp), (lf, dxf, dwf) = grads["plain"], grads["fused"]
    result |= {"loss_abs_diff": abs(lp - lf), "dx_rel": rel_err(dxf, dxp), "dw_rel": rel_err(dwf, dwp)}
    result["pass"] = result["loss_abs_diff"] < 1e-3 and result["dx_rel"] < 3e-2 and result["dw_rel"] < 3e-2
    return result


# ---- 3. the bench --------------------------------------------------------------------------------


def gptoss_bench(*args: str) -> dict:
    """`gptoss bench ... --json` in a fresh process (clean peak memory); in-process if the CLI lacks it."""
    cmd = [sys.executable, "-m", "gptoss_cli", "bench", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=240)
    if proc.returncode == 0:
        return json.loads(proc.stdout)
    if "No such command" not in proc.stderr:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-3000:]}")
    from gptoss_cli.bench import run_bench
    from gptoss_cli.config import load_config

    sets = [a for flag, a in zip(args, args[1:], strict=False) if flag == "--set"]
    cfg = load_config(args[args.index("--config") + 1], sets)
    number = {flag: int(args[args.index(flag) + 1]) for flag in ("--steps", "--warmup") if flag in args}
    return run_bench(
        cfg,
        train="--infer" not in args,
        infer="--train" not in args,
        steps=number.get("--steps", 5),
        warmup=number.get("--warmup", 2),
        compile_decode="--compile-decode" in args,
    )


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    RESULTS["device"] = {
        "gpu": torch.cuda.get_device_name(),
        "capability": torch.cuda.get_device_capability(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(RESULTS["device"]), flush=True)
    record("moe_grouped_vs_loop", check_moe)
    record("moe_grouped_no_host_sync", check_no_host_sync)
    record("attention_sdpa_vs_eager", check_attention)
    record("fused_loss_vs_plain", check_fused_loss)
    record("bench_compact", lambda: gptoss_bench("--config", "compact", "--steps", "10", "--warmup", "3"))
    record(
        "bench_compact_batch8_no_ckpt",
        lambda: gptoss_bench(
            "--config",
            "compact",
            "--train",
            "--steps",
            "10",
            "--warmup",
            "3",
            "--set",
            "train.batch_size=8",
            "--set",
            "train.activation_checkpointing=false",
        ),
    )
    # The CUDA-graph decode step (infer --compile): the only way batch-1 decoding can near its bound.
    record(
        "bench_compact_compiled_decode",
        lambda: gptoss_bench("--config", "compact", "--infer", "--compile-decode", "--steps", "3", "--warmup", "1"),
    )
    summary = {}
    for name in ("bench_compact", "bench_compact_batch8_no_ckpt", "bench_compact_compiled_decode"):
        rep, line = RESULTS.get(name, {}), summary.setdefault(name, {})
        if "train" in rep:
            tr = rep["train"]
            line |= {
                "mfu": tr["mfu"],
                "tokens_per_s": tr["tokens_per_s"],
                "ms_per_step": tr["ms_per_step"],
                "peak_memory_gib": tr["peak_memory_bytes"] / 2**30,
                "mfu_target_0.35_met": tr["mfu"] >= 0.35,
            }
        if "infer" in rep:
            inf = rep["infer"]
            line |= {
                "decode_tokens_per_s": [d["tokens_per_s"] for d in inf["decode"]],
                "decode_batch1_of_bandwidth_bound": inf["decode_batch1_of_bound"],
                "decode_target_0.5_met": inf["decode_batch1_of_bound"] >= 0.5,
            }
    RESULTS["summary"] = summary
    print("summary:", json.dumps(summary, indent=1), flush=True)
    if OUT:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
