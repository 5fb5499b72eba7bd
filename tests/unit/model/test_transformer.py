"""The whole model: every fast backend's gradients against eager attention and the loop MoE, cached decoding
against a full forward across the sliding-window ring, the aux loss as the mean over layers, the parameter
counts of the compact, 20b and 120b layouts (on the meta device), and ModelConfig's validation.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptoss_cli.model import KVCache, ModelConfig, ModelConfigError, Transformer
from tests.conftest import assert_close, randomise
from tests.unit.model.references import (
    MODEL_RTOL,
    SCALES,
    small_config,
)


@pytest.mark.parametrize("backend", ["fused_loop", "sdpa", "sdpa_dense"])
def test_model_gradients_match_the_reference_backends(backend):
    """A whole model (loss, aux loss) under a fast backend against eager attention and the loop MoE."""

    def grads(**kernels):
        model = Transformer(small_config(**kernels))
        randomise(model, **SCALES)
        ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))  # T >= 3W: banded
        out = model(ids)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids.roll(-1, 1).flatten())
        (loss + 0.1 * out.aux_loss).backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}

    fast = {"moe_backend": backend} if backend == "fused_loop" else {"attention_backend": backend}
    if backend == "sdpa":  # T = 13 >= 3W: the sliding layers take the banded path
        assert Transformer(small_config(**fast)).block[0].attn.sliding_window * 3 <= 13
    ref_loss, ref = grads()
    loss, got = grads(**fast)
    assert loss == pytest.approx(ref_loss, rel=MODEL_RTOL)
    for name in ref:
        assert_close(got[name], ref[name], rtol=2 * MODEL_RTOL, what=name)


# ---------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------

W = 4


def _cached_logits(model, ids, prefill, step, max_length):
    cache = KVCache(model.config, ids.shape[0], max_length, torch.float32, "cpu")
    outs = [model(ids[:, :prefill], cache=cache).logits]
    for start in range(prefill, ids.shape[1], step):
        outs.append(model(ids[:, start : start + step], cache=cache).logits)
    assert cache.length == ids.shape[1]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("total", [W - 1, W, W + 1, 4 * W])
def test_kv_cache_decode_equals_full_forward(total, backend):
    model = Transformer(small_config(num_hidden_layers=2, sliding_window=W, attention_backend=backend)).eval()
    randomise(model, **SCALES)
    ids = torch.randint(0, 64, (2, total), generator=torch.Generator().manual_seed(total))
    with torch.no_grad():
        full = model(ids).logits
        plans = {(1, 1), (max(1, total - 2), 1), (min(total, W + 2), 1), (2, 3)}
        for prefill, step in sorted(plans):
            if prefill > total:
                continue
            for max_length in (total, 4 * W + 3):
                got = _cached_logits(model, ids, prefill, step, max_length)
                assert got.shape == full.shape
                assert_close(got, full, rtol=MODEL_RTOL, what=str((prefill, step, max_length)))


@pytest.mark.parametrize("moe_backend", ["fused_loop", "loop"])
def test_the_traced_decode_step_equals_full_forward(monkeypatch, moe_backend):
    """The branches a compiled one-token step takes (grouped-query decode attention, experts indexed by
    tensor), run eagerly with is_compiling patched, across the sliding window and a ring wrap."""
    total = 3 * W + 2
    model = Transformer(small_config(num_hidden_layers=2, sliding_window=W, moe_backend=moe_backend)).eval()
    randomise(model, **SCALES)
    ids = torch.randint(0, 64, (2, total), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert_close(_cached_logits(model, ids, 3, 1, total), full, rtol=MODEL_RTOL)


def test_kv_cache_overflow_raises():
    model = Transformer(small_config()).eval()
    cache = KVCache(model.config, 1, 5, torch.float32, "cpu")
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


def test_model_aux_loss_is_mean_over_layers():
    model = Transformer(small_config(num_hidden_layers=3)).eval()
    randomise(model, **SCALES)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    per_layer = []
    hooks = [blk.mlp.register_forward_hook(lambda m, i, o: per_layer.append(o[1])) for blk in model.block]
    with torch.no_grad():
        out = model(ids)
    for h in hooks:
        h.remove()
    assert out.aux_loss.item() == pytest.approx(sum(s.aux_loss.item() for s in per_layer) / 3, rel=1e-6)
    assert out.expert_counts.shape == (3, 4)
    assert (out.expert_counts.sum(-1) == 2 * 6 * 2).all()


# ---------------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------------

RELEASE = dict(
    experts_per_token=4,
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    head_dim=64,
    num_attention_heads=64,
    num_key_value_heads=8,
    sliding_window=128,
    tie_word_embeddings=False,
    attention_bias=True,
    router_bias=True,
    rope_scaling_factor=32.0,
    rope_theta=150000.0,
    initial_context_length=4096,
)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({}, 1_442_041_488),
        (RELEASE | dict(num_hidden_layers=24, num_experts=32), 20_914_757_184),
        (RELEASE | dict(num_hidden_layers=36, num_experts=128), 116_829_156_672),
    ],
    ids=["compact", "20b", "120b"],
)
def test_parameter_counts_on_meta(overrides, expected):
    with torch.device("meta"):
        model = Transformer(ModelConfig(**overrides))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected


def test_compact_defaults_are_tied_without_biases():
    with torch.device("meta"):
        model = Transformer(ModelConfig())
    assert model.unembedding.weight is model.embedding.weight
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith(("qkv.bias", "out.bias", "gate.bias")) for n in names)
    assert model.block[0].attn.sinks.shape == (24,)


# ---------------------------------------------------------------------------------------------------
# ModelConfig validation
# ---------------------------------------------------------------------------------------------------

POSITIVE = (
    "num_hidden_layers",
    "num_experts",
    "experts_per_token",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "head_dim",
    "num_attention_heads",
    "num_key_value_heads",
    "initial_context_length",
    "max_context_length",
    "rope_theta",
    "rms_norm_eps",
    "swiglu_limit",
)


@pytest.mark.parametrize("key", POSITIVE)
@pytest.mark.parametrize("value", [0, -2])
def test_config_rejects_non_positive(key, value):
    with pytest.raises(ModelConfigError) as info:
        ModelConfig(**{key: value})
    assert info.value.key == key


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(num_attention_heads=24, num_key_value_heads=5), "num_attention_heads"),
        (dict(num_experts=4, experts_per_token=5), "experts_per_token"),
        (
            dict(initial_context_length=32, rope_theta=1e4, head_dim=16, rope_scaling_factor=4.0),
            "initial_context_length",
        ),
        (dict(head_dim=15), "head_dim"),
        (dict(sliding_window=-1), "sliding_window"),
        (dict(rope_scaling_factor=0.5), "rope_scaling_factor"),
        (dict(rope_scaling_factor=4.0, rope_ntk_alpha=32.0, rope_ntk_beta=1.0), "rope_ntk_alpha"),
        (dict(attention_backend="flash"), "attention_backend"),
        (dict(moe_backend="triton"), "moe_backend"),
    ],
)
def test_config_rejects_invalid_combinations(kwargs, key):
    with pytest.raises(ModelConfigError) as info:
        ModelConfig(**kwargs)
    assert info.value.key == key
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"model.{key}:")


def test_config_accepts_valid_edge_cases():
    # a small L0 is fine without YaRN; experts_per_token == num_experts; MQA; no window
    ModelConfig(initial_context_length=32, rope_theta=1e4, head_dim=16, rope_scaling_factor=1.0)
    ModelConfig(num_experts=4, experts_per_token=4)
    cfg = ModelConfig(num_attention_heads=24, num_key_value_heads=1, sliding_window=0)
    assert not any(cfg.is_sliding(i) for i in range(6))
    assert [small_config(num_hidden_layers=4).is_sliding(i) for i in range(4)] == [True, False, True, False]
    assert dataclasses.replace(small_config(), sliding_window=9).sliding_window == 9


def test_logits_at_are_the_full_logits_at_those_positions():
    """logits_at (B, K) gives exactly the rows of the full (B, T, V) logits it names (the unembedding is
    per position), repeated positions included; last_only is the last one."""
    model = Transformer(small_config())
    randomise(model, **SCALES)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    at = torch.tensor([[3, 10, 10], [0, 5, 7]])
    with torch.no_grad():
        full = model(ids).logits  # (2, 11, V)
        picked = model(ids, logits_at=at).logits  # (2, 3, V)
        last = model(ids, last_only=True).logits
    assert picked.shape == (2, 3, full.shape[-1])
    assert torch.equal(picked, torch.stack([full[b, at[b]] for b in range(2)]))
    assert torch.equal(last, full[:, -1:])
