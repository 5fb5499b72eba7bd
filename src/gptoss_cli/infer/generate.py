"""Generation: load a trained run for inference and decode a batch of prompts with the KV cache.

    load_run(run, checkpoint)       config, tokenizer and weights, checked against each other; eval mode
    generate_tokens(model, ids)     left-padded prefill in one forward, then one token per step
    infer(prompts, ...)             both, plus streaming text, stop strings and memory telemetry

Batched prompts are left-padded with PAD at position -1, which the model's mask treats as an empty key,
so every row sees exactly its own tokens at positions 0..n-1 and its last real token sits in the last
column. A decode step is one forward over (B, 1) tokens plus sampling on the device (sampling.py); the
sampled ids are the only host sync, needed anyway to stream text and to stop at EOS or a stop string.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..config import InferConfig, RunConfig
from ..data.tokenizer import EOS, PAD
from ..devices import materialize, pick_device, resolve_dtype
from ..errors import GptossError
from ..model import KVCache, Transformer
from ..model.mxfp4 import pack_experts
from ..run.checkpoint import load_weights, packed_weights, tensor_names
from ..run.layout import RunDir
from ..run.open import open_run
from .compiled import compiled_step
from .sampling import NON_FINITE, TextStream, option_label, sample

MEMORY_EVERY = 16  # decode steps between inference memory samples


# ---- the generation loop -------------------------------------------------------------------------


@dataclass
class GenerationStats:
    batch: int
    prompt_tokens: int  # summed over the batch, pads excluded
    new_tokens: int  # summed over the batch, EOS excluded
    prefill_s: float  # prefill forward + first sampled token on the host (time to first token)
    decode_s: float  # every later step, the compiling one excluded
    decode_steps: int  # forwards after the prefill; each yields one token per sequence
    compile_s: float  # the first decode step when it compiles (--compile), else 0
    context_limited: bool  # max_new_tokens was cut to fit max_context_length
    peak_bytes: int | None = None
    memory_label: str = ""

    @property
    def decode_tokens_per_s(self) -> float:
        timed = self.decode_steps - (1 if self.compile_s else 0)  # the compiling step is not a decode speed
        return self.batch * timed / self.decode_s if self.decode_s > 0 and timed > 0 else 0.0


def context_budget(prompt_len: int, max_new_tokens: int, max_context: int) -> int:
    """New tokens that fit: prompt + continuation never exceed max_context_length."""
    if prompt_len >= max_context:
        raise GptossError(
            f"the prompt has {prompt_len} tokens; the model's context is {max_context} tokens "
            "(model.max_context_length), leaving no room to generate: shorten the prompt"
        )
    return min(max_new_tokens, max_context - prompt_len)


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompts: list[list[int]],
    params: InferConfig,
    *,
    pad_id: int,
    eos_id: int | None,
    on_token: Callable[[int, int], bool] | None = None,
    on_memory: Callable[[int | None, int], None] | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
    compile_decode: bool = False,
) -> tuple[list[list[int]], list[str], GenerationStats]:
    """Generate for a batch of token-id prompts. Returns (new ids per row, stop reason per row, stats).

    on_token(row, id) -> True stops that row (stop strings); on_memory(decode_step, tokens_so_far) samples
    telemetry; on_logits gets each step's (B, V) logits (tests compare them with a full forward).
    A stop reason is "eos", "stop", "length" (max_new_tokens) or "context" (max_context_length reached).
    compile_decode: a static KV cache and a torch.compile'd decode step (CUDA graphs on CUDA); the prefill
    stays eager, so only the one-token step with fixed shapes is compiled.
    """
    cfg = model.config
    device = model.embedding.weight.device
    b, lengths = len(prompts), [len(p) for p in prompts]
    if min(lengths) == 0:
        raise GptossError("empty prompt: give some text to continue")
    t = max(lengths)
    budget = context_budget(t, params.max_new_tokens, cfg.max_context_length)

    # Left padding: pads get position -1 (an empty key); row i's real tokens sit at 0..n_i-1.
    tokens = torch.full((b, t), pad_id, dtype=torch.long)
    positions = torch.full((b, t), -1, dtype=torch.long)
    for i, ids in enumerate(prompts):
        tokens[i, t - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        positions[i, t - len(ids) :] = torch.arange(len(ids))
    tokens, positions = tokens.to(device), positions.to(device)
    if compile_decode:  # a static cache and a compiled step, kept for later generations of this shape
        step = compiled_step(model, b, t + budget)
        cache = step.cache
        decode = functools.partial(step, model)
    else:
        cache = KVCache(cfg, b, t + budget, model.embedding.weight.dtype, device)
        decode = functools.partial(_decode_step, model, cache)
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    seen = None
    if params.repetition_penalty != 1.0:  # (B, V) tokens in the prompt or generated so far
        seen = torch.zeros(b, cfg.vocab_size, dtype=torch.bool, device=device).scatter_(1, tokens, True)
        seen[:, pad_id] = False

    start = time.perf_counter()
    logits = model(tokens, positions, cache, last_only=True).logits[:, -1]  # (B, V) fp32
    if on_memory:
        on_memory(None, 0)
    pos = positions[:, -1:] + 1  # (B, 1) next position per row: the last column holds every row's last token
    out: list[list[int]] = [[] for _ in range(b)]
    reasons: list[str | None] = [None] * b
    prefill_s, decode_start, steps, compile_s = 0.0, start, 0, 0.0
    for step in range(budget):
        if on_logits:
            on_logits(logits)
        nxt = sample(logits, params, generator, seen)  # (B,)
        ids = nxt.tolist()  # the one host sync per step
        if min(ids) < 0:  # greedy marks rows with non-finite logits (sampling raises itself)
            raise GptossError(NON_FINITE)
        if step == 0:
            decode_start = time.perf_counter()
            prefill_s = decode_start - start
        for i, tok in enumerate(ids):
            if reasons[i] is not None:
                continue  # a finished row keeps decoding alongside the others; its tokens are dropped
            if tok == eos_id:
                reasons[i] = "eos"
                continue
            out[i].append(tok)
            if on_token is not None and on_token(i, tok):
                reasons[i] = "stop"
        if all(r is not None for r in reasons) or step + 1 == budget:
            break
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        step_start = time.perf_counter()
        logits = decode(nxt[:, None], pos)  # (B, V)
        if compile_decode and steps == 0:  # the first compiled step traces and compiles (seconds on CPU)
            compile_s = time.perf_counter() - step_start
        pos = pos + 1
        steps += 1
        if on_memory and steps % MEMORY_EVERY == 0:
            on_memory(steps, sum(map(len, out)))
    decode_s = time.perf_counter() - decode_start - compile_s
    if on_memory:
        on_memory(steps, sum(map(len, out)))
    limited = budget < params.max_new_tokens
    final = [r or ("context" if limited else "length") for r in reasons]
    stats = GenerationStats(
        b, sum(lengths), sum(map(len, out)), prefill_s, decode_s, steps, compile_s, limited and "context" in final
    )
    return out, final, stats


def _decode_step(model: Transformer, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """tokens (B, 1), positions (B, 1) -> next-token logits (B, V), eagerly (compiled: compiled.py)."""
    return model(tokens, positions, cache).logits[:, -1]


# ---- loading a run -------------------------------------------------------------------------------


@dataclass
class LoadedRun:
    model: Transformer  # eval mode, on `device`, in `dtype` under the precision policy (devices.py)
    tokenizer: Tokenizer
    config: RunConfig
    run_dir: Path
    checkpoint: Path
    step: int
    device: torch.device
    dtype: torch.dtype


def load_run(
    run: Path | None = None, checkpoint: Path | None = None, device: str = "auto", dtype: str = "auto"
) -> LoadedRun:
    """Open a run (run/open.py: config, checkpoint and tokenizer verified together) and load its weights for
    inference in `dtype` under the precision policy (devices.py)."""
    dev = pick_device(device, "--device")
    dt = resolve_dtype(dtype, dev)
    opened = open_run(run, checkpoint)
    with torch.device("meta"):  # shapes only: allocated below, in their final dtypes (the rope table is CPU)
        model = Transformer(opened.config.model)
    # ---- structural model transforms, chosen by what the checkpoint holds, before its weights load ----
    if packed_weights(tensor_names(opened.weights)):  # MXFP4 experts stay packed (model/mxfp4.py)
        pack_experts(model)
    # ----
    materialize(model, dev, dt)  # the precision policy: norms and router fp32, the rest in `dt`
    load_weights(model, opened.weights)
    model.requires_grad_(False).eval()
    return LoadedRun(model, opened.tokenizer, opened.config, opened.run.path, opened.checkpoint, opened.step, dev, dt)


# ---- the whole command ---------------------------------------------------------------------------


@dataclass
class Completion:
    prompt: str
    text: str  # the continuation (cut before a stop string; EOS not included)
    prompt_tokens: int
    new_tokens: int
    stop_reason: str  # eos | stop | length | context
    token_ids: list[int] = field(default_factory=list)


@dataclass
class InferResult:
    completions: list[Completion]
    stats: GenerationStats
    run: LoadedRun


def infer(
    prompts: list[str],
    *,
    run: Path | None = None,
    checkpoint: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    on_text: Callable[[int, str], None] | None = None,
    compile_decode: bool = False,
    **overrides,
) -> InferResult:
    """Generate a continuation of every prompt in one batch; `overrides` are InferConfig fields (None = the
    run config's value). on_text(row, chunk) receives text as it is decoded. Memory goes to
    RUN/inference-memory.jsonl."""
    from ..memory import MemorySampler
    from ..output import warn

    if not prompts or any(p == "" for p in prompts):
        raise GptossError("empty prompt: give some text to continue")
    InferConfig().with_overrides(option_label, **overrides)  # reject bad options before loading anything
    loaded = load_run(run, checkpoint, device, dtype)
    params = loaded.config.infer.with_overrides(option_label, **overrides)
    tok = loaded.tokenizer
    encoded = [tok.encode(p).ids for p in prompts]
    context_budget(max(map(len, encoded)), params.max_new_tokens, loaded.config.model.max_context_length)

    streams = [TextStream(tok, params.stop) for _ in prompts]

    def on_token(row: int, token: int) -> bool:
        chunk = streams[row].add(token)
        if chunk and on_text:
            on_text(row, chunk)
        return streams[row].stopped

    try:
        sampler = MemorySampler(RunDir(loaded.run_dir).infer_memory, loaded.device, phase="infer")
    except OSError as err:
        warn(f"not recording inference memory ({err.strerror or err})")
        sampler = None
    peak = [0]

    def on_memory(step: int | None, tokens: int) -> None:
        record = sampler.sample(step, tokens=tokens, batch=len(prompts), event="prefill" if step is None else "decode")
        peak[0] = max(peak[0], record.get("peak_bytes", record["rss_bytes"]))

    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)
    pad = tok.token_to_id(PAD)
    eos = tok.token_to_id(EOS)
    try:
        ids, reasons, stats = generate_tokens(
            loaded.model,
            encoded,
            params,
            pad_id=eos if pad is None else pad,
            eos_id=eos,
            on_token=on_token,
            on_memory=on_memory if sampler else None,
            compile_decode=compile_decode,
        )
    finally:
        if sampler:
            sampler.close()
    for row, stream in enumerate(streams):
        chunk = stream.finish()
        if chunk and on_text:
            on_text(row, chunk)
    if sampler:
        stats.peak_bytes = max(peak[0], sampler.peak_bytes())
        stats.memory_label = "GPU, torch peak allocated" if loaded.device.type == "cuda" else "CPU, process RSS"
    completions = [
        Completion(p, s.text, len(e), len(i), r, i)
        for p, s, e, i, r in zip(prompts, streams, encoded, ids, reasons, strict=True)
    ]
    return InferResult(completions, stats, loaded)
