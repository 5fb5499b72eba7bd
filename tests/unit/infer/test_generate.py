"""Generation against independent references: a full forward without a cache (eager attention) for every
cached step, across the sliding-window ring's wrap and with left-padded batches; a cache-free argmax
loop for greedy decoding; the nucleus / top-k sets and the CTRL penalty formula computed by hand.
"""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch

from gptoss_cli.config import InferConfig
from gptoss_cli.data.tokenizer import train_tokenizer
from gptoss_cli.errors import GptossError
from gptoss_cli.infer import compiled as compiled_decode
from gptoss_cli.infer.generate import generate_tokens
from gptoss_cli.infer.sampling import TextStream, sample
from gptoss_cli.model import ModelConfig, Transformer
from tests.conftest import HAS_COMPILER, assert_close, randomise, rtol_for

W = 8  # sliding window
CFG = ModelConfig(
    num_hidden_layers=4,
    num_experts=4,
    experts_per_token=2,
    vocab_size=96,
    hidden_size=64,
    intermediate_size=32,
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=W,
    initial_context_length=96,
    max_context_length=96,
    moe_backend="loop",
)
PAD = 95
# fp32 logits of a 4-layer model (cached decoding against a full forward: other shapes, other summation
# orders): per layer attention (3) and MoE (4) reductions over H = 64, then the unembedding.
LOGITS_RTOL = rtol_for(torch.float32, 64, 4 * 7 + 1)
pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny shapes on a shared machine

GREEDY = InferConfig(max_new_tokens=30, temperature=0.0)


@pytest.fixture(scope="module")
def models() -> tuple[Transformer, Transformer]:
    """(sdpa model used with the cache, eager twin used as the cache-free reference), random non-zero weights."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    # sinks random (they matter at decode too); 0.15 elsewhere spreads the logits, so greedy choices are far
    # from ties
    randomise(model, std=0.15, bias_std=0.15, mlp1_std=0.15)
    ref = Transformer(dataclasses.replace(CFG, attention_backend="eager"))
    ref.load_state_dict(model.state_dict())
    return model.eval(), ref.eval()


def prompt(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, PAD, (n,), generator=g).tolist()


def run(model, prompts, params=GREEDY, **kwargs):
    steps = []
    ids, reasons, stats = generate_tokens(
        model,
        prompts,
        params,
        pad_id=PAD,
        eos_id=kwargs.pop("eos_id", None),
        on_logits=lambda x: steps.append(x.clone()),
        **kwargs,
    )
    return ids, reasons, stats, torch.stack(steps, 1)  # logits (B, steps, V)


@torch.no_grad()
def full_logits(ref: Transformer, ids: list[int]) -> torch.Tensor:
    return ref(torch.tensor([ids])).logits[0]  # (T, V), no cache


@pytest.mark.parametrize("prompt_len", [3, W - 1, W, W + 1, 2 * W + 3])
def test_cached_decode_matches_full_forward_across_ring_wrap(models, prompt_len):
    model, ref = models
    p = prompt(prompt_len)
    ids, reasons, _, steps = run(model, [p], dataclasses.replace(GREEDY, max_new_tokens=5 * W))
    assert reasons == ["length"] and len(ids[0]) == 5 * W  # the ring wrapped several times
    full = full_logits(ref, p + ids[0])
    expected = full[prompt_len - 1 : prompt_len - 1 + 5 * W]  # logits that predicted each generated token
    assert_close(steps[0], expected, rtol=LOGITS_RTOL)
    assert expected.std() > 0.5  # a real comparison, not of near-constant logits


def test_eager_backend_cache_matches_too(models):
    model, ref = models
    p = prompt(W + 1, seed=3)
    ids, _, _, steps = run(ref, [p], dataclasses.replace(GREEDY, max_new_tokens=3 * W))
    assert_close(steps[0], full_logits(ref, p + ids[0])[W : W + 3 * W], rtol=LOGITS_RTOL)


def test_left_padded_batch_matches_each_prompt_alone(models):
    model, ref = models
    prompts = [prompt(3, seed=4), prompt(2 * W - 1, seed=5), prompt(6, seed=6)]
    ids, _, stats, steps = run(model, prompts, dataclasses.replace(GREEDY, max_new_tokens=20))
    assert stats.prompt_tokens == sum(map(len, prompts)) and stats.new_tokens == 60
    for row, p in enumerate(prompts):
        alone, _, _, _ = run(model, [p], dataclasses.replace(GREEDY, max_new_tokens=20))
        assert ids[row] == alone[0]
        full = full_logits(ref, p + ids[row])[len(p) - 1 : len(p) + 19]
        assert_close(steps[row], full, rtol=LOGITS_RTOL)


def test_greedy_is_deterministic_and_equals_a_cache_free_argmax_loop(models):
    model, ref = models
    seq = prompt(5, seed=7)
    first, _, _, _ = run(model, [seq])
    again, _, _, _ = run(model, [seq])
    assert first == again
    for _ in range(GREEDY.max_new_tokens):
        seq = seq + [int(full_logits(ref, seq)[-1].argmax())]
    assert first[0] == seq[5:]


def test_temperature_zero_top_k_one_and_greedy_agree(models):
    model, _ = models
    p = [prompt(4, seed=8)]
    greedy, _, _, _ = run(model, p)
    top1, _, _, _ = run(model, p, InferConfig(max_new_tokens=30, temperature=1.3, top_k=1, seed=5))
    assert top1 == greedy


def test_seed_reproduces_sampled_text(models):
    model, _ = models
    p = [prompt(4, seed=9)]
    params = InferConfig(max_new_tokens=25, temperature=1.0, top_k=40, top_p=0.95, seed=123)
    a, _, _, _ = run(model, p, params)
    b, _, _, _ = run(model, p, params)
    c, _, _, _ = run(model, p, dataclasses.replace(params, seed=124))
    assert a == b
    assert a != c


def test_repetition_penalty_matches_a_hand_computed_reference(models):
    model, ref = models
    seq, p = prompt(6, seed=10), 1.8
    params = dataclasses.replace(GREEDY, max_new_tokens=20, repetition_penalty=p)
    got, _, _, _ = run(model, [seq], params)
    for _ in range(20):  # CTRL: a seen token's logit is divided by p when positive, multiplied when not
        logits = full_logits(ref, seq)[-1]
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[seq] = True
        penalised = torch.where(seen & (logits > 0), logits / p, torch.where(seen, logits * p, logits))
        seq = seq + [int(penalised.argmax())]
    assert got[0] == seq[6:]
    plain, _, _, _ = run(model, [seq[:6]], dataclasses.replace(params, repetition_penalty=1.0))
    assert plain != got  # the penalty changed the text, so the comparison above tested it


def test_eos_stops_a_row_and_is_not_returned(models):
    model, _ = models
    p = [prompt(5, seed=11)]
    free, _, _, _ = run(model, p)
    k = next(i for i in range(2, len(free[0])) if free[0][i] not in free[0][:i])
    ids, reasons, _, _ = run(model, p, eos_id=free[0][k])
    assert ids[0] == free[0][:k] and reasons == ["eos"]


def test_context_limit_stops_generation(models):
    model, _ = models
    ids, reasons, stats, _ = run(model, [prompt(CFG.max_context_length - 6)])
    assert len(ids[0]) == 6 and reasons == ["context"] and stats.context_limited
    with pytest.raises(GptossError, match="context"):
        run(model, [prompt(CFG.max_context_length)])
    with pytest.raises(GptossError, match="empty prompt"):
        run(model, [[]])


def draws(logits: list[float], params: InferConfig, n: int = 4000) -> torch.Tensor:
    x = torch.tensor([logits]).expand(n, -1)
    return sample(x, params, torch.Generator().manual_seed(0))


def test_top_k_and_top_p_sample_from_the_hand_computed_sets():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])
    logits = probs.log().tolist()
    # top-k 3 keeps {1, 3, 4}; top-p 0.8 keeps 0.5 + 0.2 + 0.15 (0.7 < 0.8 <= 0.85) = the same set.
    for params in (InferConfig(temperature=1.0, top_k=3), InferConfig(temperature=1.0, top_p=0.8)):
        got = draws(logits, params)
        assert set(got.tolist()) == {1, 3, 4}
        freq = torch.bincount(got, minlength=5).float() / got.numel()
        expected = torch.tensor([0, 0.5, 0, 0.2, 0.15]) / 0.85
        assert (freq - expected).abs().max() < 0.03
    assert set(draws(logits, InferConfig(temperature=1.0, top_p=0.5)).tolist()) == {1}  # exactly reached
    assert set(draws(logits, InferConfig(temperature=1.0, top_p=0.51)).tolist()) == {1, 3}


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog, héllo wörld 日本"] * 4, 300)
    text = "héllo 日本 the quick brown fox jumps"
    stream = TextStream(tok, stop=("fox", "zebra"))
    chunks = []
    for t in tok.encode(text).ids:
        chunks.append(stream.add(t))
        if stream.stopped:
            break
    chunks.append(stream.finish())
    assert "".join(chunks) == stream.text == "héllo 日本 the quick brown "
    assert not any("\ufffd" in c for c in chunks)
    plain = TextStream(tok)
    assert "".join([plain.add(t) for t in tok.encode(text).ids] + [plain.finish()]) == text


# ---- the static cache behind `infer --compile` ----------------------------------------------------


@pytest.fixture
def fresh_steps(monkeypatch):
    """An empty registry of compiled steps: no test sees a step another test built (or faked)."""
    steps = weakref.WeakKeyDictionary()
    monkeypatch.setattr(compiled_decode, "_STEPS", steps)
    return steps


@pytest.mark.parametrize("prompt_len", [3, W + 1, 2 * W + 3])
def test_static_cache_decode_matches_full_forward(models, prompt_len, monkeypatch, fresh_steps):
    """compile_decode swaps in StaticKVCache; torch.compile itself is replaced by the identity here (its
    CPU compile takes tens of seconds; the compiled run is `test_compiled_decode_matches_eager`)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    model, ref = models
    p = prompt(prompt_len, seed=7)
    ids, reasons, _, steps = run(model, [p], dataclasses.replace(GREEDY, max_new_tokens=4 * W), compile_decode=True)
    assert reasons == ["length"]
    full = full_logits(ref, p + ids[0])
    assert_close(steps[0], full[prompt_len - 1 : prompt_len - 1 + 4 * W], rtol=LOGITS_RTOL)
    eager_ids, *_ = run(model, [p], dataclasses.replace(GREEDY, max_new_tokens=4 * W))
    assert ids == eager_ids


def test_static_cache_left_padded_batch(models, monkeypatch, fresh_steps):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    model, _ = models
    prompts = [prompt(3, seed=8), prompt(2 * W, seed=9)]
    static_ids, *_ = run(model, prompts, dataclasses.replace(GREEDY, max_new_tokens=12), compile_decode=True)
    eager_ids, *_ = run(model, prompts, dataclasses.replace(GREEDY, max_new_tokens=12))
    assert static_ids == eager_ids


def test_compiled_step_is_reused_across_generations(models, monkeypatch, fresh_steps):
    """A second generation of the same shape reuses the step and its emptied cache (no new trace), and
    still equals eager decoding; another batch size gets its own step."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    model, _ = models
    params = dataclasses.replace(GREEDY, max_new_tokens=10)
    for seed, length in ((11, 5), (12, 9)):  # 15 and 19 tokens: both in the first 64-token cache
        p = prompt(length, seed=seed)
        ids, _, stats, _ = run(model, [p], params, compile_decode=True)
        eager_ids, _, eager_stats, _ = run(model, [p], params)
        assert ids == eager_ids
        # the first decode step (the one that compiles) is timed apart and left out of the decode speed
        assert stats.compile_s > 0 and eager_stats.compile_s == 0
        assert stats.decode_tokens_per_s > 0
    assert len(fresh_steps[model]) == 1
    run(model, [prompt(5, seed=13), prompt(6, seed=14)], params, compile_decode=True)
    assert len(fresh_steps[model]) == 2


@pytest.mark.skipif(not HAS_COMPILER, reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_decode_matches_eager_with_one_graph_for_every_length(models, fresh_steps):
    """The real torch.compile of the decode step (CPU inductor). Two generations whose caches have different
    lengths (64 and 96 tokens) use the same step and the same graph: the length is symbolic."""
    model, _ = models
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    lengths = []
    for seed, n in ((10, W + 2), (15, 60)):
        p = prompt(n, seed=seed)
        params = dataclasses.replace(GREEDY, max_new_tokens=2 * W)
        compiled_ids, _, _, compiled_steps = run(model, [p], params, compile_decode=True)
        eager_ids, _, _, eager_steps = run(model, [p], params)
        assert compiled_ids == eager_ids
        assert_close(compiled_steps, eager_steps, rtol=LOGITS_RTOL)  # inductor fuses and reorders the sums
        lengths.append(fresh_steps[model][(1, torch.float32, torch.device("cpu"))].cache.max_length)
    assert lengths == [64, 96]
    assert len(fresh_steps[model]) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
