"""llama.cpp against gptoss on the same run: greedy tokens compared, batch-1 decode tokens/s side by side.

    uv run python benchmarks/llama_cpp.py --run runs/demo --new-tokens 128 --threads 1 2 --rounds 5

The run is exported with gptoss's own GGUF exporter (`--dtype fp32` by default, so both sides compute in
fp32) into a temporary directory.

- Greedy: llama.cpp's `llama-simple` (greedy sampling, every token written as it comes) continues the prompt;
  gptoss continues it with its decode core (run/open.py's load_run, infer/generate.py's generate); both stop
  at the same end-of-generation tokens (<|endoftext|>, <|end|>, <|return|>). llama.cpp's bytes are compared
  with gptoss's tokens one by one. A divergence is reported with the narrowest margin gptoss's choice hinged
  on at that step: its two best logits, or a router's k-th and (k+1)-th expert logits in any layer (a flipped
  expert changes the output a lot). A near-tie, a margin within what fp32 sums in another order move, is an
  honest divergence; a wide margin is a bug.
- Decode speed: tokens/s of decoding N tokens one at a time after the prompt, on the same CPU threads:
  `llama-bench -p 0 -n N -d PROMPT` (llama.cpp's own measurement) against gptoss's
  GenerationStats.decode_tokens_per_s (the same prompt, greedy, no stop). Rounds alternate the two and swap
  who goes first; the medians are reported with the ratio llama.cpp / gptoss.

llama.cpp is found through GPTOSS_LLAMA_CPP (the directory holding llama-simple, llama-tokenize and
llama-bench) or PATH; docs/development.md says how to build them. The tests
(tests/integration/test_gguf_llama_cpp.py) use the same functions. A benchmark, not a test:
docs/performance.md records one run with its CPU and date.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

TOOLS = ("llama-simple", "llama-tokenize", "llama-bench")
EOG_TOKENS = ("<|endoftext|>", "<|end|>", "<|return|>")  # llama.cpp ends generation at each (llama-vocab.cpp)
NEAR_TIE = 1e-3  # a margin below this x the largest |logit| it is taken from is a near-tie


# ---- finding and running llama.cpp ----------------------------------------------------------------------


def find_llama_cpp() -> Path | None:
    """The directory holding llama.cpp's tools: $GPTOSS_LLAMA_CPP, else the one on PATH; None without them."""
    env = os.environ.get("GPTOSS_LLAMA_CPP")
    if env:
        root = Path(env)
        for d in (root, root / "bin", root / "build" / "bin"):
            if all((d / t).is_file() for t in TOOLS):
                return d
        return None
    found = [shutil.which(t) for t in TOOLS]
    return Path(found[0]).parent if all(found) else None


def llama_version(bin_dir: Path) -> str:
    out = subprocess.run([str(bin_dir / "llama-bench"), "--version"], capture_output=True, text=True)
    line = next((s for s in (out.stdout + out.stderr).splitlines() if s.startswith("version")), "version unknown")
    return line.removeprefix("version: ").strip()


def llama_tokenize(bin_dir: Path, gguf: Path, text: str) -> list[int]:
    """llama.cpp's token ids for `text` (special tokens parsed, no BOS added: the GGUF says add_bos false)."""
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", newline="", suffix=".txt", delete=False) as f:
        f.write(text)
    try:
        cmd = [str(bin_dir / "llama-tokenize"), "-m", str(gguf), "-f", f.name, "--ids", "--no-escape", "--log-disable"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_greedy(bin_dir: Path, gguf: Path, prompt: str, n: int) -> bytes:
    """llama.cpp's greedy continuation of `prompt` (up to `n` tokens, special tokens written as their text).
    llama-simple writes the prompt back first and a newline last."""
    cmd = [str(bin_dir / "llama-simple"), "-m", str(gguf), "-n", str(n), prompt]
    out = subprocess.run(cmd, capture_output=True, check=True).stdout
    if not (out.startswith(prompt.encode()) and out.endswith(b"\n")):
        raise RuntimeError(f"llama-simple wrote {out[:200]!r}, not the prompt and its continuation")
    return out[len(prompt.encode()) : -1]


def llama_decode_speed(bin_dir: Path, gguf: Path, n: int, threads: int, depth: int) -> float:
    """llama-bench's tokens/s for generating `n` tokens one at a time after `depth` tokens of context."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(n), "-d", str(depth)]
    cmd += ["-t", str(threads), "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


# ---- gptoss's side ---------------------------------------------------------------------------------------


def pieces(tok, ids: list[int]) -> list[bytes]:
    """Each token's bytes as llama.cpp writes them with special tokens shown (data/tokenizer.token_bytes);
    ids past the tokenizer's (the GGUF's unused placeholders) are written as nothing."""
    from gptoss_cli.data.tokenizer import token_bytes

    return [token_bytes(tok, i) if tok.id_to_token(i) is not None else b"" for i in ids]


@dataclass
class GptossCompletion:
    ids: list[int]
    margins: list[float]  # per step: the narrowest relative margin the greedy choice hinged on (see above)
    decode_tokens_per_s: float


def _margin(values: torch.Tensor, k: int) -> torch.Tensor:
    """(..., n) logits -> (...) (k-th largest - (k+1)-th largest) / max |logit|."""
    top = values.float().topk(k + 1, dim=-1).values
    return (top[..., k - 1] - top[..., k]) / values.float().abs().amax(-1).clamp_min(1e-30)


def gptoss_complete(
    loaded, prompt: str, n: int, keep_margins: bool = False, stop: bool = True, compile_decode: bool = False
) -> GptossCompletion:
    """Greedy continuation with gptoss's decode core, stopping where llama.cpp stops (unless not `stop`: then
    exactly `n` tokens, as llama-bench decodes). `keep_margins` records
    each step's margins: the output's top-2, and every layer's router at the last position (forward hooks
    on each MoE block's norm, whose output the router reads)."""
    from gptoss_cli.config import InferConfig
    from gptoss_cli.infer.generate import batch_states, generate

    tok, model = loaded.tokenizer, loaded.model
    ids = tok.encode(prompt).ids
    stops = frozenset(i for i in map(tok.token_to_id, EOG_TOKENS) if i is not None and stop)
    params = InferConfig(max_new_tokens=n, temperature=0.0)
    states = batch_states(model, [ids], params, eos_id=None, tokenizer=tok, stop_ids=stops)
    margins: list[float] = []
    routers: list[float] = []  # this forward's router margins, one per layer

    def router(block):
        def hook(module, inputs, normed):  # normed (B, T, H): the router's input
            gate = block.mlp.gate
            logits = torch.nn.functional.linear(normed[0, -1].float(), gate.weight.float(), gate.bias)
            routers.append(float(_margin(logits, block.mlp.experts_per_token)))

        return hook

    def step(logits: torch.Tensor) -> None:  # after every forward: (B, V) next-token logits
        margins.append(min([float(_margin(logits[0], 1)), *routers]))
        routers.clear()

    hooks = [b.mlp.norm.register_forward_hook(router(b)) for b in model.block] if keep_margins else []
    try:
        on_logits = step if keep_margins else None
        stats = generate(model, [ids], states, pad_id=0, on_logits=on_logits, compile_decode=compile_decode)
    finally:
        for h in hooks:
            h.remove()
    return GptossCompletion(states[0].out, margins, stats.decode_tokens_per_s)


@dataclass
class GreedyMatch:
    tokens: int  # gptoss's greedy tokens
    agreed: int  # of them, the leading ones whose bytes llama.cpp wrote too
    near_tie: bool | None  # at a divergence: whether gptoss's choice there hinged on a near-tie
    margin: float | None  # that step's narrowest margin (relative)


def compare_greedy(tok, ours: GptossCompletion, theirs: bytes) -> GreedyMatch:
    """How far llama.cpp's text follows gptoss's greedy tokens (byte prefixes, token by token). Both leave out
    the end-of-generation token they stop at."""
    done, agreed = b"", 0
    for piece in pieces(tok, ours.ids):
        if not theirs.startswith(done + piece):
            break
        done += piece
        agreed += 1
    if agreed == len(ours.ids) and theirs == done:
        return GreedyMatch(len(ours.ids), agreed, None, None)
    margin = ours.margins[agreed] if agreed < len(ours.margins) else None
    return GreedyMatch(len(ours.ids), agreed, margin is not None and margin < NEAR_TIE, margin)


# ---- the benchmark ---------------------------------------------------------------------------------------


def export(run: Path, out: Path, dtype: str, quantize: str | None) -> Path:
    from gptoss_cli.interop.gguf_export import export_gguf

    path = out / f"model-{dtype}{'-' + quantize if quantize else ''}.gguf"
    export_gguf(run, path, dtype=dtype, quantize=quantize)
    return path


def measure(loaded, bin_dir: Path, gguf: Path, args, threads: int) -> dict:
    """Alternating rounds at one thread count -> medians of the decode speeds and the ratios. With
    `args.compile` gptoss's compiled decode step (`infer --compile`) runs in the rounds too."""
    depth = len(loaded.tokenizer.encode(args.prompt[0]).ids)
    names = ["gptoss", "llama.cpp"] + (["gptoss --compile"] if args.compile else [])
    rounds: dict[str, list[float]] = {name: [] for name in names}
    torch.set_num_threads(threads)
    if args.compile:  # the first call compiles (seconds); the rounds reuse the compiled step
        gptoss_complete(loaded, args.prompt[0], args.new_tokens, stop=False, compile_decode=True)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # who goes first rotates
            if name == "llama.cpp":
                speed = llama_decode_speed(bin_dir, gguf, args.new_tokens, threads, depth)
            else:
                done = gptoss_complete(
                    loaded, args.prompt[0], args.new_tokens, stop=False, compile_decode=name != "gptoss"
                )
                speed = done.decode_tokens_per_s
            rounds[name].append(speed)
    medians = {name: statistics.median(v) for name, v in rounds.items()}
    out = {"threads": threads, "tokens_per_s": medians, "rounds": rounds}
    out["ratio"] = {name: medians["llama.cpp"] / medians[name] for name in names if name != "llama.cpp"}
    return out


def greedy(loaded, bin_dir: Path, gguf: Path, prompts: list[str], n: int) -> list[dict]:
    torch.set_num_threads(1)
    out = []
    for prompt in prompts:
        ours = gptoss_complete(loaded, prompt, n, keep_margins=True)
        match = compare_greedy(loaded.tokenizer, ours, llama_greedy(bin_dir, gguf, prompt, n))
        out.append({"prompt": prompt} | asdict(match))
    return out


def report(result: dict) -> None:
    print(f"{result['date']}, {result['cpu']}, llama.cpp {result['llama_cpp']}, torch {result['torch']}")
    print(f"run {result['run']} (step {result['step']}), GGUF {result['gguf']}, {result['new_tokens']} new tokens")
    for g in result["greedy"]:
        if g["near_tie"] is None:
            verdict = f"identical for all {g['agreed']} tokens"
        else:
            kind = "a near-tie" if g["near_tie"] else "NOT a near-tie"
            verdict = f"identical for {g['agreed']} of {g['tokens']} tokens, then {kind} (margin {g['margin']:.1e})"
        print(f"greedy {g['prompt']!r}: {verdict}")
    print(f"decode tokens/s, prompt {result['speed_prompt']!r}, median of {result['rounds']} alternating rounds:")
    names = list(result["decode"][0]["tokens_per_s"])
    ours = [n for n in names if n != "llama.cpp"]
    head = [f"{n} tok/s" for n in names] + [f"llama.cpp / {n}" for n in ours]
    print("threads  " + "  ".join(f"{h:>18}" for h in head))
    for s in result["decode"]:
        cells = [f"{s['tokens_per_s'][n]:,.1f}" for n in names] + [f"{s['ratio'][n]:.2f}x" for n in ours]
        print(f"{s['threads']:>7}  " + "  ".join(f"{c:>18}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a trained run (gptoss train --config tiny --run ...)")
    ap.add_argument("--prompt", nargs="+", default=["GPT models are", "The attention", "In 2024, the"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="of the GGUF's matrices")
    ap.add_argument("--quantize", choices=("mxfp4",), help="the GGUF's experts in MXFP4")
    ap.add_argument("--compile", action="store_true", help="also time gptoss's compiled decode step")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    bin_dir = find_llama_cpp()
    if bin_dir is None:
        raise SystemExit("llama.cpp not found: set GPTOSS_LLAMA_CPP to its bin directory (docs/development.md)")

    from gptoss_cli.bench import cpu_name
    from gptoss_cli.run.open import load_run

    loaded = load_run(args.run, device="cpu", dtype="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = export(args.run, Path(tmp), args.dtype, args.quantize)
        matches = greedy(loaded, bin_dir, gguf, args.prompt, args.new_tokens)
        speeds = [measure(loaded, bin_dir, gguf, args, t) for t in args.threads]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "llama_cpp": llama_version(bin_dir),
        "torch": torch.__version__,
        "run": str(args.run),
        "step": loaded.step,
        "gguf": f"{args.dtype}{' + experts ' + args.quantize if args.quantize else ''}",
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "speed_prompt": args.prompt[0],
        "greedy": matches,
        "decode": speeds,
    }
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
