"""Batch-1 greedy decode speed: gptoss's KV-cache loop against transformers' `GptOssForCausalLM.generate()`.

Both models get the same shapes and the same weights, built as benchmarks/compare_hf.py builds them (the
product's own name map, docs/interop.md#the-weight-map), fp32, in one process. Each implementation generates
1 token and N tokens from the same prompt; decode ms/token is (t(N) - t(1)) / (N - 1), so the prefill and
fixed costs cancel. Rounds alternate the two implementations and
the medians are reported. The greedy tokens of both are compared as a correctness check.

    uv run python benchmarks/compare_hf_decode.py --new-tokens 128 --threads 1

A benchmark, not a test: numbers depend on the machine; docs/inference.md records one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import transformers
from compare_hf import bench_config, build_hf  # same folder: the shapes and the HF twin of one benchmark
from transformers import GptOssForCausalLM

from gptoss_cli.bench import cpu_name
from gptoss_cli.config import InferConfig
from gptoss_cli.infer.generate import generate_tokens
from gptoss_cli.model import Transformer
from gptoss_cli.run.checkpoint import weights_state_dict


def ours_generate(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids, _, _ = generate_tokens(model, [prompt], InferConfig(max_new_tokens=n, temperature=0.0), pad_id=0, eos_id=None)
    return ids[0]


@torch.inference_mode()
def hf_generate(model: GptOssForCausalLM, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
    return out[0, len(prompt) :].tolist()


def timed(fn, *args) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise on a shared box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.new_tokens
    cfg = bench_config(context=max(1024, args.prompt_tokens + n))
    torch.manual_seed(0)
    ours = Transformer(cfg)
    ours.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # spread the logits, so greedy choices are not near-ties between the two libraries
        ours.embedding.weight.mul_(10)
    ours.eval()
    hf = build_hf(cfg, weights_state_dict(ours)).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()

    impls = {"gptoss": lambda k: ours_generate(ours, prompt, k), "hf": lambda k: hf_generate(hf, prompt, k)}
    for fn in impls.values():  # warm-up (first-call allocations, lazy inits)
        fn(2)
    times = {name: {1: [], n: []} for name in impls}
    tokens = {}
    for r in range(args.rounds):
        order = list(impls) if r % 2 == 0 else list(reversed(impls))
        for name in order:
            for k in (1, n):
                dt, out = timed(impls[name], k)
                times[name][k].append(dt)
                tokens[name] = out if k == n else tokens.get(name)

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s)")
    print(
        f"model: 4 layers, hidden 256, intermediate 512, 8 experts top-2, 8 heads / 2 KV heads, head_dim 32, "
        f"vocab 8000, window 64, fp32; prompt {args.prompt_tokens} tokens, {n} new tokens, {args.rounds} rounds"
    )
    result = {}
    for name in impls:
        t1, tn = statistics.median(times[name][1]), statistics.median(times[name][n])
        result[name] = (tn - t1) / (n - 1) * 1e3
        print(
            f"{name:>7}: decode {result[name]:.2f} ms/token ({1e3 / result[name]:.0f} tokens/s), "
            f"prefill + first token {t1 * 1e3:.1f} ms, {n} tokens in {tn * 1e3:.0f} ms (medians)"
        )
    print(f"speed-up of gptoss over HF generate(): {result['hf'] / result['gptoss']:.2f}x")
    same = sum(a == b for a, b in zip(tokens["gptoss"], tokens["hf"], strict=True))
    print(f"greedy tokens identical: {same}/{n}" + ("" if same == n else " (fp32 near-ties can flip a choice)"))


if __name__ == "__main__":
    main()
