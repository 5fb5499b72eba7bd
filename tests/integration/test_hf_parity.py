"""Numerical parity of our gpt-oss `Transformer` with Hugging Face's `GptOssForCausalLM`.

A tiny random model is built with our `ModelConfig`, every parameter (norm scales, sinks and every bias
included) is randomised, the weights are copied into an HF model of the same shape through the name map of
docs/interop.md#the-weight-map (qkv rows split into q/k/v, expert matrices transposed), and fp32 logits are
compared on sequences longer than the sliding window. Two layouts are covered: the released one (untied, all
biases, YaRN x4) and the compact one (tied, no biases, plain RoPE; HF's router bias cannot be disabled, so it
gets zeros). Both of our attention backends are compared, and so are cached incremental decoding and greedy generation.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GptOssConfig, GptOssForCausalLM  # noqa: E402

from gptoss_cli.model import KVCache, ModelConfig, Transformer  # noqa: E402
from tests.conftest import assert_close, randomise, tiny_model_config  # noqa: E402

BATCH, SEQ = 2, 24
# Absolute, on purpose: randomise's 0.08 weights keep the logits O(1), so fp32 reduction-order noise (the
# two implementations sum in different orders) stays well below 1e-5 (assert_close prints max|ref|).
TOL = 1e-5


def tiny_config(layout: str, backend: str = "eager") -> ModelConfig:
    return tiny_model_config(layout, attention_backend=backend)


def hf_config(cfg: ModelConfig) -> GptOssConfig:
    if cfg.rope_scaling_factor > 1:
        rope = {
            "rope_type": "yarn",
            "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_scaling_factor,
            "beta_fast": cfg.rope_ntk_beta,
            "beta_slow": cfg.rope_ntk_alpha,
            "original_max_position_embeddings": cfg.initial_context_length,
            "truncate": False,
        }
    else:  # without rope_parameters HF silently uses YaRN x32 (configuration_gpt_oss.py)
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    hcfg = GptOssConfig(
        num_hidden_layers=cfg.num_hidden_layers,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        sliding_window=cfg.sliding_window,
        rms_norm_eps=cfg.rms_norm_eps,
        swiglu_limit=cfg.swiglu_limit,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
        max_position_embeddings=int(cfg.initial_context_length * cfg.rope_scaling_factor),
        rope_parameters=rope,
        layer_types=[
            "sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.num_hidden_layers)
        ],
    )
    hcfg._attn_implementation = "eager"
    return hcfg


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our (openai-named) weights under HF names (docs/interop.md#the-weight-map)."""
    cfg = model.config
    sd = model.state_dict()
    out = {
        "model.embed_tokens.weight": sd["embedding.weight"],
        "model.norm.weight": sd["norm.scale"],
        "lm_head.weight": sd["unembedding.weight"],
    }
    split = [cfg.q_dim, cfg.kv_dim, cfg.kv_dim]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"block.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd[src + "attn.norm.scale"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "mlp.norm.scale"]
        for part, w in zip("qkv", sd[src + "attn.qkv.weight"].split(split, dim=0), strict=True):
            out[dst + f"self_attn.{part}_proj.weight"] = w
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attn.out.weight"]
        if cfg.attention_bias:
            for part, b in zip("qkv", sd[src + "attn.qkv.bias"].split(split, dim=0), strict=True):
                out[dst + f"self_attn.{part}_proj.bias"] = b
            out[dst + "self_attn.o_proj.bias"] = sd[src + "attn.out.bias"]
        out[dst + "self_attn.sinks"] = sd[src + "attn.sinks"]
        out[dst + "mlp.router.weight"] = sd[src + "mlp.gate.weight"]
        out[dst + "mlp.router.bias"] = sd[src + "mlp.gate.bias"] if cfg.router_bias else torch.zeros(cfg.num_experts)
        out[dst + "mlp.experts.gate_up_proj"] = sd[src + "mlp.mlp1_weight"].transpose(1, 2)
        out[dst + "mlp.experts.gate_up_proj_bias"] = sd[src + "mlp.mlp1_bias"]
        out[dst + "mlp.experts.down_proj"] = sd[src + "mlp.mlp2_weight"].transpose(1, 2)
        out[dst + "mlp.experts.down_proj_bias"] = sd[src + "mlp.mlp2_bias"]
    return out


def build_pair(layout: str, backend: str = "eager"):
    torch.manual_seed(0)
    ours = Transformer(tiny_config(layout, backend)).eval()
    randomise(ours)
    hf = GptOssForCausalLM(hf_config(ours.config)).eval()
    mapped = to_hf_state_dict(ours)
    hf_sd = hf.state_dict()
    assert set(hf_sd) == set(mapped), set(hf_sd) ^ set(mapped)  # the map covers every HF tensor
    with torch.no_grad():
        for name, tensor in hf_sd.items():
            assert tensor.shape == mapped[name].shape, name
            tensor.copy_(mapped[name])
    assert hf.config._attn_implementation == "eager"
    if ours.config.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return ours, hf


def hf_step(hf, ids, past):
    """One cached HF forward; transformers 5.2x renamed `past_key_values` to `cache`."""
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    out = hf(input_ids=ids, use_cache=True, **({name: past} if past is not None else {}))
    return out.logits, getattr(out, name)


def tokens(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (BATCH, SEQ), generator=g)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", ["released", "compact"])
def test_logits_match_hf(layout, backend):
    ours, hf = build_pair(layout, backend)
    ids = tokens()
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
        got = ours(ids).logits
    assert got.dtype == ref.dtype == torch.float32
    assert got.shape == ref.shape == (BATCH, SEQ, 256)
    assert ref.abs().max() > 0.1  # not a degenerate all-zero comparison
    assert_close(got, ref, rtol=0, atol=TOL)


def test_parity_is_sensitive_to_sinks_window_and_yarn():
    """The comparison above would catch a wrong sink, window or rope setting: each moves the logits."""
    ours, hf = build_pair("released")
    ids = tokens()
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    variants = {
        "no sinks": (ours.config, {f"block.{i}.attn.sinks": torch.full((4,), float("-inf")) for i in range(4)}),
        "window 9": (dataclasses.replace(ours.config, sliding_window=9), {}),
        "plain rope": (dataclasses.replace(ours.config, rope_scaling_factor=1.0), {}),
    }
    for name, (cfg, overrides) in variants.items():
        other = Transformer(cfg).eval()
        other.load_state_dict(state | overrides)
        with torch.no_grad():
            assert (other(ids).logits - ref).abs().max() > 1e-3, name


def test_swiglu_clamp_fires_in_parity_model():
    """The randomised weights push expert pre-activations past the limit, so the clamp is exercised."""
    ours, _ = build_pair("released")
    seen = []
    hooks = [blk.mlp.norm.register_forward_hook(lambda m, i, o: seen.append(o)) for blk in ours.block]
    with torch.no_grad():
        ours(tokens())
    for h in hooks:
        h.remove()
    limit = ours.config.swiglu_limit
    fired = 0
    for blk, t in zip(ours.block, seen, strict=True):
        h = torch.einsum("nh,eoh->neo", t.reshape(-1, t.shape[-1]), blk.mlp.mlp1_weight) + blk.mlp.mlp1_bias
        fired += int((h[..., ::2] > limit).sum() + (h[..., 1::2].abs() > limit).sum())
    assert fired > 100, fired


@pytest.mark.parametrize("layout", ["released", "compact"])
def test_kv_cache_decode_matches_hf_incremental(layout):
    """Prefill 10 tokens (> window), then decode one token at a time, in both models with their caches."""
    ours, hf = build_pair(layout)
    ids = tokens(2)
    prefill = 10
    cache = KVCache(ours.config, BATCH, SEQ, torch.float32, "cpu")
    with torch.no_grad():
        logits, past = hf_step(hf, ids[:, :prefill], None)
        hf_steps, our_steps = [logits], [ours(ids[:, :prefill], cache=cache).logits]
        for t in range(prefill, SEQ):
            logits, past = hf_step(hf, ids[:, t : t + 1], past)
            hf_steps.append(logits)
            our_steps.append(ours(ids[:, t : t + 1], cache=cache).logits)
        full = hf(input_ids=ids, use_cache=False).logits
    hf_inc, ours_inc = torch.cat(hf_steps, 1), torch.cat(our_steps, 1)
    assert_close(ours_inc, hf_inc, rtol=0, atol=TOL)
    assert_close(ours_inc, full, rtol=0, atol=TOL)


def test_greedy_generation_matches_hf():
    ours, hf = build_pair("released")
    prompt = tokens(3)[:, :6]
    new = 12  # 6 + 12 = 18 > window
    with torch.no_grad():
        hf_ids = hf.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
        cache = KVCache(ours.config, BATCH, prompt.shape[1] + new, torch.float32, "cpu")
        seq = prompt
        nxt = ours(prompt, cache=cache, last_only=True).logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new - 1):
            seq = torch.cat([seq, nxt], 1)
            nxt = ours(nxt, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert hf_ids.shape == seq.shape == (BATCH, prompt.shape[1] + new)
    assert torch.equal(seq, hf_ids)
    assert len(set(seq[0, 6:].tolist())) > 1  # not a trivially repeated token
