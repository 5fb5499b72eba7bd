"""The server's compiled decode step (serve/compiled.py): one graph for every batch of two or more rows and
every length, each row's logits those of a full forward over its own tokens; and the choice between it
and eager decoding (--compile, --no-compile, timed, a failing compile)."""

from __future__ import annotations

import pytest
import torch

from gptoss_cli.errors import GptossError
from gptoss_cli.serve import compiled
from gptoss_cli.serve.compiled import CompiledDecode, decode_choice
from gptoss_cli.serve.slots import SlotKVCache
from tests.conftest import HAS_COMPILER

from .test_slots import _close, _model, _reference


@pytest.mark.skipif(not HAS_COMPILER, reason="torch.compile on a CPU needs a C++ compiler")
@torch.inference_mode()
def test_compiled_step_serves_every_batch_and_length_with_two_graphs(torch_one_thread):
    """The real compile (inductor on the CPU): rows of different lengths decode together as in test_slots,
    at 4, 3, 1 and 2 rows and positions past the sliding window; two graphs (1 row, 2+ rows) cover all."""
    model = _model()
    cache = SlotKVCache(model.config, slots=4, max_length=48, dtype=torch.float32, device="cpu")
    step = CompiledDecode(model, cache)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert step.warm_up(4) > 0
    assert (cache.pos_full == -1).all() and (cache.pos_ring == -1).all()  # the warm-up's writes are forgotten
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (3, 11, 7, 5)]  # 11 > window 4
    for slot, ids in enumerate(seqs):  # all but the newest token of each row are in the cache
        n = len(ids) - 1
        model(torch.tensor([ids[:-1]]), torch.arange(n)[None], cache.select(slot, slot + 1, n))
    for rows in (4, 4, 3, 3, 1, 1, 2, 2, 4):  # the engine keeps running rows in slots 0..R-1
        active = seqs[:rows]
        tokens = torch.tensor([[r[-1]] for r in active])  # (R, 1): each row's newest token
        positions = torch.tensor([[len(r) - 1] for r in active])
        logits = step(tokens, positions, max(len(r) for r in active))
        for i, r in enumerate(active):
            _close(logits[i], _reference(model, r))
            r.append(int(logits[i].argmax()))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2


def test_no_compile_decodes_eagerly_without_compiling(monkeypatch):
    model = _model()
    cache = SlotKVCache(model.config, slots=2, max_length=16, dtype=torch.float32, device="cpu")
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("--no-compile compiled"))
    assert decode_choice(model, cache, False) == (None, "eager (--no-compile)")


@pytest.mark.parametrize(("compiled_s", "eager_s", "kept"), [(0.001, 0.002, True), (0.003, 0.002, False)])
def test_auto_keeps_the_faster_step(monkeypatch, compiled_s, eager_s, kept):
    model = _model()
    cache = SlotKVCache(model.config, slots=2, max_length=16, dtype=torch.float32, device="cpu")
    monkeypatch.setattr(compiled.CompiledDecode, "warm_up", lambda self, rows: 1.5)
    monkeypatch.setattr(compiled.CompiledDecode, "timed", lambda self, rows: (compiled_s, eager_s))
    step, why = decode_choice(model, cache, None)
    assert (step is not None) == kept
    assert why.startswith("compiled (auto: 1.00 ms" if kept else "eager (auto: compiled 3.00 ms"), why
    assert "of 2 rows against 2.00 eager" in why
    step, why = decode_choice(model, cache, True)  # --compile keeps it even when slower
    assert step is not None and why.startswith("compiled (--compile")


def test_a_failing_compile_falls_back_unless_asked_for(monkeypatch):
    model = _model()
    cache = SlotKVCache(model.config, slots=2, max_length=16, dtype=torch.float32, device="cpu")

    def broken(self, rows):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled.CompiledDecode, "warm_up", broken)
    assert decode_choice(model, cache, None) == (None, "eager (compiling failed: RuntimeError)")
    with pytest.raises(GptossError, match=r"--compile: compiling the decode step failed \(RuntimeError: no C\+\+"):
        decode_choice(model, cache, True)
