"""`gptoss serve`'s log-probabilities (completions' `logprobs` and `echo`, chat's `logprobs` and
`top_logprobs`) against independent references: the real server in a subprocess on a loopback port, spoken to
with the `openai` client and raw HTTP, and the numbers compared with

- a full forward of the same run in this process and its float64 log-softmax (the prompt tokens', the top
  alternatives', the sampled tokens'),
- `gptoss eval --tasks`' per-token scorer (evaluate/loglikelihood.py), and
- `gptoss eval --data`'s summed loss on the same text, through the command line.

The server prefills in chunks of 5 tokens through its KV cache, so an echoed prompt crosses chunk
boundaries and the sliding layers' ring wraps; the references see the whole text in one forward, so they
agree to float rounding (relative tolerances, tests/conftest.py).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import httpx2 as httpx
import pytest
import torch

from gptoss_cli.config import InferConfig
from gptoss_cli.data.tokenizer import EOS
from tests.conftest import assert_close, rtol_for
from tests.integration.test_serve import LINES, Server, make_run

openai = pytest.importorskip("openai")

TEXT = "Mixture of experts layers route every token to a few experts. A sliding window keeps only the keys."
# fp32 on both sides, a different summation order (chunked, cached prefill against one forward): a few
# chained reductions over the hidden size
RTOL = rtol_for(torch.float32, 64, 16)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("logprobs") / "demo")


@pytest.fixture(scope="module")
def server(run):
    srv = Server(run, "--prefill-chunk", "5", "--drain-timeout", "0")
    try:
        yield srv.wait_ready()
    finally:
        code = srv.stop()
    assert code == 0, srv.stderr()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def loaded(run):
    from gptoss_cli.run.open import load_run

    torch.set_num_threads(1)
    return load_run(run, device="cpu", dtype="fp32")


def reference(loaded, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V) float64 log-probabilities of the tokens after the first, from one full forward."""
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([ids[:-1]])).logits[0]
    return logits.double().log_softmax(-1)


def test_echo_equals_a_full_forward_and_the_eval_scorer(loaded, client):
    from gptoss_cli.evaluate.loglikelihood import score_tokens

    ids = loaded.tokenizer.encode(TEXT).ids
    assert len(ids) > 12  # several prefill chunks
    reply = client.completions.create(model="demo", prompt=TEXT, max_tokens=0, echo=True, logprobs=3)
    choice = reply.choices[0]
    assert choice.text == TEXT and choice.finish_reason == "length"
    lp = choice.logprobs
    assert "".join(lp.tokens) == TEXT and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [len(loaded.tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == len(ids)

    ref = reference(loaded, ids)
    targets = torch.tensor(ids[1:])
    assert_close(torch.tensor(lp.token_logprobs[1:]), ref.gather(1, targets[:, None])[:, 0], RTOL, what="echo")
    scored = score_tokens(loaded.model, [(ids, len(ids) - 1)], batch_size=1)[0]
    assert_close(torch.tensor(lp.token_logprobs[1:]), torch.tensor(scored.logprobs), RTOL, what="echo vs eval")
    # the 3 most likely tokens at every position, plus the prompt's own token where it is not among them
    values, best = ref.topk(3, dim=-1)
    for i, alternatives in enumerate(lp.top_logprobs[1:]):
        expected = {
            shown(loaded.tokenizer.decode([t])): v for t, v in zip(best[i].tolist(), values[i].tolist(), strict=True)
        }
        expected.setdefault(lp.tokens[i + 1], lp.token_logprobs[i + 1])
        assert {shown(unpack(k)) for k in alternatives} == expected.keys(), i
        got = {shown(unpack(k)): v for k, v in alternatives.items()}
        assert_close(torch.tensor([got[k] for k in expected]), torch.tensor(list(expected.values())), RTOL)


def unpack(token: str) -> str:
    """A token as the API shows part of a UTF-8 character, `bytes:\\xfb`, back to its lossy decoding."""
    if token.startswith("bytes:"):
        return bytes.fromhex(token.removeprefix("bytes:").replace("\\x", "")).decode("utf-8", errors="replace")
    return token


def shown(text: str) -> str:
    """Tokens that are part of a character all decode to U+FFFD: compare those as one class."""
    return "<partial>" if "\ufffd" in text else text


def test_echo_sum_equals_gptoss_eval_loss(gptoss, run, loaded, server, tmp_path):
    """The summed log-probability of a document after <|endoftext|> is minus `gptoss eval`'s summed loss."""
    doc = tmp_path / "held-out.txt"
    doc.write_text(TEXT + "\n", encoding="utf-8")
    code, out, err = gptoss(
        "eval", "--run", run, "--data", doc, "--context", 160, "--stride", 160, "--json", "--no-save"
    )
    assert code == 0, err
    result = json.loads(out)
    ids = [loaded.tokenizer.token_to_id(EOS), *loaded.tokenizer.encode(TEXT).ids]
    body = {"model": "demo", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
    lp = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert result["tokens"] == len(ids) - 1
    assert_close(torch.tensor(-math.fsum(lp["token_logprobs"][1:])), torch.tensor(result["loss_sum_nats"]), RTOL)
    # logprobs 0: the token's own log-probability and no alternatives
    assert all(
        top == {tok: v}
        for top, tok, v in zip(lp["top_logprobs"][1:], lp["tokens"][1:], lp["token_logprobs"][1:], strict=True)
    )


@pytest.mark.parametrize("settings", [{"temperature": 0}, {"temperature": 1.3, "top_k": 5, "seed": 7}])
def test_sampled_tokens_carry_the_raw_models_logprobs(run, loaded, client, settings):
    """Greedy or sampled with temperature and top-k, a generated token's log-probability is the model's own
    log-softmax at that position (not the reshaped sampling distribution)."""
    from gptoss_cli.infer.generate import infer

    settings = dict(settings)
    extra = {"top_k": settings.pop("top_k")} if "top_k" in settings else {}
    reply = client.completions.create(
        model="demo", prompt="The quick", max_tokens=8, logprobs=2, extra_body=extra, **settings
    )
    lp = reply.choices[0].logprobs
    # The tokens the server drew are `gptoss infer`'s for the same settings (tests/integration/test_serve.py);
    # an end-of-text token ends the text but is reported with its log-probability.
    done = infer(["The quick"], run=run, device="cpu", max_new_tokens=8, **settings, **extra).completions[0]
    new = done.token_ids + ([loaded.tokenizer.token_to_id(EOS)] if done.stop_reason == "eos" else [])
    assert len(lp.tokens) == len(new) and reply.choices[0].text == done.text
    prompt = loaded.tokenizer.encode("The quick").ids
    ref = reference(loaded, prompt + new)[len(prompt) - 1 :]
    assert_close(torch.tensor(lp.token_logprobs), ref.gather(1, torch.tensor(new)[:, None])[:, 0], RTOL)
    for i, alternatives in enumerate(lp.top_logprobs):
        assert 2 <= len(alternatives) <= 3 and lp.tokens[i] in alternatives
        best = ref[i].topk(2).values
        assert_close(torch.tensor(sorted(alternatives.values(), reverse=True)[:2]), best, RTOL)
        if settings["temperature"] == 0:  # greedy: the chosen token is the most likely one
            assert_close(torch.tensor(lp.token_logprobs[i]), best[0], RTOL)


def test_echo_and_one_new_token_as_lm_eval_asks(loaded, client):
    """lm-evaluation-harness' local-completions sends token ids with echo, logprobs 1 and max_tokens 1 and
    reads token_logprobs[ctxlen:-1]: the prompt's, then exactly one generated token's."""
    ids = loaded.tokenizer.encode(TEXT).ids[:20]
    reply = client.completions.create(model="demo", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = reply.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1
    ref = reference(loaded, ids)
    assert_close(
        torch.tensor(lp.token_logprobs[1 : len(ids)]), ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], RTOL
    )
    for i in range(1, len(ids)):  # is_greedy as lm-eval decides it: the token's logprob is the best one
        greedy = ids[i] == int(ref[i - 1].argmax())
        assert (lp.token_logprobs[i] >= max(lp.top_logprobs[i].values())) == greedy


def test_stream_carries_the_same_logprobs(client):
    body = dict(model="demo", prompt=TEXT, max_tokens=6, echo=True, logprobs=2, temperature=0)
    whole = client.completions.create(**body).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **body) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        if c.logprobs is not None:
            for key in merged:
                merged[key] += getattr(c.logprobs, key)
    assert merged["tokens"] == whole.logprobs.tokens
    assert merged["token_logprobs"] == whole.logprobs.token_logprobs
    assert merged["text_offset"] == whole.logprobs.text_offset


def test_chat_logprobs(loaded, client):
    reply = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "GPT models"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content
    assert 1 <= len(content) <= 6
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8")) or entry.token.startswith("bytes:")
        assert len(entry.top_logprobs) == 2
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(v <= 0 for v in tops)
        assert_close(torch.tensor(entry.logprob), torch.tensor(tops[0]), RTOL)  # greedy: the best one
    plain = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "GPT models"}], max_tokens=6, temperature=0
    )
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content


def test_echo_of_a_prompt_that_fills_the_context(loaded, server):
    """max_tokens 0 scores a prompt as long as the context; one new token more does not fit."""
    ids = (loaded.tokenizer.encode(" ".join(LINES)).ids * 4)[:160]
    body = {"model": "demo", "prompt": ids, "echo": True, "logprobs": 0}
    r = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == 160
    r = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
    ],
)
def test_bad_logprob_requests_are_400(server, path, body, param):
    r = httpx.post(server.url + path, json={"model": "demo", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_scored_prompt_with_non_finite_logits_fails_alone(run, loaded):
    """max_tokens 0 samples nothing, so sampling would not notice NaN logits: the scoring itself fails the
    request with the non-finite message instead of answering NaN, which is not JSON."""
    import copy

    from gptoss_cli.infer.sampling import NON_FINITE
    from gptoss_cli.serve.engine import Engine
    from gptoss_cli.serve.requests import Failed, Request

    broken = copy.deepcopy(loaded.model)
    with torch.no_grad():
        broken.unembedding.weight.fill_(float("nan"))
    tok = loaded.tokenizer
    engine = Engine(broken, tok, eos_id=tok.token_to_id(EOS), max_batch=2, max_queue=4, prefill_chunk=5)
    events: list = []
    params = InferConfig(max_new_tokens=1, temperature=0)
    engine.start()
    try:
        engine.submit([Request(tok.encode(TEXT).ids, params, events.append, logprobs=0, echo=True, generate=False)])
        deadline = time.monotonic() + 60
        while not events:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        engine.stop()
    assert isinstance(events[-1], Failed) and events[-1].message == NON_FINITE
