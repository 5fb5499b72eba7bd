"""LoRA fine-tuning with gpt-oss-20b's shapes on a CPU: the memory of a LoRA step with the experts kept packed
in MXFP4, its speed beside a full-training step of the same model, and the same step with PEFT on transformers.

A synthetic Hugging Face checkpoint with gpt-oss-20b's shapes (benchmarks/mxfp4_20b.py `write_checkpoint`:
`--layers` of its 24, random MXFP4 experts) is imported packed (`gptoss import`), then each measurement runs
in a fresh process, its memory read from /proc every 20 ms: the peak RSS (VmHWM, which also counts the
checkpoint's pages mapped while loading), the peak anonymous memory, and the peak RSS once the first step has
begun (the step's own working set):

1. gptoss LoRA: `gptoss train --init-from RUN` with lora.rank (default 8, alpha 16) on attention and experts,
   seq 1024, batch 1, train.precision=bf16 (frozen bf16 base, packed experts, fp32 adapters and AdamW),
   activation checkpointing: seconds per step and tokens/s from metrics.jsonl (the first step left out).
2. `--compare`: on the same checkpoint, a full-training step of the same model (`gptoss train --init-from`
   without lora: the experts decoded to trainable bf16, every weight in AdamW), and PEFT 0.21 on
   transformers: `GptOssForCausalLM` (its MXFP4 experts decoded to bf16 at load on a CPU) with
   `LoraConfig(r, lora_alpha, target_modules=[q_proj, k_proj, v_proj, o_proj], target_parameters=[experts'
   gate_up_proj, down_proj])`, gradient checkpointing, AdamW over the adapters, the same batch shape. Full
   training and transformers hold every expert decoded, so the comparison runs on a few layers.

    uv run python benchmarks/lora_20b.py --dir /tmp/l20/r2 --layers 2 --compare --steps 3
    uv run python benchmarks/lora_20b.py --dir /tmp/l20/full --layers 24 --steps 2   # the full size (13 GB)

A benchmark, not a test: numbers depend on the machine; docs/performance.md records runs. The directory is
deleted afterwards unless --keep; `--reuse` measures again on the checkpoint a `--keep` run left there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

GIB = 2**30
HERE = Path(__file__).resolve().parent
MARKERS = ("training: started", "steps: started")  # gptoss's progress line off a terminal; the PEFT script's


def _mxfp4_20b():
    spec = importlib.util.spec_from_file_location("mxfp4_20b", HERE / "mxfp4_20b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sampled(cmd: list[str], env: dict) -> dict:
    """Run `cmd`, sampling /proc/PID/status every 20 ms: peak VmHWM, peak RssAnon, and the peak VmRSS after
    the process printed a line of MARKERS on stderr (its first step began). Returns those and its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks = {"VmHWM:": 0, "RssAnon:": 0, "step": 0}
    started = threading.Event()
    err_lines: list[str] = []

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    key, value = line.split(":")[0] + ":", line.split()[1:2]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value[0]) * 1024)
                    if key == "VmRSS:" and started.is_set():
                        peaks["step"] = max(peaks["step"], int(value[0]) * 1024)
            except (OSError, ValueError, IndexError):
                return
            time.sleep(0.02)

    def read_err() -> None:
        for line in proc.stderr:
            err_lines.append(line)
            if any(m in line for m in MARKERS):
                started.set()

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    stdout = proc.stdout.read()
    proc.wait()
    seconds = time.perf_counter() - start
    for t in threads:
        t.join()
    stderr = "".join(err_lines)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed ({proc.returncode}): {stderr[-3000:]}")
    return {
        "load_average_after": os.getloadavg()[0],  # the machine is shared: other processes slow a measurement
        "peak_rss_gib": peaks["VmHWM:"] / GIB,
        "peak_anon_gib": peaks["RssAnon:"] / GIB,
        "step_peak_rss_gib": peaks["step"] / GIB,
        "seconds": seconds,
        "stdout": stdout,
        "stderr": stderr,
    }


def train_args(run: Path, out: Path, steps: int, seq: int, lora: dict | None) -> list[str]:
    sets = {
        "train.seq_len": seq,
        "train.batch_size": 1,
        "train.precision": "bf16",
        "train.activation_checkpointing": "true",
        "train.max_steps": steps,
        "train.warmup_steps": 0,
        "train.log_every": 1,
        "train.eval_every": 100000,
        "train.eval_batches": 1,
        "train.save_every": 100000,
        "train.aux_loss_coef": 0,  # transformers' GptOss computes no router loss unless asked
        "train.device": "cpu",
    }
    if lora:
        sets |= {f"lora.{k}": v for k, v in lora.items()}
    args = ["train", "--init-from", str(run), "--run", str(out), "--json"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def gptoss_step(run: Path, out: Path, steps: int, seq: int, env: dict, lora: dict | None) -> dict:
    """One `gptoss train` process: seconds per step (steps after the first) and its memory."""
    done = sampled([*_mxfp4_20b().GPTOSS, *train_args(run, out, steps, seq, lora)], env)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_s"] for x in lines if x["kind"] == "train"][1:]
    rate = sum(rates) / len(rates) if rates else None
    start_line = next((x for x in done["stderr"].splitlines() if x.startswith("LoRA rank")), None)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "tokens_per_s": rate,
        "s_per_step": seq / rate if rate else None,
        "start_line": start_line,
        **{k: v for k, v in done.items() if k not in ("stdout", "stderr")},
    }


PEFT_SCRIPT = """
import json, sys, time, torch, transformers, peft
src, steps, seq, rank, alpha, threads = sys.argv[1], *map(int, sys.argv[2:7])
torch.set_num_threads(threads)
model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
model = peft.get_peft_model(model, config)
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.enable_input_require_grads()
model.train()
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=1e-4)
ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
print("steps: started", file=sys.stderr, flush=True)
times = []
for _ in range(steps):
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
print(json.dumps({"s_per_step": sum(times[1:]) / len(times[1:]), "times": times, "loss": loss.item(),
                  "trainable_params": sum(p.numel() for p in trainable), "adapter_dtype": str(trainable[0].dtype),
                  "experts_module": type(model.base_model.model.model.layers[0].mlp.experts).__name__,
                  "peft": peft.__version__, "transformers": transformers.__version__}))
"""


def peft_step(src: Path, steps: int, seq: int, rank: int, alpha: int, threads: int, env: dict) -> dict:
    cmd = [sys.executable, "-c", PEFT_SCRIPT, str(src), str(steps), str(seq), str(rank), str(alpha), str(threads)]
    done = sampled(cmd, env)
    result = json.loads(done["stdout"].splitlines()[-1])
    result["tokens_per_s"] = seq / result["s_per_step"]
    return result | {k: v for k, v in done.items() if k not in ("stdout", "stderr")}


def _write(bench, src: Path, run: Path, layers: int, vocab: int, env: dict) -> dict:
    """The synthetic checkpoint in `src`, imported packed into `run`. Returns its sizes."""
    sizes = bench.write_checkpoint(src, layers, vocab)
    from gptoss_cli.data.tokenizer import train_tokenizer

    train_tokenizer(["The capital of France is Paris. Mixture of experts route tokens."] * 4, 300).save(
        str(src / "tokenizer.json")
    )
    subprocess.run([*bench.GPTOSS, "import", str(src), "--run", str(run)], env=env, check=True, capture_output=True)
    return sizes


def _reused(src: Path, run: Path, layers: int, vocab: int) -> dict:
    """The sizes of the checkpoint an earlier --keep run left, refused unless it has these shapes."""
    config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    if (config.get("num_hidden_layers"), config.get("vocab_size")) != (layers, vocab) or not run.is_dir():
        raise SystemExit(f"--reuse: {src.parent} holds no kept checkpoint with {layers} layers and vocab {vocab}")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return {"bytes": index["metadata"]["total_size"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="where the synthetic checkpoint and runs go")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=201088)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2, help="training steps per measurement (the first is left out)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--compare", action="store_true", help="also full training and PEFT on transformers")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the run afterwards")
    ap.add_argument("--reuse", action="store_true", help="measure on the checkpoint a --keep run left in --dir")
    args = ap.parse_args()
    bench = _mxfp4_20b()
    src, run = args.dir / "hf", args.dir / "run"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GPTOSS_DEBUG": "0"}
    if args.reuse:
        sizes = _reused(src, run, args.layers, args.vocab)
    else:
        shutil.rmtree(args.dir, ignore_errors=True)
        sizes = _write(bench, src, run, args.layers, args.vocab, env)
    lora = {"rank": args.rank, "alpha": args.alpha, "targets": "[attention,experts]"}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": bench._cpu(),
        "threads": args.threads,
        "torch": torch.__version__,
        "layers": args.layers,
        "vocab": args.vocab,
        "seq": args.seq,
        "checkpoint_gib": sizes["bytes"] / GIB,
        "gptoss_lora": gptoss_step(run, args.dir / "lora", args.steps, args.seq, env, lora),
    }
    if args.compare:
        result["gptoss_full"] = gptoss_step(run, args.dir / "full", args.steps, args.seq, env, None)
        result["peft"] = peft_step(src, args.steps, args.seq, args.rank, args.alpha, args.threads, env)
    print(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
