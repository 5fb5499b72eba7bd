"""gpt-oss-20b with packed MXFP4 experts on a CPU: import peak memory, inference working set and decode speed,
against transformers' own MXFP4 path on the same checkpoint.

A synthetic Hugging Face checkpoint with gpt-oss-20b's shapes (configs/gpt-oss-20b.yaml; `--layers` of its
24, random MXFP4 experts, random bf16 elsewhere, one shard per layer as the released files shard by size)
is written to --dir, then, each in a fresh process so that its peak RSS is its own:

1. `gptoss import` keeps the experts packed: peak RSS (VmHWM, memory-mapped source pages included) and peak
   anonymous memory (sampled every 20 ms) against the packed size on disk.
2. `gptoss infer --dtype bf16 --device cpu`: greedy decode tokens/s, the working set (the RSS infer samples
   while it generates), and the process's peak RSS (which also counts the checkpoint's pages mapped while
   loading: the kernel drops those under pressure) and peak anonymous memory.
3. transformers `AutoModelForCausalLM.from_pretrained` of the same directory and `generate()` (greedy): on a
   CPU without its Triton kernels transformers decodes every expert to bf16 at load (Mxfp4Config's
   dequantize path), so this step needs the bf16 model's memory; `--skip-hf` leaves it out.

    uv run python benchmarks/mxfp4_20b.py --dir /tmp/g20 --layers 4 --new-tokens 8
    uv run python benchmarks/mxfp4_20b.py --dir /tmp/g20 --layers 24 --skip-hf   # the full size (13 GB)

A benchmark, not a test: numbers depend on the machine; docs/performance.md records runs.
`write_checkpoint` is also the synthetic checkpoint of tests/integration/test_mxfp4_runs.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptoss_cli.interop.names import HF_MXFP4_CONFIG

GIB = 2**30
# gpt-oss-20b's config.json (the released one's keys and MXFP4 quantization_config).
CONFIG_20B = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "num_hidden_layers": 24,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "max_position_embeddings": 131072,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "original_max_position_embeddings": 4096,
        "truncate": False,
    },
    "rms_norm_eps": 1e-5,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "swiglu_limit": 7.0,
    "initializer_range": 0.02,
    "hidden_act": "silu",
    "dtype": "bfloat16",
    "quantization_config": HF_MXFP4_CONFIG,
}


def _layer(i: int, c: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors in HF names: bf16 N(0, 0.02) matrices, MXFP4 experts with random codes
    and scales 2^-9..2^-6 (values of the size of trained weights)."""
    h, e, inter, d = c["hidden_size"], c["num_local_experts"], c["intermediate_size"], c["head_dim"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]

    def normal(*shape):
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    p = f"model.layers.{i}."
    out = {
        p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p + "self_attn.q_proj.weight": normal(nh * d, h),
        p + "self_attn.q_proj.bias": normal(nh * d),
        p + "self_attn.k_proj.weight": normal(nkv * d, h),
        p + "self_attn.k_proj.bias": normal(nkv * d),
        p + "self_attn.v_proj.weight": normal(nkv * d, h),
        p + "self_attn.v_proj.bias": normal(nkv * d),
        p + "self_attn.o_proj.weight": normal(h, nh * d),
        p + "self_attn.o_proj.bias": normal(h),
        p + "self_attn.sinks": normal(nh),
        p + "mlp.router.weight": normal(e, h),
        p + "mlp.router.bias": normal(e),
        p + "mlp.experts.gate_up_proj_bias": normal(e, 2 * inter),
        p + "mlp.experts.down_proj_bias": normal(e, h),
    }
    for name, rows, cols in (("gate_up_proj", 2 * inter, h), ("down_proj", h, inter)):
        out[p + f"mlp.experts.{name}_blocks"] = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=g).to(
            torch.uint8
        )
        out[p + f"mlp.experts.{name}_scales"] = torch.randint(118, 122, (e, rows, cols // 32), generator=g).to(
            torch.uint8
        )
    return out


def write_checkpoint(out: Path, layers: int, vocab_size: int = 201088, seed: int = 0) -> dict:
    """An HF MXFP4 gpt_oss directory with gpt-oss-20b's shapes, `layers` layers and `vocab_size` tokens:
    config.json, one shard per layer plus one for the embeddings, model.safetensors.index.json. Each shard
    is made, written and dropped in turn. Returns {"bytes", "largest_shard", "packed_bytes"}."""
    out.mkdir(parents=True, exist_ok=True)
    config = CONFIG_20B | {"num_hidden_layers": layers, "vocab_size": vocab_size}
    config["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    g = torch.Generator().manual_seed(seed)
    n = layers + 1
    weight_map, sizes = {}, []
    for k in range(n):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        if k < layers:
            tensors = _layer(k, config, g)
        else:
            h = config["hidden_size"]
            tensors = {
                "model.embed_tokens.weight": (torch.randn(vocab_size, h, generator=g) * 0.02).to(torch.bfloat16),
                "lm_head.weight": (torch.randn(vocab_size, h, generator=g) * 0.02).to(torch.bfloat16),
                "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
            }
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        sizes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        del tensors
    total = sum(sizes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return {"bytes": total, "largest_shard": max(sizes), "layer_bytes": sizes[0]}


def peak_memory(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` to completion: its peak RSS (VmHWM: memory-mapped file pages included) and its peak
    anonymous memory (RssAnon), both read from /proc every 20 ms, in bytes; its time and output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks = {"VmHWM:": 0, "RssAnon:": 0}

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    key = line.split(":")[0] + ":"
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {stderr[-2000:]}")
    return {
        "peak_rss": peaks["VmHWM:"],
        "peak_anon": peaks["RssAnon:"],
        "seconds": seconds,
        "stdout": stdout,
        "stderr": stderr,
    }


GPTOSS = [sys.executable, "-c", "from gptoss_cli.cli import main; main()"]

HF_SCRIPT = """
import json, resource, sys, time, torch, transformers
torch.set_num_threads(int(sys.argv[3]))
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
experts = type(model.model.layers[0].mlp.experts).__name__
ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
n = int(sys.argv[2])
def run(k):
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)
    return time.perf_counter() - start, out[0, ids.shape[1]:].tolist()
run(2)
t1, _ = run(1)
tn, tokens = run(n)
print(json.dumps({"decode_tokens_per_s": (n - 1) / (tn - t1), "tokens": tokens, "experts_module": experts,
                  "transformers": transformers.__version__}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="where the synthetic checkpoint and run go")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=201088)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-hf", action="store_true", help="leave transformers out (it needs the bf16 model)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the run afterwards")
    args = ap.parse_args()
    src, run = args.dir / "hf", args.dir / "run"
    shutil.rmtree(args.dir, ignore_errors=True)
    start = time.perf_counter()
    sizes = write_checkpoint(src, args.layers, args.vocab)
    print(f"wrote {sizes['bytes'] / GIB:.2f} GiB in {time.perf_counter() - start:.0f} s ({args.layers} layers)")
    from gptoss_cli.data.tokenizer import train_tokenizer

    train_tokenizer(["The capital of France is Paris. Mixture of experts route tokens."] * 4, 300).save(
        str(src / "tokenizer.json")
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GPTOSS_DEBUG": "0"}
    imp = peak_memory([*GPTOSS, "import", str(src), "--run", str(run), "--json"], env)
    packed = json.loads(imp["stdout"])["bytes"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu(),
        "threads": args.threads,
        "torch": torch.__version__,
        "layers": args.layers,
        "checkpoint_gib": sizes["bytes"] / GIB,
        "import": {
            "seconds": imp["seconds"],
            "run_checkpoint_gib": packed / GIB,
            "peak_rss_gib": imp["peak_rss"] / GIB,
            "peak_anon_gib": imp["peak_anon"] / GIB,
            "peak_rss_over_packed": imp["peak_rss"] / packed,
        },
    }
    infer = peak_memory(
        [
            *GPTOSS,
            "infer",
            "The capital of France is",
            "--run",
            str(run),
            "--device",
            "cpu",
            "--dtype",
            "bf16",
            "--temperature",
            "0",
            "-n",
            str(args.new_tokens),
            "--json",
        ],
        env,
    )
    speed = re.search(r"decode ([0-9.]+) tokens/s", infer["stderr"])
    working = re.search(r"peak memory ([0-9,.]+) MiB", infer["stderr"])  # RSS sampled while generating
    result["gptoss"] = {
        "decode_tokens_per_s": float(speed.group(1)) if speed else None,
        "new_tokens": json.loads(infer["stdout"])["new_tokens"],
        "working_set_rss_gib": float(working.group(1).replace(",", "")) / 1024 if working else None,
        "peak_rss_gib": infer["peak_rss"] / GIB,
        "peak_anon_gib": infer["peak_anon"] / GIB,
    }
    if not args.skip_hf:
        hf = peak_memory([sys.executable, "-c", HF_SCRIPT, str(src), str(args.new_tokens), str(args.threads)], env)
        result["transformers"] = json.loads(hf["stdout"].splitlines()[-1]) | {"peak_rss_gib": hf["peak_rss"] / GIB}
    print(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


def _cpu() -> str:
    from gptoss_cli.bench import cpu_name

    return f"{cpu_name()} ({platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
