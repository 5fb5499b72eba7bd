"""The GGUF export run by llama.cpp itself: the same token ids for a varied text, the same greedy tokens.

Skipped without llama.cpp (GPTOSS_LLAMA_CPP names the directory holding llama-simple, llama-tokenize and
llama-bench, or they are on PATH; docs/development.md says how to build them). The functions that drive
llama.cpp live once, in benchmarks/llama_cpp.py, which also times both decoders.

- Tokenization: llama-tokenize on the exported file against `tokenizers` on tokenizer.json, for a tokenizer
  trained by gptoss (pre-tokenizer gpt-4o) and one split the way earlier gptoss versions split (gpt-2), on
  code, digits, contractions, whitespace runs, CRLF and text in many scripts.
- Greedy decoding: llama-simple (greedy) against gptoss's decode core on fp32 exports of random models in
  both layouts (untied with every bias; tied with none), several prompts. The texts must agree token by
  token; a divergence passes only at a near-tie of gptoss's choice there (its two best logits, or a router's
  k-th and (k+1)-th experts: fp32 sums in another order can flip it), and most tokens must agree.
- bf16, fp16 and MXFP4 exports load, decode and benchmark (their numbers differ from fp32 by design).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from gptoss_cli.config import RunConfig, TrainConfig
from gptoss_cli.data.corpus import load_documents
from gptoss_cli.data.tokenizer import SPECIAL_TOKENS, train_tokenizer
from gptoss_cli.interop.gguf_export import export_gguf
from gptoss_cli.model import Transformer
from gptoss_cli.run.open import load_run
from tests.conftest import randomise, save_run, tiny_model_config

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "llama_cpp.py"


def _bench():
    """benchmarks/llama_cpp.py as a module (benchmarks/ is scripts, not a package; its dataclasses need it
    registered)."""
    spec = importlib.util.spec_from_file_location("llama_cpp_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _bench()
BIN = bench.find_llama_cpp()
pytestmark = [
    pytest.mark.skipif(BIN is None, reason="llama.cpp not found (GPTOSS_LLAMA_CPP or PATH; docs/development.md)"),
    pytest.mark.usefixtures("torch_one_thread"),
]

VARIED = (
    'def fibonacci(n: int) -> list[int]:\n    """The first n numbers."""\n    a, b = 0, 1\n'
    "    for _ in range(n):\n\tyield a; a, b = b, a + b  # 1234567890 3.14159 1,000,000 0x1F\r\n"
    "He said: \"I'm sure they'll come, won't they?\" YES'LL WE'D camelCaseName HTTPServer snake_case\n\n\n"
    "Ünïcödé façade naïve Ångström — “quotes” … €100 ½ x² ① aÅb ÀbC ǅemal ʰa cafe\u0301 Vie\u0323\u0302t\n"
    "日本語の文章と中文字符 한국어 텍스트 مرحبا שלום नमस्ते สวัสดี Ελληνικά Русский ١٢٣٤٥ １２３\n"
    "emoji 😀🚀 family 👨\u200d👩\u200d👧 flag 🇩🇪 zero\u200bwidth\u2028line\u0085nel\u3000ideo\n"
    "tabs\tand\t\ttabs   spaces     runs   \n\t \tmixed \t\n\x1c\x1d sep\x0b\x0cvt \u00a0nbsp trailing   "
)


@pytest.fixture(scope="module")
def tokenizers():
    """A gptoss tokenizer and an earlier version's (the GPT-2 split), trained on text like VARIED."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = load_documents([]) + [VARIED] * 4
    old = Tokenizer(models.BPE())
    old.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    old.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    old.train_from_iterator(texts, trainer=trainer)
    return {"gpt-4o": train_tokenizer(texts, 700), "gpt-2": old}


def export_model(tmp: Path, tok, layout: str, dtype: str = "fp32", quantize: str | None = None) -> tuple[Path, Path]:
    """A random model whose logits are spread out (large embeddings), saved as a run and exported."""
    cfg = tiny_model_config(
        layout, vocab_size=704, max_context_length=256, rope_scaling_factor=1.0, initial_context_length=256
    )
    model = Transformer(cfg)
    with torch.no_grad():
        randomise(model, seed=3)
        model.embedding.weight.mul_(8)
        if not cfg.tie_word_embeddings:
            model.unembedding.weight.mul_(8)
    run = save_run(tmp / f"run-{layout}", RunConfig(model=cfg, train=TrainConfig(seq_len=64)), tok, model, step=1)
    gguf = tmp / f"{layout}-{dtype}{quantize or ''}.gguf"
    export_gguf(run, gguf, dtype=dtype, quantize=quantize)
    return run, gguf


@pytest.mark.parametrize("pre", ["gpt-4o", "gpt-2"])
def test_llama_cpp_tokenizes_as_gptoss(tokenizers, tmp_path, pre):
    tok = tokenizers[pre]
    _, gguf = export_model(tmp_path, tok, "compact")
    for text in (VARIED, VARIED.upper(), "<|start|>user<|message|>Hi 42<|end|>", " leading", "x" * 300):
        assert bench.llama_tokenize(BIN, gguf, text) == tok.encode(text).ids, text[:40]


PROMPTS = ("GPT models are", "def f(x):\n    return", "Ünïcödé 1234567 — ")


@pytest.mark.parametrize("layout", ["released", "compact"])
def test_llama_cpp_greedy_equals_gptoss_greedy(tokenizers, tmp_path, layout):
    run, gguf = export_model(tmp_path, tokenizers["gpt-4o"], layout)
    loaded = load_run(run, device="cpu", dtype="fp32")
    agreed = compared = 0
    for prompt in PROMPTS:
        ours = bench.gptoss_complete(loaded, prompt, 96, keep_margins=True)
        theirs = bench.llama_greedy(BIN, gguf, prompt, 96)
        match = bench.compare_greedy(loaded.tokenizer, ours, theirs)
        assert match.near_tie in (None, True), (prompt, match, ours.ids[: match.agreed + 2], theirs[:200])
        agreed, compared = agreed + match.agreed, compared + match.tokens
    assert compared >= 200 and agreed >= 0.75 * compared, (agreed, compared)


@pytest.mark.parametrize(("dtype", "quantize"), [("bf16", None), ("fp16", None), ("bf16", "mxfp4")])
def test_llama_cpp_runs_every_export_dtype(tokenizers, tmp_path, dtype, quantize):
    _, gguf = export_model(tmp_path, tokenizers["gpt-4o"], "released", dtype, quantize)
    assert bench.llama_greedy(BIN, gguf, PROMPTS[0], 16)
    assert bench.llama_decode_speed(BIN, gguf, 8, threads=1, depth=4) > 0
