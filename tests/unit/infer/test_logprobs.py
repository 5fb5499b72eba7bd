"""infer/logprobs.py and evaluate/loglikelihood.py against float64 references computed here: a token's
log-probability is log_softmax of the raw logits, its alternatives the top-k of that, and the batched scorer
(right padding, rows of different lengths, logits only at the scored positions) equals one full forward per
row."""

from __future__ import annotations

import pytest
import torch

from gptoss_cli.evaluate.loglikelihood import score_tokens
from gptoss_cli.infer.logprobs import log_probs, token_logprobs
from gptoss_cli.model import Transformer
from tests.conftest import assert_close, randomise, rtol_for
from tests.unit.model.references import SCALES, small_config


def test_token_logprobs_are_the_log_softmax_and_its_top_k():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(5, 50, generator=g)
    tokens = [3, 0, 49, 7, 7]
    ref = logits.double().log_softmax(-1)
    got = token_logprobs(logits, tokens, top=4)
    rtol = rtol_for(torch.float32, 50)
    assert [e.token for e in got] == tokens
    assert_close(torch.tensor([e.logprob for e in got]), ref[range(5), tokens], rtol)
    values, ids = ref.topk(4, dim=-1)
    for e, v, i in zip(got, values, ids, strict=True):
        assert [t for t, _ in e.top] == i.tolist()
        assert_close(torch.tensor([lp for _, lp in e.top]), v, rtol)
    assert all(e.top == () for e in token_logprobs(logits, tokens, top=0))
    assert token_logprobs(logits[:0], [], top=3) == []
    assert len(token_logprobs(logits, tokens, top=99)[0].top) == 50  # at most the vocabulary
    assert log_probs(logits.double()).dtype == torch.float64  # fp64 stays fp64 (fp32 at least)


def test_score_tokens_equals_one_full_forward_per_row():
    model = Transformer(small_config()).eval()
    randomise(model, **SCALES)
    g = torch.Generator().manual_seed(3)
    rows = [
        (torch.randint(0, 64, (n,), generator=g).tolist(), k) for n, k in [(9, 3), (4, 1), (13, 12), (6, 5), (2, 1)]
    ]
    got = score_tokens(model, rows, batch_size=2, pad_id=63)
    batches = []
    one_by_one = score_tokens(model, rows, batch_size=5, max_logits=1, on_batch=batches.append)
    assert batches == [1] * 5  # the logits budget, not batch_size, decided: one row per forward
    for (tokens, k), scored, alone in zip(rows, got, one_by_one, strict=True):
        assert_close(torch.tensor(scored.logprobs), torch.tensor(alone.logprobs), rtol_for(torch.float32, 64, 16))
        with torch.no_grad():
            ref = model(torch.tensor([tokens[:-1]])).logits[0].double().log_softmax(-1)  # (n - 1, V)
        targets = torch.tensor(tokens[-k:])
        expected = ref[-k:].gather(1, targets[:, None])[:, 0]
        assert_close(torch.tensor(scored.logprobs), expected, rtol_for(torch.float32, 64, 16))
        assert scored.greedy == (ref[-k:].argmax(-1) == targets).tolist()
        assert scored.total == pytest.approx(float(expected.sum()), rel=1e-4)


def test_score_tokens_refuses_rows_without_a_token_to_score():
    model = Transformer(small_config()).eval()
    with pytest.raises(ValueError, match="1 .. len"):
        score_tokens(model, [([1, 2, 3], 3)], batch_size=1)
