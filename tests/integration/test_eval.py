"""`gptoss eval` against independent references: transformers' GptOssForCausalLM on `gptoss export` of the
same run (its own forward and its own loss), a hand-computed bits per byte, and the windowing promise
(every token scored once, with at least context - stride tokens before it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gptoss_cli.config import RunConfig, TrainConfig, config_from_dict, read_yaml
from gptoss_cli.data.tokenizer import EOS, train_tokenizer
from gptoss_cli.evaluate.score import plan_windows, score_sequences
from gptoss_cli.model import ModelConfig, Transformer
from gptoss_cli.run.checkpoint import (
    load_weights,
    resolve_checkpoint,
)
from tests.conftest import save_run

VOCAB, CONTEXT = 320, 12
WORDS = (
    "gpt models are trained on text while the router sends every token to a few experts and sliding "
    "windows keep attention local so the cache stays small"
).split()
TEXTS = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(6 + i % 9)) + "." for i in range(40)]


def model_config(**over) -> ModelConfig:
    return ModelConfig(
        **(
            dict(
                num_hidden_layers=2,
                num_experts=4,
                experts_per_token=2,
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=32,
                head_dim=16,
                num_attention_heads=2,
                num_key_value_heads=1,
                sliding_window=4,
                max_context_length=64,
                initial_context_length=64,
                attention_backend="eager",
                moe_backend="loop",
            )
            | over
        )
    )


@torch.no_grad()
def randomise(model: Transformer, seed: int) -> None:
    """Weights large enough that predictions differ clearly from uniform (losses of a few nats, hits > 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith(".scale"):
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("sinks") or "bias" in name:
            p.copy_(0.3 * noise)
        elif name == "embedding.weight":
            p.copy_(0.5 * noise)
        else:
            p.copy_(0.15 * noise)


def make_run(root: Path, name: str, *, seed: int = 0, vocab: int = 300, zero: bool = False, **over) -> Path:
    """A run directory as `gptoss train` writes one: config.yaml, tokenizer.json, checkpoints/step-N."""
    torch.manual_seed(seed)
    model = Transformer(model_config(**over)).eval()
    if zero:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    else:
        randomise(model, seed)
    tok = train_tokenizer(TEXTS, vocab)
    cfg = RunConfig(model=model.config, train=TrainConfig(seq_len=CONTEXT), name=name)
    return save_run(root / name, cfg, tok, model, step=5)


def held_out(tmp_path: Path, paragraphs: list[str]) -> Path:
    path = tmp_path / "held-out.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def eval_json(gptoss, *args) -> list[dict]:
    code, out, err = gptoss("eval", *args, "--json", "--device", "cpu")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


# ---- the windows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("context,stride", [(8, 8), (8, 3), (8, 1), (5, 4), (1, 1)])
def test_windows_score_every_target_once_with_the_left_context_the_stride_allows(context, stride):
    lengths = [1, 2, 7, 8, 9, 23, 40]
    windows = plan_windows(lengths, context, stride)
    for doc, n in enumerate(lengths):
        scored = []
        for w in (w for w in windows if w.doc == doc):
            assert 0 <= w.start < w.end <= n and w.length <= context
            assert w.start + 1 <= w.first <= w.end  # every scored target is predicted inside the window
            for j in range(w.first, w.end + 1):
                left = j - w.start  # tokens of s before target j that this window sees
                assert left == j or left >= context - stride + 1, (w, j)
                scored.append(j)
        assert scored == list(range(1, n + 1))
    with pytest.raises(ValueError):
        plan_windows([5], 4, 5)


# ---- transformers as the reference ----------------------------------------------------------------


@pytest.fixture
def exported(tmp_path, gptoss, isolated_cache):
    """(run, transformers model of its export, tokenizer) for a random tiny run."""
    transformers = pytest.importorskip("transformers")
    # seed 1: the random model predicts some tokens right, so the top-1 count is checked against a non-zero
    # reference (seed 0 scores no hit with the conversation tokens in the vocabulary).
    run = make_run(tmp_path, "demo", seed=1, attention_backend="sdpa", moe_backend="auto")  # the kernels a run uses
    code, _, err = gptoss("export", "--run", run, "--out", tmp_path / "hf", "--dtype", "fp32")
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    return run, hf, tok


def _hf_per_token(hf, tok, docs: list[str], context: int) -> tuple[float, int, int]:
    """(summed loss in nats, tokens, top-1 hits): each token predicted from the up to `context` tokens before
    it in [EOS] + document, one transformers forward per token, log-softmax in float64."""
    eos = tok.convert_tokens_to_ids(EOS)
    loss, count, hits = 0.0, 0, 0
    for doc in docs:
        s = [eos, *tok(doc)["input_ids"]]
        for j in range(1, len(s)):
            ids = torch.tensor([s[max(0, j - context) : j]])
            with torch.no_grad():
                logits = hf(input_ids=ids, use_cache=False).logits[0, -1].double()
            loss -= torch.log_softmax(logits, -1)[s[j]].item()
            hits += int(logits.argmax().item() == s[j])
            count += 1
    return loss, count, hits


def test_stride_one_equals_transformers_token_by_token(exported, tmp_path, gptoss):
    run, hf, tok = exported
    docs = [TEXTS[3] + " " + TEXTS[17], "naïve café, déjà vu: ünïcödé text."]
    data = held_out(tmp_path, docs)
    [r] = eval_json(gptoss, "--run", run, "--data", data, "--stride", "1", "--batch-size", "5")
    loss, count, hits = _hf_per_token(hf, tok, docs, CONTEXT)
    assert count > 2 * CONTEXT  # long documents: many tokens are scored past the first window
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert (r["tokens"], r["bytes"], r["documents"]) == (count, n_bytes, 2)
    assert r["loss"] == pytest.approx(loss / count, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(loss / math.log(2) / n_bytes, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(loss / count), rel=1e-5)
    assert r["accuracy"] == hits / count and 0 < hits < count
    assert (r["context"], r["stride"], r["step"]) == (CONTEXT, 1, 5)


def test_short_documents_equal_transformers_own_loss(exported, tmp_path, gptoss):
    """Documents shorter than the context are one window each: transformers' `labels=` loss over [EOS] + doc."""
    run, hf, tok = exported
    eos = tok.convert_tokens_to_ids(EOS)
    docs = [TEXTS[i] for i in (0, 1, 2, 9)]
    loss, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor([[eos, *tok(doc)["input_ids"]]])
        assert ids.shape[1] - 1 <= 32
        with torch.no_grad():
            out = hf(input_ids=ids, labels=ids, use_cache=False)  # transformers shifts the labels itself
        loss += out.loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    [r] = eval_json(gptoss, "--run", run, "--data", held_out(tmp_path, docs), "--context", "32")
    assert r["tokens"] == count
    assert r["loss_sum_nats"] == pytest.approx(loss, rel=1e-5)


def test_strided_windows_equal_transformers_sliding_window_recipe(exported):
    """transformers' documented strided perplexity loop, with windows of context + 1 tokens (the inputs and
    the last target), on sequences whose last window ends on the stride, against score_sequences."""
    run, hf, _ = exported
    cfg = config_from_dict(read_yaml(run / "config.yaml"), "config.yaml")
    ours = Transformer(cfg.model).eval()
    load_weights(ours, resolve_checkpoint(run) / "model.safetensors")
    context, stride = 10, 4
    g = torch.Generator().manual_seed(7)
    sequences = [torch.randint(0, 300, (1 + context + k * stride,), generator=g).tolist() for k in (0, 1, 5)]
    ref, count = 0.0, 0
    for s in sequences:
        ids = torch.tensor([s])
        prev_end = 0
        for begin in range(0, len(s), stride):
            end = min(begin + context + 1, len(s))
            trg_len = end - prev_end
            labels = ids[:, begin:end].clone()
            labels[:, :-trg_len] = -100
            with torch.no_grad():
                out = hf(input_ids=ids[:, begin:end], labels=labels, use_cache=False)
            n = int((labels[:, 1:] != -100).sum())
            ref, count = ref + out.loss.item() * n, count + n
            prev_end = end
            if end == len(s):
                break
    totals = score_sequences(ours, sequences, context=context, stride=stride, batch_size=3)
    assert totals.tokens == count == sum(len(s) - 1 for s in sequences)
    assert totals.loss == pytest.approx(ref, rel=1e-5)


# ---- hand-computed bits per byte ------------------------------------------------------------------


def test_uniform_model_on_byte_tokens_is_log2_vocab_bits_per_byte(tmp_path, gptoss, isolated_cache):
    """All-zero weights give all-zero logits: every token costs ln(320) nats. A tokenizer with no merges
    (256 bytes + 2 specials) makes one token per byte, so bits per byte = log2(320) and ppl = 320."""
    run = make_run(tmp_path, "uniform", vocab=258, zero=True)
    text = "héllo wörld\n\nnaïve"  # 11 + 2 and 5 + 1 bytes: é, ö and ï are two bytes each
    data = tmp_path / "tiny.txt"
    data.write_text(text, encoding="utf-8")
    [r] = eval_json(gptoss, "--run", run, "--data", data)
    assert (r["documents"], r["bytes"], r["tokens"]) == (2, 19, 19)
    assert r["bits_per_byte"] == pytest.approx(math.log2(320), rel=1e-6)
    assert r["loss"] == pytest.approx(math.log(320), rel=1e-6)
    assert r["ppl"] == pytest.approx(320, rel=1e-5)


# ---- the command ----------------------------------------------------------------------------------


def test_runs_side_by_side_on_the_same_text_saved_and_deterministic(tmp_path, gptoss, isolated_cache):
    a = make_run(tmp_path, "a", seed=1)
    b = make_run(tmp_path, "b", seed=2, vocab=280)  # another tokenizer: tokens differ, bytes do not
    data = held_out(tmp_path, TEXTS[:12])
    code, out, err = gptoss(
        "eval", "--run", a, "--checkpoint", b / "checkpoints" / "step-00000005", "--data", data, "--device", "cpu"
    )
    assert code == 0, err
    assert out == ""  # the table and the progress go to stderr
    assert "a/step-00000005" in err and "b/step-00000005" in err and "bits per byte" in err
    first = eval_json(gptoss, "--run", a, "--run", b, "--data", data)
    assert [r["name"] for r in first] == ["a/step-00000005", "b/step-00000005"]
    assert first[0]["bytes"] == first[1]["bytes"] and first[0]["text_digest"] == first[1]["text_digest"]
    assert first[0]["tokens"] != first[1]["tokens"] and first[0]["loss"] != first[1]["loss"]
    again = eval_json(gptoss, "--run", a, "--run", b, "--data", data)
    keys = ("loss", "bits_per_byte", "accuracy", "tokens")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in first]
    [batch_one] = eval_json(gptoss, "--run", a, "--data", data, "--batch-size", "1")
    assert batch_one["tokens"] == first[0]["tokens"]
    assert batch_one["loss"] == pytest.approx(first[0]["loss"], rel=1e-6)
    saved = sorted((a / "eval").glob("*.json"))
    assert [p.name for p in saved] == [f"step-00000005-{first[0]['text_digest']}.json"]
    assert json.loads(saved[0].read_text())["bits_per_byte"] == batch_one["bits_per_byte"]
    assert not list((a / "eval").glob(".*"))  # written atomically: no temporary left


def test_runs_with_other_training_lengths_are_scored_with_one_window(tmp_path, gptoss, isolated_cache):
    a = make_run(tmp_path, "a", seed=1)
    b = make_run(tmp_path, "b", seed=2)
    config = b / "config.yaml"
    config.write_text(config.read_text(encoding="utf-8").replace(f"seq_len: {CONTEXT}", "seq_len: 24"), "utf-8")
    data = held_out(tmp_path, TEXTS[:12])
    code, out, err = gptoss("eval", "--run", a, "--run", b, "--data", data, "--json", "--device", "cpu")
    assert code == 0, err
    ra, rb = (json.loads(line) for line in out.splitlines())
    assert (ra["context"], ra["stride"]) == (rb["context"], rb["stride"]) == (CONTEXT, CONTEXT // 2)
    assert f"default windows differ ({CONTEXT}, 24 tokens)" in err
    [alone] = eval_json(gptoss, "--run", b, "--data", data)
    assert alone["context"] == 24  # a run scored alone keeps its own default


def test_max_tokens_cuts_the_same_text_for_every_run(tmp_path, gptoss, isolated_cache):
    a = make_run(tmp_path, "a", seed=1)
    b = make_run(tmp_path, "b", seed=2, vocab=280)
    data = held_out(tmp_path, TEXTS[:12])
    ra, rb = eval_json(gptoss, "--run", a, "--run", b, "--data", data, "--max-tokens", "50")
    assert ra["tokens"] == 50 and ra["max_tokens"] == 50
    assert rb["bytes"] == ra["bytes"] and rb["text_digest"] == ra["text_digest"]
    [full] = eval_json(gptoss, "--run", a, "--data", data)
    assert full["bytes"] > ra["bytes"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_results_are_the_same_on_cuda(tmp_path, gptoss, isolated_cache):
    run = make_run(tmp_path, "a", seed=1)
    data = held_out(tmp_path, TEXTS[:12])
    [cpu] = eval_json(gptoss, "--run", run, "--data", data)
    code, out, err = gptoss("eval", "--run", run, "--data", data, "--json", "--device", "cuda", "--dtype", "fp32")
    assert code == 0, err
    gpu = json.loads(out)
    assert gpu["tokens"] == cpu["tokens"] and gpu["device"] == "cuda"
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-4)
    assert abs(gpu["accuracy"] - cpu["accuracy"]) <= 2 / cpu["tokens"]  # a near-tie may flip


@pytest.mark.parametrize(
    "args,expect",
    [
        ((), "--data"),
        (("--data", "nowhere.txt"), "does not exist"),
        (("--data", "DATA", "--stride", "20"), "--stride 20"),
        (("--data", "DATA", "--context", "1000"), "max_context_length"),
        (("--data", "DATA", "--max-tokens", "0"), "--max-tokens"),
        (("--data", "DATA", "--run", "missing-run"), "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, gptoss, isolated_cache, args, expect):
    run = make_run(tmp_path, "a")
    data = held_out(tmp_path, TEXTS[:3])
    args = [str(data) if a == "DATA" else str(tmp_path / a) if a == "missing-run" else a for a in args]
    if "--run" not in args:
        args = ["--run", str(run), *args]
    code, out, err = gptoss("eval", *args, "--device", "cpu")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err


def test_an_unwritable_run_still_prints_the_numbers(tmp_path, gptoss, isolated_cache):
    run = make_run(tmp_path, "a")
    (run / "eval").write_text("a file where the folder would go")
    [r] = eval_json(gptoss, "--run", run, "--data", held_out(tmp_path, TEXTS[:3]))
    assert r["saved"] is None and r["tokens"] > 0


# ---- gptoss report --------------------------------------------------------------------------------


def test_report_shows_the_eval_results_as_a_table(tmp_path, gptoss, isolated_cache):
    a = make_run(tmp_path, "a", seed=1)
    data = held_out(tmp_path, TEXTS[:6])
    [r] = eval_json(gptoss, "--run", a, "--data", data)
    code, out, err = gptoss("report", "--run", a, "--json")
    assert code == 0, err
    [summary] = json.loads(out)["runs"]
    assert [e["bits_per_byte"] for e in summary["eval_results"]] == [r["bits_per_byte"]]
    text = (a / "report" / "report.md").read_text()
    assert "## Evaluation" in text
    [row] = [line for line in text.splitlines() if line.startswith("| a | step-00000005 |")]
    assert f"{r['loss']:.4f}" in row and f"{r['bits_per_byte']:.4f}" in row and f"{r['tokens']:,}" in row
    assert r["text_digest"] in row


def test_eval_and_report_stay_light_before_any_work():
    """`gptoss eval --help` must not import torch; report never imports torch at all."""
    import subprocess
    import sys

    code = (
        "import sys, gptoss_cli.commands.eval, gptoss_cli.report.summary, gptoss_cli.report.logs; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
