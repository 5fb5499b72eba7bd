"""Generation: decode a batch of prompts with the KV cache, and `infer()`, the core of `gptoss infer`.

    generate(model, prompts, states)   left-padded prefill in one forward, then one token per step for every
                                       sequence (decode.py's DecodeState: sampling, budget, stops, text)
    generate_tokens(model, ids, ...)   the same for plain token ids with one InferConfig
    infer(prompts, ...)                a loaded run (run/load.py), text in and out, memory telemetry

Batched prompts are left-padded with PAD at position -1, which the model's mask treats as an empty key,
so every row sees exactly its own tokens at positions 0..n-1 and its last real token sits in the last
column. A decode step is one forward over (B, 1) tokens plus sampling on the device; the sampled ids are
the only host sync, needed anyway to stream text and to stop at EOS or a stop string.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import InferConfig
from ..data.chat_format import chat_format
from ..data.tokenizer import EOS, PAD
from ..errors import GptossError
from ..model import KVCache, Transformer
from ..run.open import LoadedRun, load_run
from .compiled import compile_choice, compiled_step
from .decode import DecodeState, new_generator, next_tokens
from .sampling import option_label

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
    compile_choice: str = ""  # infer(): compiled or eager, and why (compiled.compile_choice)

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


def batch_states(
    model: Transformer,
    prompts: list[list[int]],
    params: InferConfig,
    *,
    eos_id: int | None,
    tokenizer=None,
    stop_ids: frozenset[int] = frozenset(),
) -> list[DecodeState]:
    """One DecodeState per prompt of a left-padded batch: one generator (seeded once) and one (B, V)
    repetition mask shared by the rows, and every row's budget that of the longest prompt (the rows step
    together through one cache)."""
    cfg = model.config
    device = model.embedding.weight.device
    if not prompts or min(map(len, prompts)) == 0:
        raise GptossError("empty prompt: give some text to continue")
    t = max(map(len, prompts))
    context_budget(t, params.max_new_tokens, cfg.max_context_length)
    generator = new_generator(params.seed, device)
    seen = None
    if params.repetition_penalty != 1.0:  # (B, V) tokens in the prompt or generated so far
        seen = torch.zeros(len(prompts), cfg.vocab_size, dtype=torch.bool, device=device)
        for i, ids in enumerate(prompts):
            seen[i, torch.tensor(ids, device=device)] = True
    ends = stop_ids | ({eos_id} if eos_id is not None else set())
    return [
        DecodeState.start(
            ids,
            params,
            max_length=cfg.max_context_length - (t - len(ids)),  # every row: the budget of the longest prompt
            vocab_size=cfg.vocab_size,
            device=device,
            tokenizer=tokenizer,
            stop_ids=frozenset(ends),
            generator=generator,
            seen=None if seen is None else seen[i : i + 1],
        )
        for i, ids in enumerate(prompts)
    ]


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    states: list[DecodeState],
    *,
    pad_id: int,
    on_text: Callable[[int, str], None] | None = None,
    on_token: Callable[[int, int], bool] | None = None,
    on_memory: Callable[[int | None, int], None] | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
    compile_decode: bool = False,
) -> GenerationStats:
    """Generate until every state is done. on_text(row, text) gets released text; on_token(row, id) -> True
    stops that row (the caller's own stop); on_memory(decode_step, tokens_so_far) samples telemetry;
    on_logits gets each step's (B, V) logits (tests compare them with a full forward).
    compile_decode: a static KV cache and a torch.compile'd decode step (CUDA graphs on CUDA); the prefill
    stays eager, so only the one-token step with fixed shapes is compiled."""
    b, t = len(prompts), max(map(len, prompts))
    budget = max(s.budget for s in states)
    tokens, positions = _left_padded(prompts, pad_id, model.embedding.weight.device)
    if compile_decode:  # a static cache and a compiled step, kept for later generations of this shape
        step = compiled_step(model, b, t + budget)
        cache, decode = step.cache, functools.partial(step, model)
    else:
        cache = KVCache(model.config, b, t + budget, model.embedding.weight.dtype, tokens.device)
        decode = functools.partial(_decode_step, model, cache)

    start = time.perf_counter()
    logits = model(tokens, positions, cache, last_only=True).logits[:, -1]  # (B, V) fp32
    if on_memory:
        on_memory(None, 0)
    pos = positions[:, -1:] + 1  # (B, 1) next position per row: the last column holds every row's last token
    prefill_s, decode_start, steps, compile_s = 0.0, start, 0, 0.0
    while True:
        if on_logits:
            on_logits(logits)
        ids, failed = next_tokens(logits, states)  # every row, finished ones too: a shared generator draws
        if failed:  # for all rows at once, as it always has
            raise GptossError(next(iter(failed.values())))
        if steps == 0:
            decode_start = time.perf_counter()
            prefill_s = decode_start - start
        for i, (state, token) in enumerate(zip(states, ids, strict=True)):
            if not state.done:  # a finished row keeps decoding alongside the others; its tokens are dropped
                _accept(i, state, token, on_text, on_token)
        if all(s.done for s in states):
            break
        step_start = time.perf_counter()
        logits = decode(torch.tensor(ids, device=pos.device)[:, None], pos)  # (B, V)
        if compile_decode and steps == 0:  # the first compiled step traces and compiles (seconds on CPU)
            compile_s = time.perf_counter() - step_start
        pos = pos + 1
        steps += 1
        if on_memory and steps % MEMORY_EVERY == 0:
            on_memory(steps, sum(len(s.out) for s in states))
    decode_s = time.perf_counter() - decode_start - compile_s
    if on_memory:
        on_memory(steps, sum(len(s.out) for s in states))
    limited = any(s.reason == "context" for s in states)
    new = sum(len(s.out) for s in states)
    return GenerationStats(b, sum(map(len, prompts)), new, prefill_s, decode_s, steps, compile_s, limited)


def _accept(row: int, state: DecodeState, token: int, on_text, on_token) -> None:
    text = state.accept(token)
    if on_token is not None and token not in state.stop_ids and on_token(row, token) and not state.done:
        text += state.stop()
    if text and on_text is not None:
        on_text(row, text)


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) tokens and positions: pads first, at position -1 (an empty key); row i's tokens at 0..n_i-1."""
    b, t = len(prompts), max(map(len, prompts))
    tokens = torch.full((b, t), pad_id, dtype=torch.long)
    positions = torch.full((b, t), -1, dtype=torch.long)
    for i, ids in enumerate(prompts):
        tokens[i, t - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        positions[i, t - len(ids) :] = torch.arange(len(ids))
    return tokens.to(device), positions.to(device)


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
    """Generate for a batch of token-id prompts with one setting. Returns (new ids per row, stop reason per
    row, stats); a reason is decode.py's eos | stop | length | context."""
    states = batch_states(model, prompts, params, eos_id=eos_id)
    stats = generate(
        model,
        prompts,
        states,
        pad_id=pad_id,
        on_token=on_token,
        on_memory=on_memory,
        on_logits=on_logits,
        compile_decode=compile_decode,
    )
    return [s.out for s in states], [s.reason for s in states], stats


def _decode_step(model: Transformer, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """tokens (B, 1), positions (B, 1) -> next-token logits (B, V), eagerly (compiled: compiled.py)."""
    return model(tokens, positions, cache).logits[:, -1]


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
    compile_decode: bool | None = None,
    on_compile: Callable[[str], None] | None = None,
    **overrides,
) -> InferResult:
    """Generate a continuation of every prompt in one batch; `overrides` are InferConfig fields (None = the
    run config's value). on_text(row, chunk) receives text as it is decoded. compile_decode None chooses
    from the generation's length (compiled.compile_choice); on_compile(why) is told before a compile.
    Memory goes to RUN/inference-memory.jsonl."""
    from ..memory import MemorySampler
    from ..output import warn

    if not prompts or any(p == "" for p in prompts):
        raise GptossError("empty prompt: give some text to continue")
    InferConfig().with_overrides(option_label, **overrides)  # reject bad options before loading anything
    loaded = load_run(run, checkpoint, device, dtype)
    params = loaded.config.infer.with_overrides(option_label, **overrides)
    tok = loaded.tokenizer
    encoded = [tok.encode(p).ids for p in prompts]
    # A run with a conversation format also stops where a turn ends, as transformers' generate() does on the
    # export (its generation_config lists those ids beside EOS).
    fmt = chat_format(tok, loaded.run.chat_template)
    stops = frozenset(fmt.stop_ids) if fmt is not None else frozenset()
    states = batch_states(loaded.model, encoded, params, eos_id=tok.token_to_id(EOS), tokenizer=tok, stop_ids=stops)
    try:
        sampler = MemorySampler(loaded.run.infer_memory, loaded.device, phase="infer")
    except OSError as err:
        warn(f"not recording inference memory ({err.strerror or err})")
        sampler = None
    peak = [0]

    def on_memory(step: int | None, tokens: int) -> None:
        record = sampler.sample(step, tokens=tokens, batch=len(prompts), event="prefill" if step is None else "decode")
        peak[0] = max(peak[0], record.get("peak_bytes", record["rss_bytes"]))

    compiled, why = compile_choice(compile_decode, max(s.budget for s in states))
    if compiled and on_compile is not None:
        on_compile(why)
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)
    pad = tok.token_to_id(PAD)
    try:
        stats = generate(
            loaded.model,
            encoded,
            states,
            pad_id=tok.token_to_id(EOS) if pad is None else pad,
            on_text=on_text,
            on_memory=on_memory if sampler else None,
            compile_decode=compiled,
        )
    finally:
        if sampler:
            sampler.close()
    stats.compile_choice = f"{'compiled' if compiled else 'eager'} ({why})"
    if sampler:
        stats.peak_bytes = max(peak[0], sampler.peak_bytes())
        stats.memory_label = "GPU, torch peak allocated" if loaded.device.type == "cuda" else "CPU, process RSS"
    completions = [
        Completion(p, s.text, len(e), len(s.out), s.reason, s.out)
        for p, s, e in zip(prompts, states, encoded, strict=True)
    ]
    return InferResult(completions, stats, loaded)
