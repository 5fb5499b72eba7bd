"""gptoss against transformers' `GptOssForCausalLM`: training step, batch-1 decoding and peak training memory.

Both models get the benchmark shapes of docs/performance.md (4 layers, hidden 256, intermediate 512, 8 experts
top-2, 8 heads / 2 KV heads, head_dim 32, vocab 8000, window 64; compact layout: tied embeddings, no
qkv/out/router bias), fp32, and the same weights, mapped by `interop.names.to_hf_state_dict`. HF runs its
defaults: eager attention (the only one it allows with sinks) and `grouped_mm` experts.

- training: fwd + cross-entropy + bwd + fused AdamW step (ours: `train.optim.build_optimizer` and the trainer's
  loss with the MoE aux term; HF: `torch.optim.AdamW(fused=True)`, what its Trainer uses by default on
  torch >= 2.8) on random 8 x 256 batches; both in this process, alternating rounds, medians. "% of
  matmul" = FLOPs per token (sizing.describe: 3x forward) x tokens/s / the measured fp32 GEMM throughput
  (bench.peak_flops: the fastest of GEMMs shaped like the model's own matmuls).
- decoding: batch-1 greedy, the median time between two generated tokens over all measured runs (ours:
  the `on_token` callback; HF: a streamer), eager and with our compiled decode step (`infer --compile`:
  a static KV cache and torch.compile; its first step, which compiles, is left out).
- memory: each model trains in its own subprocess; reported is the peak RSS (VmHWM) and its rise over
  the RSS just before the model was built (imports done). RSS, because torch's CPU allocator has no peak
  counter and tracemalloc does not see its allocations. (Not ru_maxrss: a child inherits its parent's.)

    uv run python benchmarks/compare_hf.py                    # --threads 1 --rounds 7 --new-tokens 64

A benchmark, not a test: docs/performance.md records runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import GptOssConfig, GptOssForCausalLM

from gptoss_cli.bench import cpu_name, peak_flops
from gptoss_cli.config import InferConfig, RunConfig, TrainConfig
from gptoss_cli.infer.generate import generate_tokens
from gptoss_cli.interop.names import to_hf_config, to_hf_state_dict
from gptoss_cli.memory import peak_rss
from gptoss_cli.model import ModelConfig, Transformer
from gptoss_cli.sizing import describe
from gptoss_cli.train.loss import objective
from gptoss_cli.train.optim import build_optimizer

BATCH, SEQ = 8, 256


def bench_config(context: int = 1024) -> ModelConfig:
    return ModelConfig(
        num_hidden_layers=4,
        num_experts=8,
        experts_per_token=2,
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=512,
        head_dim=32,
        num_attention_heads=8,
        num_key_value_heads=2,
        sliding_window=64,
        initial_context_length=context,
        max_context_length=context,
        tie_word_embeddings=True,
        attention_bias=False,
        router_bias=False,
    )


def build_ours(cfg: ModelConfig, weights: dict | None = None) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    if weights is None:
        model.init_weights(torch.Generator().manual_seed(0))
        with torch.no_grad():  # spread the logits, so greedy choices are not near-ties between the libraries
            model.embedding.weight.mul_(10)
    else:
        model.load_state_dict(weights, strict=False)  # a tied unembedding is not saved
    return model


def build_hf(cfg: ModelConfig, weights: dict) -> GptOssForCausalLM:
    hcfg = GptOssConfig(**to_hf_config(cfg, "float32", {"bos": None, "eos": None, "pad": 0}))
    hcfg._attn_implementation = "eager"  # HF refuses SDPA for gpt-oss (sinks)
    hf = GptOssForCausalLM(hcfg)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(cfg, weights), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.generation_config.eos_token_id = None  # generate exactly N tokens
    hf.generation_config.pad_token_id = 0
    return hf


def saved_weights(model: Transformer) -> dict:
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("unembedding.weight")
    return {k: v.contiguous() for k, v in sd.items()}


# ---- training steps ------------------------------------------------------------------------------


def ours_step_fn(model: Transformer, batches):
    t = TrainConfig(lr=1e-4)
    opt = build_optimizer(model, t, torch.device("cpu"))
    model.train()

    def step(i: int) -> None:
        inputs, targets = batches[i % len(batches)]
        objective(model, inputs, targets, t).loss.backward()  # the trainer's own loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_step_fn(model: GptOssForCausalLM, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    model.train()

    def step(i: int) -> None:
        inputs, targets = batches[i % len(batches)]
        logits = model(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def random_batches(vocab: int, n: int = 4) -> list:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=gen)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def memory_child(which: str, weights_path: str, steps: int, threads: int) -> None:
    """Runs in a subprocess: train `steps` steps of one model, print its RSS figures as JSON."""
    import psutil

    torch.set_num_threads(threads)
    cfg = bench_config()
    batches = random_batches(cfg.vocab_size)
    weights = load_file(weights_path)
    before = psutil.Process().memory_info().rss
    if which == "gptoss":
        step = ours_step_fn(build_ours(cfg, weights), batches)
    else:
        step = hf_step_fn(build_hf(cfg, weights), batches)
    del weights
    for i in range(steps):
        step(i)
    print(json.dumps({"before": before, "peak": peak_rss()}))


def measure_memory(weights_path: str, steps: int, threads: int) -> dict:
    out = {}
    for which in ("gptoss", "hf"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                which,
                "--weights",
                weights_path,
                "--memory-steps",
                str(steps),
                "--threads",
                str(threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---- decoding ------------------------------------------------------------------------------------


class _Stamps:
    """Times between consecutive generated tokens; HF calls put() once for the prompt, then per token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, _value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def steps(self, skip: int) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.times[skip:])]


def ours_decode(model: Transformer, prompt: list[int], n: int, compiled: bool) -> tuple[list[float], list[int]]:
    stamps = _Stamps()
    ids, _, _ = generate_tokens(
        model,
        [prompt],
        InferConfig(max_new_tokens=n, temperature=0.0),
        pad_id=0,
        eos_id=None,
        on_token=lambda row, tok: stamps.put(tok),
        compile_decode=compiled,
    )
    return stamps.steps(skip=1), ids[0]  # the first decode step may compile: left out


@torch.inference_mode()
def hf_decode(model: GptOssForCausalLM, prompt: list[int], n: int) -> tuple[list[float], list[int]]:
    stamps = _Stamps()
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, streamer=stamps
    )
    return stamps.steps(skip=2), out[0, len(prompt) :].tolist()  # put() #0 is the prompt, #1 the first token


def round_robin(fns: dict, rounds: int) -> dict[str, list[float]]:
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise on a shared box)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--memory-child", choices=("gptoss", "hf"), help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.weights, args.memory_steps, args.threads)
        return
    torch.set_num_threads(args.threads)
    cfg = bench_config()
    ours = build_ours(cfg)
    weights = saved_weights(ours)
    hf = build_hf(cfg, weights)

    # Same weights, same function: logits agree before anything is timed.
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ours.eval()(ids).logits - hf.eval()(input_ids=ids).logits).abs().max().item()

    batches = random_batches(cfg.vocab_size)
    steps = {"gptoss": ours_step_fn(ours, batches), "hf": hf_step_fn(hf, batches)}
    counter = {name: 0 for name in steps}

    def runner(name):
        def run():
            steps[name](counter[name])
            counter[name] += 1

        return run

    train_fns = {name: runner(name) for name in steps}
    for fn in train_fns.values():
        for _ in range(args.warmup):
            fn()
    train_t = round_robin(train_fns, args.rounds)

    run_cfg = RunConfig(model=cfg, train=TrainConfig(batch_size=BATCH, seq_len=SEQ), name="bench-shapes")
    flops_tok = describe(run_cfg)["train_flops_per_token"]
    peak, peak_src = peak_flops(run_cfg, torch.device("cpu"), torch.float32)

    # Decoding (eval mode, batch 1, greedy): the median time between two tokens over every measured run.
    ours.eval()
    hf.eval()
    n = args.new_tokens
    prompt = torch.randint(0, cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    gens = {
        "gptoss": lambda: ours_decode(ours, prompt, n, False),
        "hf": lambda: hf_decode(hf, prompt, n),
        "gptoss compiled": lambda: ours_decode(ours, prompt, n, True),
    }
    for g in gens.values():  # warm-up; compiles the decode step
        g()
    dec = {name: [] for name in gens}
    tokens = {}
    for r in range(max(3, args.rounds // 2)):
        for name in list(gens) if r % 2 == 0 else list(reversed(gens)):
            steps_s, tokens[name] = gens[name]()
            dec[name] += steps_s

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "weights.safetensors")
        save_file(weights, path)
        mem = measure_memory(path, args.memory_steps, args.threads)

    # ---- report ----
    print(
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, python {platform.python_version()}"
    )
    print(
        f"CPU: {cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"model: benchmark shapes, fp32; training batch {BATCH} x {SEQ}; max |logit difference| {diff:.2e}")
    print(f"matmul ceiling: {peak / 1e9:.0f} GFLOP/s ({peak_src}); {flops_tok / 1e6:.1f} MFLOP per training token")
    tps = {}
    for name, ts in train_t.items():
        med = statistics.median(ts)
        tps[name] = BATCH * SEQ / med
        print(
            f"train {name:>6}: {med * 1e3:7.1f} ms/step (min {min(ts) * 1e3:.1f}), {tps[name]:7,.0f} tokens/s, "
            f"{flops_tok * tps[name] / peak:.1%} of the matmul ceiling"
        )
    ratios = [h / o for o, h in zip(train_t["gptoss"], train_t["hf"], strict=True)]
    print(
        f"train speed-up gptoss / hf: {tps['gptoss'] / tps['hf']:.2f}x (median of per-round ratios "
        f"{statistics.median(ratios):.2f}x, {args.rounds} rounds)"
    )
    ms = {name: 1e3 * statistics.median(v) for name, v in dec.items()}
    for name in gens:
        print(
            f"decode {name:>15}: {ms[name]:.2f} ms/token ({1e3 / ms[name]:.0f} tokens/s) at batch 1 "
            f"(median of {len(dec[name])} steps)"
        )
    print(
        f"decode speed-up gptoss / hf: {ms['hf'] / ms['gptoss']:.2f}x eager, "
        f"{ms['hf'] / ms['gptoss compiled']:.2f}x with the compiled decode step (infer --compile)"
    )
    for name in ("gptoss", "gptoss compiled"):
        same = sum(a == b for a, b in zip(tokens[name], tokens["hf"], strict=True))
        print(f"greedy tokens identical, {name} vs hf: {same}/{n}")
    for name, m in mem.items():
        print(
            f"memory {name:>6}: peak RSS {m['peak'] / 2**20:,.0f} MiB, {(m['peak'] - m['before']) / 2**20:,.0f} MiB "
            f"above the RSS before the model was built ({args.memory_steps} training steps, own subprocess)"
        )
    rise = {name: m["peak"] - m["before"] for name, m in mem.items()}
    print(f"training memory rise gptoss / hf: {rise['gptoss'] / rise['hf']:.2f}")


if __name__ == "__main__":
    main()
