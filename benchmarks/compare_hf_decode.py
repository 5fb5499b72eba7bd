"""Batch-1 greedy decode speed: gptoss's KV-cache loop against transformers' `GptOssForCausalLM.generate()`.

Both models get the same shapes and the same weights (the name map of docs/interop.md#the-weight-map), fp32,
in one process. Each implementation generates 1 token and N tokens from the same prompt; decode ms/token is
(t(N) - t(1)) / (N - 1), so the prefill and fixed costs cancel. Rounds alternate the two implementations and
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
from transformers import GptOssConfig, GptOssForCausalLM

from gptoss_cli.bench import cpu_name
from gptoss_cli.config import InferConfig
from gptoss_cli.infer.generate import generate_tokens
from gptoss_cli.model import ModelConfig, Transformer


def tiny_config(context: int) -> ModelConfig:
    """The compact layout (tied embeddings, no qkv/out/router bias) at the benchmark shapes of docs/performance.md."""
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


def hf_model(ours: Transformer) -> GptOssForCausalLM:
    """An HF model of the same shape holding our weights (qkv rows split, expert matrices transposed)."""
    cfg = ours.config
    hcfg = GptOssConfig(
        num_hidden_layers=cfg.num_hidden_layers,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        sliding_window=cfg.sliding_window,
        rms_norm_eps=cfg.rms_norm_eps,
        swiglu_limit=cfg.swiglu_limit,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False,
        max_position_embeddings=cfg.max_context_length,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},  # else HF defaults to YaRN x32
        layer_types=[
            "sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.num_hidden_layers)
        ],
    )
    hcfg._attn_implementation = "eager"  # HF refuses SDPA for gpt-oss (sinks)
    sd = ours.state_dict()
    mapped = {
        "model.embed_tokens.weight": sd["embedding.weight"],
        "model.norm.weight": sd["norm.scale"],
        "lm_head.weight": sd["unembedding.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        src, dst = f"block.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attn.qkv.weight"].split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], dim=0)
        mapped |= {
            dst + "input_layernorm.weight": sd[src + "attn.norm.scale"],
            dst + "post_attention_layernorm.weight": sd[src + "mlp.norm.scale"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": sd[src + "attn.out.weight"],
            dst + "self_attn.sinks": sd[src + "attn.sinks"],
            dst + "mlp.router.weight": sd[src + "mlp.gate.weight"],
            dst + "mlp.router.bias": torch.zeros(cfg.num_experts),  # HF's router bias cannot be turned off
            dst + "mlp.experts.gate_up_proj": sd[src + "mlp.mlp1_weight"].transpose(1, 2),
            dst + "mlp.experts.gate_up_proj_bias": sd[src + "mlp.mlp1_bias"],
            dst + "mlp.experts.down_proj": sd[src + "mlp.mlp2_weight"].transpose(1, 2),
            dst + "mlp.experts.down_proj_bias": sd[src + "mlp.mlp2_bias"],
        }
    hf = GptOssForCausalLM(hcfg).eval()
    missing = set(hf.state_dict()) ^ set(mapped)
    assert not missing, missing
    hf.load_state_dict(mapped)
    hf.generation_config.eos_token_id = None  # generate exactly N tokens
    hf.generation_config.pad_token_id = 0
    return hf


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
    cfg = tiny_config(context=max(1024, args.prompt_tokens + n))
    torch.manual_seed(0)
    ours = Transformer(cfg)
    ours.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # spread the logits, so greedy choices are not near-ties between the two libraries
        ours.embedding.weight.mul_(10)
    ours.eval()
    hf = hf_model(ours)
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
