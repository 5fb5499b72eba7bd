"""`gptoss serve` against a hostile or careless client: nothing one request sends can break another.

Real servers in subprocesses on free 127.0.0.1 ports, spoken to with the `openai` client and raw HTTP, with
concurrent clients streaming while bad requests arrive: every field is checked before admission (400 naming
it), a body over --max-body is 413 without being read, a prompt that cannot fit is refused before it is
tokenized, tokenizing runs off the event loop (/health answers meanwhile), and a failure inside the shared
decode step fails only the request it belongs to (the engine tests, in process).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from gptoss_cli.config import InferConfig
from gptoss_cli.data.tokenizer import EOS, PAD
from tests.conftest import save_demo_run
from tests.integration.test_serve import CHUNK, CONTEXT, LINES, PROMPTS, Server, make_run, reference

openai = pytest.importorskip("openai")

BIG_BODY = 16 * 2**20  # the --max-body of the server that tokenizes long prompts


def _normalized_tokenizer() -> Tokenizer:
    """A BPE with a normalizer: no byte bound applies, so a long prompt is really tokenized."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(LINES, trainer)
    return tok


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-robust")
    slow = save_demo_run(root / "slow", _normalized_tokenizer(), context=CONTEXT, max_new_tokens=12, name="slow")
    return {"demo": make_run(root / "demo"), "slow": slow}


@pytest.fixture(scope="module")
def servers(runs):
    main = Server(runs["demo"], "--prefill-chunk", str(CHUNK), "--max-body", "64KiB", "--drain-timeout", "0")
    slow = Server(runs["slow"], "--max-body", str(BIG_BODY), "--drain-timeout", "0")
    try:
        yield {"main": main.wait_ready(), "slow": slow.wait_ready()}
    finally:
        codes = main.stop(), slow.stop()
    assert codes == (0, 0), (main.stderr(), slow.stderr())
    assert "Traceback" not in main.stderr() + slow.stderr()


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


def _post(server: Server, body: dict | bytes, path: str = "/v1/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, **kw)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "\n" not in error["message"]
    return error


class Streams:
    """`count` greedy streaming completions running in threads; `texts` once joined."""

    def __init__(self, server: Server, count: int, max_tokens: int = 40):
        self.client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.max_tokens, self.texts, self.errors = max_tokens, {}, []
        self.started = threading.Semaphore(0)
        self.threads = [threading.Thread(target=self._one, args=(i,)) for i in range(count)]
        for t in self.threads:
            t.start()
        for _ in range(count):  # every stream has its first token: all are decoding
            assert self.started.acquire(timeout=60)

    def _one(self, i: int) -> None:
        try:
            stream = self.client.completions.create(
                model="demo", prompt=PROMPTS[i], max_tokens=self.max_tokens, temperature=0, stream=True
            )
            parts = []
            for n, chunk in enumerate(stream):
                parts.append(chunk.choices[0].text)
                if n == 0:
                    self.started.release()
            self.texts[i] = "".join(parts)
        except BaseException as err:  # reported by join(), in the test's thread
            self.errors.append(err)
            self.started.release()

    def join(self) -> dict[int, str]:
        for t in self.threads:
            t.join(120)
        assert not self.errors, self.errors
        return self.texts


# ---- every field against what the engine takes ---------------------------------------------------

BAD_FIELDS = [
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 10**40}, "seed"),
    ({"temperature": 1e-30}, "temperature"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"top_p": 1e-400}, "top_p"),  # parses as 0.0
    ({"stop": ["x" * 257]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"n": 17}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [2**70]}, "prompt"),
    ({"prompt": ["GPT"] * 65}, "prompt"),  # more prompts than the queue holds, refused before tokenizing
]


def test_bad_fields_are_400_while_streams_go_on(runs, server):
    """Eight greedy streams decode while a bad value of every field arrives: each bad request is a 400 naming
    its field, and every stream ends with the very text `gptoss infer` gives."""
    streams = Streams(server, 8)
    for fields, param in BAD_FIELDS:
        error = _error(_post(server, {"model": "demo", "prompt": "GPT", **fields}), 400)
        assert error["param"] == param and error["type"] == "invalid_request_error", (fields, error)
    for literal in (b"NaN", b"Infinity", b"-Infinity"):  # Python's json takes them; JSON does not
        body = b'{"model": "demo", "prompt": "GPT", "temperature": ' + literal + b"}"
        assert _error(_post(server, body), 400)["code"] == "invalid_json"
    chat = {"model": "demo", "messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]}
    assert _error(_post(server, chat, "/v1/chat/completions"), 400)["param"] == "messages"
    texts = streams.join()
    for i, text in texts.items():
        assert text == reference(runs["demo"], PROMPTS[i], max_new_tokens=40, temperature=0), i
    health = httpx.get(server.url + "/health").json()
    assert health["failed"] == 0 and health["running"] == 0


def test_the_edges_of_every_range_are_served(server):
    """What the engine takes, it serves: the widest seeds (n choices of the largest wrap around), a huge
    max_tokens (cut by the context), a top_k beyond the vocabulary, the smallest temperature."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    for seed in (2**64 - 1, -(2**63)):
        reply = client.completions.create(model="demo", prompt="GPT", max_tokens=4, seed=seed, n=2)
        assert len(reply.choices) == 2 and all(c.finish_reason == "length" for c in reply.choices)
    reply = client.completions.create(
        model="demo", prompt="GPT", max_tokens=10**30, temperature=1e-6, extra_body={"top_k": 10**30}
    )
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.total_tokens <= CONTEXT


# ---- size limits ---------------------------------------------------------------------------------


def test_a_body_over_max_body_is_413_and_never_held(server):
    """64 KiB here: a 50 MB body with a Content-Length and a chunked one are both refused. httpx sends the
    whole body before it reads: the answer must still arrive whole (the server reads the rest and throws it
    away rather than resetting the connection), and the server keeps serving."""
    big = json.dumps({"model": "demo", "prompt": "GPT " * 12_500_000}).encode()
    error = _error(_post(server, big, timeout=60), 413)
    assert error["code"] == "request_too_large" and f"has {len(big)} bytes" in error["message"]

    def pieces():
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + (1 << 16)]

    r = httpx.post(server.url + "/v1/completions", content=pieces(), timeout=60)
    assert _error(r, 413)["message"].startswith(f"the request body is over {64 * 1024} bytes")
    with pytest.raises(openai.APIStatusError) as info:
        openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0).completions.create(
            model="demo", prompt="GPT " * 100_000
        )
    assert info.value.status_code == 413
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(runs, server):
    """The demo run's tokenizer is byte-level BPE: a text of B bytes has at least B / (longest token) tokens,
    so 60 KB of text is refused from its size; a prompt just over the context is counted exactly."""
    text = "The quick brown fox jumps over the lazy dog. " * 1300
    error = _error(_post(server, {"model": "demo", "prompt": text}), 400)
    assert error["code"] == "context_length_exceeded" and error["message"].startswith("the prompt has at least ")
    messages = [{"role": "user", "content": text}]
    error = _error(_post(server, {"model": "demo", "messages": messages}, "/v1/chat/completions"), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    count = len(Tokenizer.from_file(str(runs["demo"] / "tokenizer.json")).encode("GPT " * CONTEXT).ids)
    error = _error(_post(server, {"model": "demo", "prompt": "GPT " * CONTEXT}), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith(f"the prompt has {count} tokens; this model's context is {CONTEXT} tokens")


def test_health_answers_while_a_long_prompt_is_tokenized(runs, servers):
    """A normalizer rules out the byte bound, so an 8 MB prompt is tokenized whole (seconds): /health is
    answered again and again while that runs (it reports the prompt being tokenized), and a short request
    beside it is served; then the long one is refused with its exact token count."""
    slow = servers["slow"]
    text = "The quick brown fox jumps over the lazy dog. " * 180_000  # 8.1 MB
    result: dict = {}
    big = threading.Thread(target=lambda: result.update(r=_post(slow, {"model": "slow", "prompt": text}, timeout=300)))
    big.start()
    seen, deadline = 0, time.monotonic() + 120
    while big.is_alive() and seen < 5 and time.monotonic() < deadline:
        seen += httpx.get(slow.url + "/health", timeout=30).json()["tokenizing"] > 0
        time.sleep(0.005)
    # A loop blocked by the tokenizer answers at most one /health that still sees it (once it is free again).
    assert seen == 5, f"/health saw the long prompt being tokenized {seen} time(s), not 5"
    client = openai.OpenAI(base_url=slow.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.completions.create(model="slow", prompt="The quick", max_tokens=8, temperature=0)
    assert reply.choices[0].text == reference(runs["slow"], "The quick", max_new_tokens=8, temperature=0)
    big.join(300)
    error = _error(result["r"], 400)
    assert error["code"] == "context_length_exceeded" and error["message"].startswith("the prompt has ")
    assert "at least" not in error["message"]


# ---- start-up ------------------------------------------------------------------------------------


def test_listening_beyond_loopback_without_a_key_warns(gptoss, runs):
    """Never really listening beyond loopback here: the port is held on 127.0.0.1, so binding 0.0.0.0 fails
    right after the warning."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = gptoss("serve", "--run", runs["demo"], "--host", "0.0.0.0", "--port", port)
        assert code == 2 and err.splitlines()[-1].startswith(f"error: cannot listen on 0.0.0.0:{port}")
        assert "warning: --host 0.0.0.0 without an API key: anyone who can reach this port" in err
        code, _, err = gptoss("serve", "--run", runs["demo"], "--host", "0.0.0.0", "--port", port, "--api-key", "k")
        assert code == 2 and "warning" not in err
    code, _, err = gptoss("serve", "--run", runs["demo"], "--max-body", "lots")
    assert code == 2 and err.strip() == "error: --max-body 'lots': expected a size such as 5GB, 500MB or 2GiB"


# ---- the engine: a failure inside the shared step fails only its own request ----------------------


def _engine_run(run: Path, requests: list[tuple[str, InferConfig]], patch=None) -> tuple[dict, dict]:
    """Run `requests` through one in-process Engine together; `patch(model)` may wrap its forward.
    Returns ({index: last event}, engine.counts)."""
    from gptoss_cli.run.open import load_run
    from gptoss_cli.serve.engine import Engine
    from gptoss_cli.serve.requests import Done, Failed, Request

    loaded = load_run(run, device="cpu")
    tok = loaded.tokenizer
    if patch is not None:
        patch(loaded.model)
    engine = Engine(loaded.model, tok, eos_id=tok.token_to_id(EOS), max_batch=4, max_queue=8, prefill_chunk=CHUNK)
    last: dict[int, object] = {}

    def emitter(i: int):
        return lambda event: last.__setitem__(i, event)

    engine.start()
    try:
        engine.submit([Request(tok.encode(p).ids, params, emitter(i)) for i, (p, params) in enumerate(requests)])
        deadline = time.monotonic() + 60
        while len(last) < len(requests) or not all(isinstance(e, Done | Failed) for e in last.values()):
            assert time.monotonic() < deadline, last
            time.sleep(0.01)
    finally:
        engine.stop()
    return last, engine.counts


GREEDY = InferConfig(max_new_tokens=12, temperature=0)


def test_a_request_the_engine_cannot_seed_fails_alone(runs):
    """Settings that slipped past admission (a seed torch refuses) fail that request when it joins; the
    requests decoding beside it finish with infer's text."""
    unseedable = InferConfig(max_new_tokens=12, temperature=0.8, seed=2**70)  # built without validation
    prompts = PROMPTS[5:8]
    last, counts = _engine_run(runs["demo"], [(prompts[0], GREEDY), (prompts[1], unseedable), (prompts[2], GREEDY)])
    assert type(last[1]).__name__ == "Failed" and "Overflow" in last[1].message
    for i in (0, 2):
        assert last[i].text == reference(runs["demo"], prompts[i], max_new_tokens=12, temperature=0)
    assert counts["failed"] == 1 and counts["finished"] == 2


def test_a_failing_batched_forward_fails_only_the_row_that_fails_alone(runs):
    """A forward that breaks whenever one request's next token is fed (a fault that belongs to one row) fails
    that request only: the step is run again row by row and the other rows go on to infer's text."""
    from gptoss_cli.run.open import load_run

    prompts = PROMPTS[5:8]
    tok = load_run(runs["demo"], device="cpu").tokenizer
    outputs = [tok.encode(reference(runs["demo"], p, max_new_tokens=12, temperature=0)).ids for p in prompts]
    poison = next(t for t in outputs[1][:-1] if t not in outputs[0] + outputs[2])  # fed only by request 1

    def patch(model):
        forward = model.forward

        def breaking(tokens, positions, cache=None, **kw):
            if tokens.shape[1] == 1 and (tokens == poison).any():
                raise RuntimeError("injected fault")
            return forward(tokens, positions, cache, **kw)

        model.forward = breaking

    last, counts = _engine_run(runs["demo"], [(p, GREEDY) for p in prompts], patch)
    assert type(last[1]).__name__ == "Failed" and "injected fault" in last[1].message
    for i in (0, 2):
        assert last[i].text == reference(runs["demo"], prompts[i], max_new_tokens=12, temperature=0)
    assert counts["failed"] == 1 and counts["finished"] == 2


def test_a_batched_forward_that_fails_once_loses_nothing(runs):
    """A failure only a full batch meets (as running out of memory would be) costs one step run row by row:
    every request still ends with infer's text."""
    calls = {"failed": 0}

    def patch(model):
        forward = model.forward

        def once(tokens, positions, cache=None, **kw):
            if tokens.shape == (3, 1) and not calls["failed"]:
                calls["failed"] += 1
                raise torch.OutOfMemoryError("injected: out of memory")
            return forward(tokens, positions, cache, **kw)

        model.forward = once

    prompts = PROMPTS[5:8]
    last, counts = _engine_run(runs["demo"], [(p, GREEDY) for p in prompts], patch)
    assert calls["failed"] == 1
    for i, p in enumerate(prompts):
        assert last[i].text == reference(runs["demo"], p, max_new_tokens=12, temperature=0)
    assert counts["failed"] == 0 and counts["finished"] == 3
