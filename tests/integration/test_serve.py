"""`gptoss serve` end to end: the real server in a subprocess on a free 127.0.0.1 port, spoken to with the
official `openai` client and with raw HTTP (httpx).

The runs are built here as `gptoss train` leaves them (config.yaml, tokenizer.json, a checkpoint), with
random weights whose logits are spread out (a scaled embedding), so greedy text does not hinge on near-ties
and the server's batched, chunk-prefilled tokens can be compared one for one with `gptoss infer`'s
(infer() in this process, one prompt at a time), which is the reference.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package is built on
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptoss_cli.config import InferConfig
from gptoss_cli.data.tokenizer import EOS, PAD, train_tokenizer
from tests.conftest import HAS_COMPILER, save_demo_run

openai = pytest.importorskip("openai")

LINES = [
    "GPT models are language models trained to predict the next token.",
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts layers route every token to a few experts.",
    "A sliding window keeps only the most recent keys in the cache.",
] * 3
CONTEXT = 160
WINDOW = 8  # prompts longer than this wrap the sliding layers' ring
CHUNK = 5  # --prefill-chunk: most prompts below are prefilled over several steps
PROMPTS = [  # 16 prompts of different lengths, 1 to ~40 tokens
    "GPT",
    "The quick",
    "Mixture of experts",
    "A sliding window keeps",
    "models are language models",
    "The quick brown fox jumps over the lazy dog.",
    "route every token",
    "keys in the cache",
    "GPT models are language models trained to predict the next token. The quick brown fox",
    "lazy",
    "experts layers route every token to a few experts. A sliding window keeps only",
    "predict the next",
    "the most recent keys",
    "fox jumps over",
    "A",
    "language models trained to predict",
]


def _tokenizer(chat: bool) -> Tokenizer:
    if chat:
        return train_tokenizer(LINES, 300)  # reserves the conversation tokens
    tok = Tokenizer(models.BPE())  # the same BPE without them: a run with no conversation format
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        LINES,
        trainers.BpeTrainer(
            vocab_size=300,
            min_frequency=2,
            special_tokens=[EOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return tok


def make_run(path: Path, chat: bool = True) -> Path:
    return save_demo_run(path, _tokenizer(chat), context=CONTEXT, max_new_tokens=12, window=WINDOW, name=path.name)


class Server:
    """`gptoss serve` in a subprocess on a free loopback port; stderr is kept for the request log."""

    def __init__(self, run: Path, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = run.parent / f"serve-{self.port}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTOSS_DEBUG": "0"}
        cmd = [
            sys.executable,
            "-c",
            "from gptoss_cli.cli import main; main()",
            "serve",
            "--run",
            str(run),
            "--port",
            str(self.port),
            "--device",
            "cpu",
            *args,
        ]
        if "--compile" not in args:  # compiling the decode step takes tens of seconds: one server does
            cmd.append("--no-compile")
        self._err = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._err, env=env)
        self.args = args

    def wait_ready(self) -> Server:
        args = self.args
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gptoss serve exited {self.proc.returncode}: {self.stderr()}")
            try:
                if httpx.get(self.url + "/health", headers=self.auth_header(args), timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gptoss serve did not come up: {self.stderr()}")
            time.sleep(0.1)
        return self

    @staticmethod
    def auth_header(args) -> dict[str, str]:
        args = list(args)
        return {"Authorization": f"Bearer {args[args.index('--api-key') + 1]}"} if "--api-key" in args else {}

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    return {"demo": make_run(root / "demo"), "plain": make_run(root / "plain", chat=False)}


@pytest.fixture(scope="module")
def servers(runs):
    """Both servers of this module, started together (most of a start is importing torch)."""
    # The main server decodes with the compiled step (what `serve` runs by default, when it is faster).
    compile = ["--compile"] if HAS_COMPILER else []
    main = Server(runs["demo"], "--prefill-chunk", str(CHUNK), "--max-batch", "16", "--drain-timeout", "0", *compile)
    # A run without a conversation format, one slot, a queue of one, an API key.
    guarded = Server(runs["plain"], "--max-batch", "1", "--max-queue", "1", "--api-key", "sesame")
    try:
        yield {"main": main.wait_ready(), "guarded": guarded.wait_ready()}
    finally:
        codes = main.stop(), guarded.stop()
    assert codes == (0, 0), (main.stderr(), guarded.stderr())  # SIGTERM ends both with exit 0


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def guarded(servers):
    return servers["guarded"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def completion(run: Path, prompt: str, **settings):
    """`gptoss infer`'s completion of the prompt for the same settings (one prompt, one batch row)."""
    from gptoss_cli.infer.generate import infer

    torch.set_num_threads(1)
    return infer([prompt], run=run, device="cpu", **settings).completions[0]


def reference(run: Path, prompt: str, **settings) -> str:
    """The text `gptoss infer` prints after the prompt."""
    return completion(run, prompt, **settings).text


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 16
    if HAS_COMPILER:  # the requests of this module decode through the compiled step
        assert "| decode compiled (--compile: " in server.stderr()


def test_completion_greedy_equals_infer(runs, client):
    reply = client.completions.create(model="demo", prompt=PROMPTS[5], max_tokens=20, temperature=0)
    expected = completion(runs["demo"], PROMPTS[5], max_new_tokens=20, temperature=0)
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == {"eos": "stop", "length": "length"}[expected.stop_reason]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.prompt_tokens, expected.new_tokens)


def test_sixteen_concurrent_requests_equal_infer_one_by_one(runs, server, client):
    """16 requests of different lengths and budgets, joining at different times, half of them streamed:
    each greedy text equals infer's for that prompt alone."""
    budgets = [8 + (i * 7) % 40 for i in range(len(PROMPTS))]
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            time.sleep(0.015 * i)  # join while earlier ones decode
            kwargs = dict(model="demo", prompt=PROMPTS[i], max_tokens=budgets[i], temperature=0)
            if i % 2:
                got[i] = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
            else:
                got[i] = client.completions.create(**kwargs).choices[0].text
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, prompt in enumerate(PROMPTS):
        assert got[i] == reference(runs["demo"], prompt, max_new_tokens=budgets[i], temperature=0), (i, prompt)
    assert httpx.get(server.url + "/health").json()["peak_batch"] > 1  # they really shared decode steps


def test_seeded_sampling_equals_infer(runs, client):
    settings = dict(temperature=0.9, top_p=0.9, seed=1234)
    reply = client.completions.create(
        model="demo", prompt="The quick", max_tokens=16, extra_body={"top_k": 20}, **settings
    )
    assert reply.choices[0].text == reference(runs["demo"], "The quick", max_new_tokens=16, top_k=20, **settings)


def test_stream_sse_and_usage(server, client):
    body = {"model": "demo", "prompt": "Mixture of experts", "max_tokens": 10, "temperature": 0}
    whole = client.completions.create(**body).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **body))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 0
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_stop_string_and_n(client):
    body = dict(model="demo", prompt="The quick", max_tokens=30, temperature=0)
    whole = client.completions.create(**body).choices[0].text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
    assert stop.strip()
    cut = client.completions.create(stop=[stop], **body).choices[0]
    assert cut.text == whole[: whole.find(stop)] and cut.finish_reason == "stop"
    many = client.completions.create(model="demo", prompt=["GPT", "lazy"], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy: both choices of a prompt agree


def _chat_reference(run: Path, messages: list[dict], max_tokens: int) -> str:
    """The reply generate_tokens gives for the rendered conversation, cut at the format's stop ids."""
    from gptoss_cli.data.chat_format import chat_format
    from gptoss_cli.infer.generate import generate_tokens
    from gptoss_cli.run.open import load_run

    loaded = load_run(run, device="cpu")
    fmt = chat_format(loaded.tokenizer, loaded.run.chat_template)
    ids = fmt.render(messages)
    params = InferConfig(max_new_tokens=max_tokens, temperature=0)
    out, _, _ = generate_tokens(
        loaded.model,
        [ids],
        params,
        pad_id=loaded.tokenizer.token_to_id(PAD),
        eos_id=loaded.tokenizer.token_to_id(EOS),
        on_token=lambda row, t: t in fmt.stop_ids,
    )
    return fmt.parse_reply(out[0])["content"]


def test_chat_completions(runs, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a sliding window?"}]
    reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == _chat_reference(runs["demo"], messages, 12)
    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == reply.choices[0].message.content


def test_one_failing_request_leaves_the_others_alone(runs):
    """In process, on the engine alone: a request whose own callback breaks is failed; the loop and the
    requests decoding beside it go on to infer's text."""
    from gptoss_cli.run.open import load_run
    from gptoss_cli.serve.engine import Engine
    from gptoss_cli.serve.requests import Done, Failed, Request, Token

    loaded = load_run(runs["demo"], device="cpu")
    tok = loaded.tokenizer
    engine = Engine(loaded.model, tok, eos_id=tok.token_to_id(EOS), max_batch=4, max_queue=8, prefill_chunk=CHUNK)
    events: dict[int, list] = {0: [], 1: [], 2: []}

    def emitter(i: int):
        def emit(event) -> None:
            if i == 1 and isinstance(event, Token):
                raise RuntimeError("the client callback broke")
            events[i].append(event)

        return emit

    params = InferConfig(max_new_tokens=12, temperature=0)
    prompts = PROMPTS[5:8]
    engine.start()
    try:
        engine.submit([Request(tok.encode(p).ids, params, emitter(i)) for i, p in enumerate(prompts)])
        deadline = time.monotonic() + 60
        while not all(e and isinstance(e[-1], Done | Failed) for e in events.values()):
            assert time.monotonic() < deadline, events
            time.sleep(0.01)
    finally:
        engine.stop()
    assert isinstance(events[1][-1], Failed) and "the client callback broke" in events[1][-1].message
    for i in (0, 2):
        assert isinstance(events[i][-1], Done)
        assert events[i][-1].text == reference(runs["demo"], prompts[i], max_new_tokens=12, temperature=0)
    assert engine.counts["failed"] == 1 and engine.counts["finished"] == 2


def test_command_errors_are_one_line(gptoss, runs, tmp_path):
    code, out, err = gptoss("serve", "--run", tmp_path / "nowhere")
    assert (code, out) == (2, "") and err.startswith("error: ") and "does not exist" in err
    code, _, err = gptoss("serve", "--run", runs["demo"], "--max-batch", "0")
    assert code == 2 and err.strip() == "error: --max-batch must be >= 1, got 0"
    code, _, err = gptoss("serve", "--run", runs["demo"], "--max-length", CONTEXT + 1)
    assert code == 2 and "exceeds the model's context" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, _, err = gptoss("serve", "--run", runs["demo"], "--port", busy.getsockname()[1])
    assert code == 2 and err.startswith("error: cannot listen on 127.0.0.1:")


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"model": "demo", "prompt": "x", "colour": "blue"}).encode(), "colour"),
        (json.dumps({"model": "demo", "prompt": "GPT " * CONTEXT}).encode(), "prompt"),
        (json.dumps({"model": "demo", "prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"model": "demo", "prompt": "x", "temperature": -0.5}).encode(), "temperature"),
        (json.dumps({"model": "demo", "prompt": "x", "top_p": 0}).encode(), "top_p"),
        (json.dumps({"model": "demo", "prompt": ""}).encode(), "prompt"),
        (json.dumps({"model": "demo", "prompt": [99999]}).encode(), "prompt"),
        (json.dumps({"model": "demo", "prompt": "x", "logprobs": 6}).encode(), "logprobs"),
        (json.dumps({"model": "demo", "messages": []}).encode(), "messages"),
        (json.dumps({"model": "demo", "messages": [{"role": "tool", "content": "x"}]}).encode(), "messages"),
        (json.dumps({"model": "demo", "messages": [{"role": "user", "content": ""}]}).encode(), "messages"),
        (
            json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi " * CONTEXT}]}).encode(),
            "messages",
        ),
    ],
)
def test_bad_requests_are_400_error_objects(server, body, param):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_unknown_model_and_route(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(server.url + "/v2/nothing").status_code == 404
    r = httpx.post(server.url + "/v1/responses", json={"model": "demo", "input": "x"})  # another OpenAI API
    error = r.json()["error"]
    assert r.status_code == 404 and error["code"] == "not_found"
    assert error["message"].startswith("POST /v1/responses is not served here; this server answers GET /health")
    assert "POST /v1/chat/completions" in error["message"]


def test_the_start_up_line_says_how_far_the_run_holds_a_conversation(servers):
    assert "chat format only (not fine-tuned on conversations)" in servers["main"].stderr()  # trained on text
    assert "| chat no |" in servers["guarded"].stderr()  # a tokenizer without the format's tokens


def test_disconnect_frees_the_slot(server):
    before = httpx.get(server.url + "/health").json()
    body = {"model": "demo", "prompt": "GPT", "max_tokens": CONTEXT - 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        next(r.iter_lines())  # the first event arrived: the request is decoding; then hang up
    deadline = time.monotonic() + 30
    while (health := httpx.get(server.url + "/health").json())["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.02)
    assert health["running"] == 0 and health["finished"] == before["finished"]


def test_request_log_lines(server):
    httpx.get(server.url + "/health")
    log = server.stderr()
    assert "127.0.0.1 GET /health 200" in log
    assert any(" POST /v1/completions 200 tokens " in line and line.endswith(" ms") for line in log.splitlines())
    assert "Traceback" not in log


def test_api_key(guarded):
    assert httpx.get(guarded.url + "/v1/models").status_code == 401
    assert httpx.get(guarded.url + "/health").status_code == 200  # a load balancer's check carries no key
    r = httpx.get(guarded.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    ok = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sesame", max_retries=0)
    assert ok.completions.create(model="plain", prompt="GPT", max_tokens=3, temperature=0).choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_chat_without_a_format_is_400(guarded):
    r = httpx.post(
        guarded.url + "/v1/chat/completions",
        headers={"Authorization": "Bearer sesame"},
        json={"model": "plain", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_format"


def test_full_queue_is_429_with_retry_after(guarded):
    auth = {"Authorization": "Bearer sesame"}
    body = {"model": "plain", "prompt": "GPT", "max_tokens": CONTEXT - 10, "temperature": 0}
    # Two prompts in one request can never fit a queue of one: a 400, not a retry.
    r = httpx.post(guarded.url + "/v1/completions", headers=auth, json={**body, "prompt": ["GPT", "lazy"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # Eight at once against one slot and one queue place: the ones that find the queue full get 429.
    answers: list = []
    start = threading.Barrier(8)

    def one() -> None:
        start.wait()
        answers.append(httpx.post(guarded.url + "/v1/completions", headers=auth, json=body, timeout=60))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = [r.status_code for r in answers]
    assert len(statuses) == 8 and 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses
    for r in answers:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
    again = httpx.post(guarded.url + "/v1/completions", headers=auth, json=body)  # idle again: accepted
    assert again.status_code == 200


def test_sigterm_drains_in_flight_requests_and_exits_0(guarded):
    """Last in this module: it ends the guarded server."""
    auth = {"Authorization": "Bearer sesame"}
    body = {"model": "plain", "prompt": "GPT", "max_tokens": CONTEXT - 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", guarded.url + "/v1/completions", json=body, headers=auth, timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        guarded.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    events = [json.loads(x[6:]) for x in [first, *rest] if x.startswith("data: {")]
    assert rest[-1] == "data: [DONE]"
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")  # it finished, not cut off
    assert guarded.proc.wait(60) == 0, guarded.stderr()
    with pytest.raises(httpx.TransportError):  # no longer listening
        httpx.get(guarded.url + "/health", timeout=2)


def test_sigterm_past_the_drain_limit_answers_with_an_error_and_exits_0(server):
    """Last in this module: it ends the main server, whose --drain-timeout is 0."""
    body = {"model": "demo", "prompt": "GPT", "max_tokens": CONTEXT - 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["error"]["code"] == "shutting_down"
    assert server.proc.wait(60) == 0, server.stderr()


def test_health_can_be_made_to_need_the_key_too():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from gptoss_cli.serve.middleware import Auth

    inner = Starlette(routes=[Route("/health", lambda request: PlainTextResponse("ok"))])
    open_health, closed = TestClient(Auth(inner, "k")), TestClient(Auth(inner, "k", health_needs_key=True))
    assert open_health.get("/health").status_code == 200
    assert closed.get("/health").status_code == 401
    assert closed.get("/health", headers={"Authorization": "Bearer k"}).status_code == 200
