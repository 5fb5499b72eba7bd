"""The server's slot KV cache against the model without a cache: rows of different lengths, prefilled in
chunks into their own slots and decoded together, give each row the logits of a full forward over that
row's tokens alone; also after a finished row's slot is refilled by moving the last row down."""

from __future__ import annotations

import torch

from gptoss_cli.model import ModelConfig, Transformer
from gptoss_cli.serve.slots import SlotKVCache


def _model() -> Transformer:
    cfg = ModelConfig(
        num_hidden_layers=2,
        num_experts=4,
        experts_per_token=2,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        head_dim=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        initial_context_length=48,
        max_context_length=48,
        moe_backend="loop",
    )
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


def _reference(model: Transformer, ids: list[int]) -> torch.Tensor:
    """(V,) next-token logits after `ids`, from one forward without a cache."""
    return model(torch.tensor([ids])).logits[0, -1]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@torch.inference_mode()
def test_slots_decode_rows_of_different_lengths_like_full_forwards(torch_one_thread):
    model = _model()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (3, 11, 7)]  # 11 > window 4
    cache = SlotKVCache(model.config, slots=4, max_length=48, dtype=torch.float32, device="cpu")
    seqs = [list(p) for p in prompts]
    for slot, ids in enumerate(prompts):
        cache.reset(slot)
        for start in range(0, len(ids), 3):  # chunked prefill, 3 tokens at a time
            end = min(start + 3, len(ids))
            logits = model(
                torch.tensor([ids[start:end]]),
                torch.arange(start, end)[None],
                cache.select(slot, slot + 1, end),
                last_only=True,
            ).logits[0, -1]
        _close(logits, _reference(model, ids))
        seqs[slot].append(int(logits.argmax()))

    def decode_all(rows: list[list[int]]) -> None:
        tokens = torch.tensor([[r[-1]] for r in rows])  # (R, 1): each row's newest token
        positions = torch.tensor([[len(r) - 1] for r in rows])  # (R, 1): at its own position
        logits = model(tokens, positions, cache.select(0, len(rows), max(len(r) for r in rows))).logits[:, -1]  # (R, V)
        for i, r in enumerate(rows):
            _close(logits[i], _reference(model, r))
            r.append(int(logits[i].argmax()))

    for _ in range(6):  # past the window for every row
        decode_all(seqs)
    # Row 0 finishes: the last row moves into its slot, and the two go on together.
    cache.move(2, 0, len(seqs[2]) - 1)  # its written positions: all but the newest token
    seqs = [seqs[2], seqs[1]]
    for _ in range(5):
        decode_all(seqs)


@torch.inference_mode()
def test_slots_prefill_right_padded_rows_together_like_full_forwards(torch_one_thread):
    """Prompts of different lengths prefilled in one (R, T) forward, shorter rows padded with position -1:
    each row's logits at its last token are a full forward's, nothing is written for the padding, and the
    rows then decode together as if each had been prefilled alone (also a row longer than the window)."""
    model = _model()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (3, 9, 6)]  # 9 > window 4
    cache = SlotKVCache(model.config, slots=5, max_length=48, dtype=torch.float32, device="cpu")
    # Slots 1..3 (not 0: the forward covers a range of rows in the middle).
    width = max(len(p) for p in prompts)
    tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts])  # (3, 9)
    positions = torch.tensor([list(range(len(p))) + [-1] * (width - len(p)) for p in prompts])
    last = torch.tensor([[len(p) - 1] for p in prompts])
    logits = model(tokens, positions, cache.select(1, 4, width, padded=True), logits_at=last).logits[:, 0]  # (3, V)
    for i, p in enumerate(prompts):
        _close(logits[i], _reference(model, p))
        assert (cache.pos_full[1 + i] >= 0).sum() == len(p)  # the padding wrote nothing
        assert (cache.pos_ring[1 + i] >= 0).sum() == min(len(p), 4)
    seqs = [list(p) + [int(logits[i].argmax())] for i, p in enumerate(prompts)]
    for _ in range(6):
        rows = torch.tensor([[r[-1]] for r in seqs]), torch.tensor([[len(r) - 1] for r in seqs])
        step = model(*rows, cache.select(1, 4, max(len(r) for r in seqs))).logits[:, -1]
        for i, r in enumerate(seqs):
            _close(step[i], _reference(model, r))
            r.append(int(step[i].argmax()))


@torch.inference_mode()
def test_a_step_run_again_at_the_same_positions_gives_the_same_logits(torch_one_thread):
    """The engine runs each row of a failed batched step again alone: the keys the failed step already wrote
    (sliding layers' rings included) must not be seen twice."""
    model = _model()
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (9, 6)]  # 9 > window 4
    cache = SlotKVCache(model.config, slots=2, max_length=48, dtype=torch.float32, device="cpu")
    for slot, ids in enumerate(seqs):  # all but the newest token of each row
        n = len(ids) - 1
        model(torch.tensor([ids[:-1]]), torch.arange(n)[None], cache.select(slot, slot + 1, n))
    tokens = torch.tensor([[r[-1]] for r in seqs])
    positions = torch.tensor([[len(r) - 1] for r in seqs])
    end = max(len(r) for r in seqs)
    model(tokens, positions, cache.select(0, 2, end))  # the step that "failed" after writing its keys
    for i, r in enumerate(seqs):  # each row again, alone
        again = model(tokens[i : i + 1], positions[i : i + 1], cache.select(i, i + 1, len(r))).logits[0, -1]
        _close(again, _reference(model, r))
