"""The server's decode step compiled once for every batch and length, and whether it pays (`serve --compile`).

The engine's decode forward takes (R, 1) tokens over slots 0..R-1 of the SlotKVCache, whose full layers
read keys up to position `end`; R and end change at almost every step. Compiled with R marked dynamic and
`end` listed in torch.compiler.config.dynamic_sources, one graph serves them all (two: torch specialises
a size of 1, so R = 1 has its own). `warm_up` compiles both before the server listens, so no request
waits on a compile; inductor keeps them on disk, and a later start with the same model shapes loads them.

Whether the graph pays depends on the model and the machine: for a small model the per-operator overhead
of eager decoding dominates and the graph is several times faster; for a larger one on a CPU the eager
matmuls already run at memory speed (docs/performance.md, "Serving"). `decode_choice` times both at the
widest batch and keeps the faster, unless the user chose.
"""

from __future__ import annotations

import time

import torch

from ..errors import GptossError
from ..infer.compiled import compile_decode_step
from ..model import Transformer
from .slots import SlotKVCache

# torch.compiler.config.dynamic_sources names the step's `end` argument: it is symbolic, not a graph per value
DYNAMIC_END = "L['end']"
TIMED_STEPS = 5  # steps of each kind timed by decode_choice (the fastest counts: other load only adds)


class CompiledDecode:
    """step(tokens (R, 1), positions (R, 1), end) -> the next-token logits (R, V) of slots 0..R-1."""

    def __init__(self, model: Transformer, cache: SlotKVCache):
        self.model, self.cache = model, cache
        # No CUDA graphs: they would need a graph per (R, end).
        self._compiled = compile_decode_step(self.eager, cache.pos_full.device.type == "cuda", cuda_graphs=False)

    def eager(self, tokens: torch.Tensor, positions: torch.Tensor, end: int) -> torch.Tensor:
        return self.model(tokens, positions, self.cache.select(0, tokens.shape[0], end)).logits[:, -1]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, end: int) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(tokens, 0)
        torch._dynamo.maybe_mark_dynamic(positions, 0)
        with torch.compiler.config.patch(dynamic_sources=DYNAMIC_END):
            return self._compiled(tokens, positions, end)

    def _steps(self, step, rows: int, position: int, times: int) -> float:
        """Run `times` steps of `rows` rows writing `position`; the fastest one's seconds."""
        device = self.cache.pos_full.device
        tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        positions = torch.full((rows, 1), position, dtype=torch.long, device=device)
        best = float("inf")
        for _ in range(times):
            start = time.perf_counter()
            step(tokens, positions, position + 1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    def warm_up(self, rows: int) -> float:
        """Compile the graphs for 1 and for 2..`rows` rows; returns the seconds it took. What they wrote into
        the slots is forgotten."""
        start = time.perf_counter()
        with torch.inference_mode():
            # 2 rows first: its graph is the dynamic one. At position 1, not 0: a length of 1 would be
            # specialised, and a decode step never writes position 0 (the prompt has a token).
            for r in sorted({min(2, rows), 1}, reverse=True):
                self._steps(self, r, 1, 1)
            for slot in range(min(2, rows)):
                self.cache.reset(slot)
        return time.perf_counter() - start

    def timed(self, rows: int) -> tuple[float, float]:
        """(compiled, eager) seconds of one decode step of `rows` rows, at a short position."""
        position = min(63, self.cache.max_length - 1)
        with torch.inference_mode():
            compiled = self._steps(self, rows, position, TIMED_STEPS)
            eager = self._steps(self.eager, rows, position, TIMED_STEPS)
            for slot in range(rows):
                self.cache.reset(slot)
        return compiled, eager


def decode_choice(model: Transformer, cache: SlotKVCache, requested: bool | None) -> tuple[CompiledDecode | None, str]:
    """(the compiled step, or None to decode eagerly; why, for the start-up line). requested: --compile
    (True), --no-compile (False) or neither (None: compiled, timed against eager, kept when faster). A
    compile that fails is an error with --compile, and eager decoding otherwise."""
    if requested is False:
        return None, "eager (--no-compile)"
    step = CompiledDecode(model, cache)
    try:
        compile_s = step.warm_up(cache.slots)
        compiled, eager = step.timed(cache.slots)
    except Exception as err:  # no C++ compiler, an unsupported device, ...: the eager step always works
        if requested:
            raise GptossError(f"--compile: compiling the decode step failed ({type(err).__name__}: {err})") from None
        return None, f"eager (compiling failed: {type(err).__name__})"
    times = f"{compiled * 1e3:.2f} ms a step of {cache.slots} rows against {eager * 1e3:.2f} eager"
    if requested or compiled < eager:
        why = "--compile" if requested else "auto"
        return step, f"compiled ({why}: {times}; compiled in {compile_s:.1f} s)"
    return None, f"eager (auto: compiled {times})"
