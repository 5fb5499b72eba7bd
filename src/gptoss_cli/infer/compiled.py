"""The compiled decode step behind `infer --compile` and `chat --compile`: a StaticKVCache and a
torch.compile'd one-token step.

One step is kept per model, batch size, dtype and device, and reused by every later generation: its cache
length is symbolic (the full layers' buffers are marked dynamic), so one graph serves every length, and a
chat whose prompt grows turn by turn, or a process that generates many times (a benchmark, a notebook),
compiles once. (dynamo compiles a function at most 8 times and then silently runs it eagerly: one graph per
length would soon lose the compiled step.) The cache length is rounded up to a multiple of 64, so that a
generation close to the last one's length keeps its cache: the extra slots hold position -1 and are masked.
"""

from __future__ import annotations

import logging
import weakref

import torch

from ..model import StaticKVCache, Transformer

LENGTH_STEP = 64
# `infer` without --compile/--no-compile compiles when a generation has at least this many decode steps:
# about where a process's first compile of the step is paid back by the faster steps on a CPU; a compile
# inductor has cached on disk costs a fifth of that (docs/performance.md, "Compiled decoding: when it pays").
AUTO_COMPILE_STEPS = 2048
# model -> {(batch, dtype, device): CompiledStep}. Weak: a step holds no reference to its model.
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _step(model: Transformer, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return model(tokens, positions, cache).logits[:, -1]


def compile_decode_step(fn, cuda: bool, cuda_graphs: bool):
    """torch.compile as the decode steps use it (this one and serve/compiled.py's): shapes static unless marked
    dynamic; on CUDA CUDA graphs when asked; on CPU the graph's wrapper generated as C++ too (no Python call
    per kernel, for a longer first compile that inductor caches on disk; docs/performance.md)."""
    if not cuda:  # a CPU compile has no use for CUDA, but torch warns "No CUDA runtime is found" into the output
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    mode = "reduce-overhead" if cuda and cuda_graphs else None
    return torch.compile(fn, mode=mode, dynamic=None, options=None if cuda else {"cpp_wrapper": True})


class CompiledStep:
    """step(model, tokens (B, 1), positions (B, 1)) -> next-token logits (B, V), through the compiled graph."""

    def __init__(self, cache: StaticKVCache):
        self.cuda = cache.pos_full.device.type == "cuda"
        self._compiled = compile_decode_step(_step, self.cuda, cuda_graphs=True)  # static but the length (_take)
        self._take(cache)

    def _take(self, cache: StaticKVCache) -> None:
        self.cache = cache
        if self.cuda:  # the cache is mutated in place: CUDA graphs need its buffers at fixed addresses
            for buf in cache.buffers():
                torch._dynamo.mark_static_address(buf)
        # The full layers' length is a symbol of the graph, not a constant: a cache of another length reuses it.
        for layer, (k, v) in enumerate(zip(cache.k, cache.v, strict=True)):
            if not cache.config.is_sliding(layer):
                torch._dynamo.maybe_mark_dynamic(k, 1)
                torch._dynamo.maybe_mark_dynamic(v, 1)
        torch._dynamo.maybe_mark_dynamic(cache.pos_full, 1)

    def begin(self, cache: StaticKVCache | None = None) -> None:
        """Empty the cache (or take a new one, of another length) for a new generation, whose first step
        checks every guard again."""
        if cache is not None:
            self._take(cache)
        self.cache.reset()
        self._checked = False

    def __call__(self, model: Transformer, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not self._checked:  # the first call of a generation traces (once per shape) with all guards
            self._checked = True
            return self._compiled(model, self.cache, tokens, positions).clone()
        # Every later step of the generation has the same shapes, model and cache, so the graph chosen
        # by the first step is the one: re-checking its guards on every token is overhead (docs/performance.md).
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            # A CUDA graph replay overwrites its output buffer: keep a copy of each step's logits.
            return self._compiled(model, self.cache, tokens, positions).clone()


def compile_choice(requested: bool | None, steps: int) -> tuple[bool, str]:
    """(compile the decode step?, why, for the summary line) for a generation of `steps` decode steps;
    requested: --compile (True), --no-compile (False) or neither (None: chosen from `steps`)."""
    if requested is not None:
        return requested, "--compile" if requested else "--no-compile"
    if steps >= AUTO_COMPILE_STEPS:
        return True, f"auto: {steps} steps >= {AUTO_COMPILE_STEPS}"
    return False, f"auto: {steps} steps < {AUTO_COMPILE_STEPS}, --compile to compile"


def compiled_step(model: Transformer, batch: int, length: int) -> CompiledStep:
    """The step for `batch` rows of up to `length` tokens (built on first use), with an empty cache."""
    length = min(model.config.max_context_length, -(-length // LENGTH_STEP) * LENGTH_STEP)
    weight = model.embedding.weight
    steps = _STEPS.setdefault(model, {})
    key = (batch, weight.dtype, weight.device)

    def cache() -> StaticKVCache:
        return StaticKVCache(model.config, batch, length, weight.dtype, weight.device)

    if key not in steps:
        steps[key] = CompiledStep(cache())
    step = steps[key]
    step.begin(cache() if step.cache.max_length != length else None)  # the old cache is freed
    return step
