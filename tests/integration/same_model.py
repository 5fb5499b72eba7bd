"""Checks that two runs compute the same model through every command: a packed run against its decoded
twin, a LoRA run against its merged export. Each helper runs one command on both and compares."""

from __future__ import annotations

import io
import json
from pathlib import Path

from gptoss_cli.chat.open import open_chat
from gptoss_cli.chat.session import run_chat
from gptoss_cli.infer.generate import infer
from tests.integration.test_serve import LINES, Server


def assert_same_greedy_tokens(run: Path, reference: Path, prompts: list[str]) -> None:
    """Greedy decoding through the KV cache gives the same tokens on both, prompt by prompt; a bf16 batch
    on `run` generates too."""
    for prompt in prompts:
        got = infer([prompt], run=run, device="cpu", temperature=0.0).completions[0]
        ref = infer([prompt], run=reference, device="cpu", temperature=0.0).completions[0]
        assert got.token_ids == ref.token_ids and got.new_tokens > 0
    batch = infer(prompts, run=run, device="cpu", temperature=0.0, dtype="bf16")
    assert all(c.new_tokens > 0 for c in batch.completions)


def assert_same_chat(run: Path, reference: Path) -> None:
    """Two greedy chat turns give the same replies on both."""
    replies = []
    for path in (run, reference):
        out = io.StringIO()
        session = open_chat(run=path, device="cpu", temperature=0.0, max_new_tokens=8)
        assert run_chat(session, stdin=io.StringIO("Hello!\nWhat is a token?\n"), stdout=out, say=lambda _: None) == 0
        replies.append(out.getvalue())
    assert replies[0] == replies[1] and len(replies[0].splitlines()) == 2


def eval_results(gptoss, runs: dict[str, Path], tmp_path: Path, *args) -> dict[str, dict]:
    """`gptoss eval --json` on held-out text (the serve tests' lines) for each named run: its first line."""
    text = tmp_path / "held-out.txt"
    text.write_text("\n\n".join(LINES) + "\n", encoding="utf-8")
    results = {}
    for name, path in runs.items():
        code, out, err = gptoss("eval", "--run", path, "--data", text, "--device", "cpu", "--json", *args)
        assert code == 0, err
        results[name] = json.loads(out.splitlines()[0])
    return results


def assert_serves_as_infer(run: Path, name: str, reference: Path, prompts: list[str]) -> None:
    """A server on `run` answers each prompt (8 greedy tokens) as `gptoss infer` does on `reference`."""
    import openai

    server = Server(run).wait_ready()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for prompt in prompts:
            answer = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
            expected = infer([prompt], run=reference, device="cpu", temperature=0.0, max_new_tokens=8)
            assert answer.choices[0].text == expected.completions[0].text
    finally:
        assert server.stop() == 0, server.stderr()
