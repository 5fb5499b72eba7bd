"""Score several runs or checkpoints on the same text and save each result to RUN/eval/.

    evaluate(targets, data, ...) -> one result dict per target, in the order given

For each target the model is loaded (config, tokenizer and weights checked against each other), every
document is encoded with that run's tokenizer and scored by score.py. The numbers:

    loss            summed next-token cross-entropy (nats) / tokens scored
    ppl             exp(loss)
    bits_per_byte   summed loss / ln 2 / UTF-8 bytes of the text scored: independent of the tokenizer
    accuracy        share of tokens that were the model's top-1 guess

A result is saved as RUN/eval/<checkpoint>-<text digest>.json (written atomically), which
`gptoss report` shows as a table. Models are loaded one at a time, so the peak is one model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from ..data.tokenizer import EOS, PAD, tokenizer_hash
from ..errors import GptossError
from ..run.layout import RunDir
from .score import score_sequences
from .text import cut_to_tokens, eval_documents, text_digest, utf8_bytes

FORMAT = 1


@dataclass(frozen=True)
class Target:
    run: Path | None = None  # a run directory: its newest checkpoint
    checkpoint: Path | None = None  # a checkpoint directory (its run is found from it)


@dataclass
class Progress:
    """Callbacks for a progress display: start(label, total tokens), advance(tokens), done()."""

    start: Callable[[str, int], None] = lambda label, total: None
    advance: Callable[[int], None] = lambda tokens: None
    done: Callable[[], None] = lambda: None


def _open(target: Target, device: str, dtype: str):
    """The one place a model is loaded for evaluation."""
    from ..run.open import load_run

    return load_run(target.run, target.checkpoint, device, dtype)


def check_options(*, max_tokens: int | None, context: int | None, stride: int | None, batch_size: int) -> None:
    for name, value in (("--max-tokens", max_tokens), ("--context", context), ("--stride", stride)):
        if value is not None and value <= 0:
            raise GptossError(f"{name} must be > 0, got {value}")
    if batch_size <= 0:
        raise GptossError(f"--batch-size must be > 0, got {batch_size}")


def window_sizes(cfg, context: int | None, stride: int | None) -> tuple[int, int]:
    """(context, stride): the run's training length capped by its model's context unless given; stride
    half the context unless given."""
    limit = cfg.model.max_context_length
    if context is not None and context > limit:
        raise GptossError(f"--context {context} exceeds the model's context (model.max_context_length={limit})")
    context = context or min(cfg.train.seq_len, limit)
    stride = stride or max(1, context // 2)
    if stride > context:
        raise GptossError(
            f"--stride {stride} is longer than the context window ({context} tokens): "
            "a token would be scored without the tokens before it; use --stride <= --context"
        )
    return context, stride


def shared_context(targets: list[Target], warn: Callable[[str], None]) -> int:
    """Runs compared side by side are scored with one window: the shortest of their defaults (each run's
    training length, capped by its context), said when they differ. Reads configs only (open_run)."""
    from ..run.open import open_run

    defaults = []
    for target in targets:
        cfg = open_run(target.run, target.checkpoint, need_tokenizer=False).config
        defaults.append(min(cfg.train.seq_len, cfg.model.max_context_length))
    context = min(defaults)
    if len(set(defaults)) > 1:
        warn(
            f"the runs' default windows differ ({', '.join(map(str, defaults))} tokens): every run is scored "
            f"with the same {context}-token window so the numbers compare (--context sets it)"
        )
    return context


def evaluate(
    targets: list[Target],
    data: list[str],
    *,
    max_tokens: int | None = None,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    progress: Progress | None = None,
    save: bool = True,
    warn: Callable[[str], None] = lambda message: None,
) -> list[dict[str, Any]]:
    """Score every target on the documents of `data` (see the module docstring for the numbers)."""
    check_options(max_tokens=max_tokens, context=context, stride=stride, batch_size=batch_size)
    progress = progress or Progress()
    docs = eval_documents(data)
    targets = targets or [Target()]
    if context is None and len(targets) > 1:
        context = shared_context(targets, warn)
    results = []
    for target in targets:
        loaded = _open(target, device, dtype)
        win, step = window_sizes(loaded.config, context, stride)
        tok = loaded.tokenizer
        if max_tokens is not None and not results:  # the first model's tokens decide the cut, for everyone
            docs = cut_to_tokens(docs, tok, max_tokens)
        eos = tok.token_to_id(EOS)
        pad = tok.token_to_id(PAD)
        sequences = [[eos, *enc.ids] for enc in tok.encode_batch(docs)]
        total = sum(len(s) - 1 for s in sequences)
        if total == 0:
            raise GptossError(f"--data {' '.join(data)}: the text encodes to no tokens")
        label = f"{loaded.run.name}/{loaded.checkpoint.name}"
        progress.start(label, total)
        start = time.perf_counter()
        try:
            totals = score_sequences(
                loaded.model,
                sequences,
                context=win,
                stride=step,
                batch_size=batch_size,
                pad_id=eos if pad is None else pad,
                on_batch=progress.advance,
            )
        finally:
            progress.done()
        elapsed = time.perf_counter() - start
        result = _result(loaded, label, data, docs, totals, elapsed, win, step, batch_size, max_tokens)
        if save:
            result["saved"] = _save(loaded.run, loaded.checkpoint.name, result, warn)
        results.append(result)
        del loaded  # one model at a time
    return results


def _result(loaded, label, data, docs, totals, elapsed, win, step, batch_size, max_tokens) -> dict[str, Any]:
    """The saved and printed result of one target (the numbers of the module docstring)."""
    n_bytes = utf8_bytes(docs)
    loss = totals.loss / totals.tokens
    return {
        "format": FORMAT,
        "name": label,
        "run": str(loaded.run),
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "data": list(data),
        "text_digest": text_digest(docs),
        "documents": len(docs),
        "tokens": totals.tokens,
        "bytes": n_bytes,
        "loss": loss,
        "ppl": math.exp(min(loss, 700)),
        "bits_per_byte": totals.loss / math.log(2) / n_bytes,
        "bytes_per_token": n_bytes / totals.tokens,
        "accuracy": totals.correct / totals.tokens,
        "loss_sum_nats": totals.loss,
        "context": win,
        "stride": step,
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "device": loaded.device.type,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "tokenizer_hash": tokenizer_hash(loaded.tokenizer),
        "elapsed_s": elapsed,
        "tokens_per_s": totals.tokens / elapsed if elapsed > 0 else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _save(run: RunDir, checkpoint_name: str, result: dict, warn: Callable[[str], None]) -> str | None:
    """RUN/eval/<checkpoint>-<digest>.json; a run directory we cannot write to costs a warning, not the numbers."""
    path = run.eval / f"{checkpoint_name}-{result['text_digest']}.json"
    try:
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, json.dumps(result, indent=1))
    except OSError as err:
        warn(f"could not save the result to {path} ({err.strerror or err})")
        return None
    return str(path)
