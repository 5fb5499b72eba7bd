"""`gptoss infer` end to end on a tiny run built here (random weights, a BPE tokenizer trained on a few lines).

The command goes through the real error boundary, `cli.main`, with a Typer app holding only `infer`, so
exit codes and the one-line `error: ...` are what a user sees. The greedy text is checked against a
cache-free argmax loop over the checkpoint's weights, decoded by the tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from gptoss_cli.data.tokenizer import load_tokenizer, train_tokenizer
from gptoss_cli.model import Transformer
from gptoss_cli.run.checkpoint import load_weights
from tests.conftest import save_demo_run

LINES = [
    "GPT models are language models trained to predict the next token.",
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts layers route every token to a few experts.",
    "A sliding window keeps only the most recent keys in the cache.",
] * 3
PROMPT = "GPT models are"
CONTEXT = 64
STEP_DIR = "checkpoints/step-00000010"


def make_run(path: Path, lines: list[str] = LINES, vocab_size: int = 320) -> Path:
    """A run directory as `gptoss train` leaves it: config.yaml, tokenizer.json, one checkpoint."""
    tok = train_tokenizer(lines, 300)
    return save_demo_run(path, tok, context=CONTEXT, max_new_tokens=8, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "demo")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: extra OpenMP threads only contend on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gptoss(gptoss):
    """`gptoss infer ARGS` through cli.main (the conftest fixture runs any command)."""
    return lambda *args: gptoss("infer", *args)


def loaded_model(run: Path) -> Transformer:
    from gptoss_cli.config import config_from_dict, read_yaml

    model = Transformer(config_from_dict(read_yaml(run / "config.yaml")).model).eval()
    load_weights(model, run / STEP_DIR / "model.safetensors")
    return model


@torch.no_grad()
def reference_greedy_ids(run: Path, prompt: str, n: int) -> list[int]:
    """Cache-free greedy decoding over the checkpoint's weights: argmax of a full forward per token."""
    tok = load_tokenizer(run / "tokenizer.json")
    model = loaded_model(run)
    ids = tok.encode(prompt).ids
    new = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt == tok.token_to_id("<|endoftext|>"):
            break
        new.append(nxt)
    return new


def reference_greedy(run: Path, prompt: str, n: int) -> str:
    return load_tokenizer(run / "tokenizer.json").decode(reference_greedy_ids(run, prompt, n))


def gptoss_cli_export(run: Path, out: Path) -> tuple[int, str, str]:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_cli", "export", "--run", str(run), "--out", str(out), "--dtype", "fp32"],
        capture_output=True,
        text=True,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_greedy_text_streams_to_stdout_and_summary_to_stderr(gptoss, demo):
    code, out, err = gptoss(PROMPT, "-n", 12, "--run", demo, "--temperature", 0)
    assert code == 0, err
    assert out == PROMPT + reference_greedy(demo, PROMPT, 12) + "\n"
    assert len(out) > len(PROMPT) + 5
    summary = err.strip().splitlines()[-1]
    n_prompt = len(load_tokenizer(demo / "tokenizer.json").encode(PROMPT).ids)
    fields = (
        f"prompt tokens {n_prompt} |",
        "new tokens 12",
        "prefill",
        "tokens/s",
        "peak memory",
        "step-00000010 on cpu fp32",
    )
    for field in fields:
        assert field in summary


def test_bf16_keeps_norms_and_router_fp32_and_the_tie(gptoss, demo):
    from gptoss_cli.run.open import load_run

    loaded = load_run(demo, dtype="bf16", device="cpu")
    dtypes = {name: p.dtype for name, p in loaded.model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if n.endswith((".scale", "mlp.gate.weight")))
    assert dtypes["block.0.attn.qkv.weight"] == dtypes["embedding.weight"] == torch.bfloat16
    assert loaded.model.unembedding.weight is loaded.model.embedding.weight
    code, out, err = gptoss(PROMPT, "-n", 5, "--run", demo, "--dtype", "bf16", "--temperature", 0)
    assert code == 0 and out.startswith(PROMPT) and "on cpu bf16" in err, err


def test_seed_spellings_and_seed_reproducibility(gptoss, demo):
    args = ("--prompt", PROMPT, "--max-tokens", 10, "--model", demo / STEP_DIR, "--temperature", 1.0)
    first = gptoss(*args, "--seed", 7)
    again = gptoss(*args, "--seed", 7)
    other = gptoss(*args, "--seed", 8)
    assert first[0] == again[0] == other[0] == 0
    assert first[1] == again[1] and first[1] != other[1]
    assert first[1].startswith(PROMPT)


def test_default_run_is_the_newest_under_runs(gptoss, demo, tmp_path, monkeypatch):
    old = shutil.copytree(demo, tmp_path / "runs" / "old")
    new = shutil.copytree(demo, tmp_path / "runs" / "new")
    for run in (old, new):
        (run / "inference-memory.jsonl").unlink(missing_ok=True)  # copied from demo, which other tests use
    os.utime(old, (1, 1))  # make `old` clearly older
    monkeypatch.chdir(tmp_path)
    code, out, err = gptoss(PROMPT, "-n", 3)
    assert code == 0, err
    assert (new / "inference-memory.jsonl").is_file() and not (old / "inference-memory.jsonl").exists()


def test_default_run_skips_one_still_training_and_says_which_it_used(gptoss, demo, tmp_path, monkeypatch):
    from gptoss_cli.run.layout import RunDir
    from gptoss_cli.run.lock import RunLock

    old = shutil.copytree(demo, tmp_path / "runs" / "old")
    new = shutil.copytree(demo, tmp_path / "runs" / "new")
    os.utime(old, (1, 1))
    monkeypatch.chdir(tmp_path)
    with RunLock(RunDir(new)):  # a trainer holds the newer run
        code, out, err = gptoss(PROMPT, "-n", 3)
    assert code == 0, err
    assert f"using the newest run, {Path('runs') / 'old'} ({Path('runs') / 'new'} is still training)" in err
    code, out, err = gptoss(PROMPT, "-n", 3)  # nobody trains it now: the newest again
    assert code == 0 and f"using the newest run, {Path('runs') / 'new'}\n" in err, err


def test_a_hugging_face_directory_is_pointed_to_import(gptoss, demo, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}", encoding="utf-8")
    (hf / "model.safetensors").write_bytes(b"")
    for flag in ("--checkpoint", "--run"):
        code, out, err = gptoss(PROMPT, flag, hf)
        assert code == 2 and err.count("\n") == 1, err
        assert "is a Hugging Face model directory" in err and f"gptoss import {hf} --run" in err


def test_a_run_with_a_conversation_format_stops_at_the_end_of_a_turn_as_transformers_does(gptoss, tmp_path):
    """A run whose greedy continuation is an end-of-turn id: infer stops there, as transformers' generate()
    does on the export (its generation_config lists that id beside EOS); before, infer wrote past it."""
    import transformers
    from safetensors.torch import save_file

    from gptoss_cli.data.chat_format import END
    from gptoss_cli.run.checkpoint import weights_state_dict

    run = make_run(tmp_path / "chatty")
    tok = load_tokenizer(run / "tokenizer.json")
    model, prompt = loaded_model(run), tok.encode(PROMPT).ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
        first, end = int(logits.argmax()), tok.token_to_id(END)
        assert logits[first] > 1  # doubling its unembedding row makes the end id win by a margin
        model.unembedding.weight[end] = 2 * model.unembedding.weight[first]  # tied: the end id is no input
    save_file(weights_state_dict(model), str(run / STEP_DIR / "model.safetensors"))
    code, out, err = gptoss(PROMPT, "-n", 8, "--run", run, "--temperature", 0, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["stop_reason"] == "eos" and record["new_tokens"] == 0 and record["completion"] == ""
    code, _, err = gptoss_cli_export(run, tmp_path / "hf")
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    generated = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :]
    assert generated.tolist() == [end]  # transformers stops at the same place (and keeps the id)


def test_inference_memory_is_recorded_for_report(gptoss, demo, tmp_path):
    run = shutil.copytree(demo, tmp_path / "run")
    code, _, err = gptoss(PROMPT, "-n", 20, "--run", run, "--temperature", 0)
    assert code == 0, err
    records = [json.loads(line) for line in (run / "inference-memory.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in records} == {"infer"}
    assert records[0]["event"] == "prefill" and records[0]["tokens"] == 0
    assert records[-1]["tokens"] == 20 and records[-1]["rss_bytes"] > 0
    assert len(records) >= 3  # prefill, every 16 decode steps, the end


def test_prompts_file_batch_matches_single_prompts_as_json(gptoss, demo, tmp_path):
    prompts = ["GPT models are", "The quick brown fox jumps over the", "A sliding"]
    path = tmp_path / "prompts.txt"
    path.write_text(prompts[0] + "\n\n" + "\n".join(prompts[1:]) + "\n")
    code, out, err = gptoss("--prompts-file", path, "-n", 6, "--run", demo, "--temperature", 0, "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts  # the blank line is skipped
    for r in rows:
        assert r["completion"] == reference_greedy(demo, r["prompt"], 6)
        assert r["stop_reason"] in ("length", "eos") and r["prompt_tokens"] > 0
    assert "batch 3" in err


def test_stop_string_ends_the_text_before_it(gptoss, demo):
    full = reference_greedy(demo, PROMPT, 12)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    code, out, err = gptoss(PROMPT, "-n", 12, "--run", demo, "--temperature", 0, "--stop", stop)
    assert code == 0, err
    assert out == PROMPT + full[: full.index(stop)] + "\n"


def test_context_limit_stops_with_a_message(gptoss, demo):
    tok = load_tokenizer(demo / "tokenizer.json")
    words = " ".join(LINES).split()
    prompt = " ".join(words[: next(i for i in range(len(words)) if len(tok.encode(" ".join(words[:i])).ids) > 56)])
    n = len(tok.encode(prompt).ids)
    code, out, err = gptoss(prompt, "-n", 30, "--run", demo, "--temperature", 0)
    assert code == 0, err
    assert "context length" in err and f"new tokens {CONTEXT - n}" in err


def bad_runs(demo: Path, tmp: Path) -> dict[str, Path]:
    other_tok = shutil.copytree(demo, tmp / "other-tok")
    train_tokenizer(["completely different text, other merges " * 5] * 4, 300).save(str(other_tok / "tokenizer.json"))
    corrupt = shutil.copytree(demo, tmp / "corrupt")
    (corrupt / STEP_DIR / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    bad_state = shutil.copytree(demo, tmp / "bad-state")
    (bad_state / STEP_DIR / "state.json").write_text("{not json")
    return {
        "other-tok": other_tok,
        "corrupt": corrupt,
        "bad-state": bad_state,
        "small-vocab": make_run(tmp / "small-vocab", vocab_size=260),
    }


BAD = {
    "no run under ./runs": ((PROMPT,), "no run found under"),
    "missing --run": ((PROMPT, "--run", "{tmp}/nowhere"), "does not exist"),
    "tokenizer hash differs": ((PROMPT, "--run", "{other-tok}"), "is not the tokenizer"),
    "tokenizer larger than vocab": ((PROMPT, "--run", "{small-vocab}"), "model.vocab_size is 260"),
    "corrupt weights": ((PROMPT, "--run", "{corrupt}"), "cannot read weights"),
    "corrupt state.json": ((PROMPT, "--checkpoint", "{bad-state}/" + STEP_DIR), "corrupt checkpoint"),
    "empty prompt": (("", "--run", "{demo}"), "empty prompt"),
    "no prompt": (("--run", "{demo}"), "no prompt"),
    "-n 0": ((PROMPT, "-n", "0", "--run", "{demo}"), "must be > 0"),
    "-n negative": ((PROMPT, "-n", "-3", "--run", "{demo}"), "must be > 0"),
    "bad top-p": ((PROMPT, "--top-p", "0", "--run", "{demo}"), "--top-p"),
    "prompt longer than the context": ((" ".join(LINES), "--run", "{demo}"), "context"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(gptoss, demo, tmp_path, monkeypatch, case):
    args, message = BAD[case]
    paths = {"demo": demo, "tmp": tmp_path} | (bad_runs(demo, tmp_path) if "{" in "".join(args[1:]) else {})
    monkeypatch.chdir(tmp_path)  # no ./runs here
    code, out, err = gptoss(*(a.format(**paths) for a in args))
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert out == ""
