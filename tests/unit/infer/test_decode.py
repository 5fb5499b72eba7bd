"""The decode core (infer/decode.py) against hand-worked cases: budgets and stop reasons, text streams,
and next_tokens' batching: a failing row fails alone, rows that share a generator draw exactly as one
sample() call over their stacked logits, greedy rows take the argmax."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptoss_cli.config import InferConfig
from gptoss_cli.infer.decode import DecodeState, budget_for, next_tokens
from gptoss_cli.infer.sampling import NON_FINITE, sample

CPU = torch.device("cpu")
V = 12
GREEDY = InferConfig(max_new_tokens=4, temperature=0.0)


def state(params=GREEDY, prompt=(1, 2, 3), max_length=100, **kw) -> DecodeState:
    return DecodeState.start(list(prompt), params, max_length=max_length, vocab_size=V, device=CPU, **kw)


def test_budget_is_max_new_tokens_or_what_the_context_leaves():
    assert budget_for(3, 4, 100) == (4, False)
    assert budget_for(97, 4, 100) == (3, True)


@pytest.mark.parametrize(("max_length", "reason"), [(100, "length"), (6, "context")])
def test_a_sequence_ends_at_its_budget_with_the_reason_that_set_it(max_length, reason):
    s = state(max_length=max_length)
    for token in (5, 6, 7, 8):
        if not s.done:
            s.accept(token)
    assert s.reason == reason and s.out == [5, 6, 7, 8][: s.budget]


def test_a_stop_id_ends_the_sequence_without_joining_it():
    s = state(stop_ids=frozenset({9}))
    s.accept(4)
    s.accept(9)
    assert s.reason == "eos" and s.out == [4]


def test_a_stop_string_cuts_the_text_and_the_held_back_tail_is_released_at_the_end(builtin_tok):
    ids = builtin_tok.encode("hello world. more").ids
    params = dataclasses.replace(GREEDY, max_new_tokens=50, stop=["world."])
    s = state(params, tokenizer=builtin_tok)
    text = "".join(s.accept(t) for t in ids if not s.done)
    assert s.reason == "stop" and text == "hello " and s.text == "hello "
    free = state(dataclasses.replace(GREEDY, max_new_tokens=len(ids)), tokenizer=builtin_tok)
    assert "".join(free.accept(t) for t in ids) == "hello world. more" and free.reason == "length"


def test_the_repetition_mask_covers_the_prompt_and_the_output():
    s = state(dataclasses.replace(GREEDY, repetition_penalty=1.3), prompt=(1, 2))
    s.accept(7)
    assert s.seen[0].nonzero().flatten().tolist() == [1, 2, 7]


def test_a_row_with_non_finite_logits_fails_alone():
    logits = torch.randn(3, V)
    logits[1, 4] = float("nan")
    sampled = dataclasses.replace(GREEDY, temperature=1.0, seed=0)
    states = [state(), state(), state(sampled)]
    ids, failed = next_tokens(logits, states)
    assert failed == {1: NON_FINITE}
    assert ids[0] == int(logits[0].argmax()) and 0 <= ids[2] < V
    logits[2, 0] = float("inf")  # sampling raises on this row: it fails, the greedy row still gets its token
    ids, failed = next_tokens(logits, [state(), state(sampled)])
    assert list(failed) == [1] and "non-finite" in failed[1] and ids[0] == int(logits[0].argmax())


def test_rows_sharing_a_generator_draw_as_one_sample_call():
    params = InferConfig(max_new_tokens=4, temperature=0.9, top_k=5, seed=11)
    logits = torch.randn(4, V)
    shared = torch.Generator().manual_seed(11)
    ids, failed = next_tokens(logits, [state(params, generator=shared) for _ in range(4)])
    expected = sample(logits, params, torch.Generator().manual_seed(11))
    assert not failed and ids == expected.tolist()


def test_rows_with_their_own_generators_draw_as_they_would_alone():
    params = InferConfig(max_new_tokens=4, temperature=1.0, seed=5)
    logits = torch.randn(3, V)
    ids, _ = next_tokens(logits, [state(dataclasses.replace(params, seed=5 + i)) for i in range(3)])
    alone = [sample(logits[i : i + 1], params, torch.Generator().manual_seed(5 + i)).item() for i in range(3)]
    assert ids == alone
