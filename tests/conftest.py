"""Shared fixtures for the training, data, CLI and config tests: a very small model config, an isolated
token cache, a small text corpus, and single-threaded torch for the tiny shapes used here.

Fixture names are specific (small_cfg, isolated_cache, ...) because other test modules share this folder.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gptoss_cli import cli

# A model of a few thousand parameters that trains a step in milliseconds on one CPU thread.
SMALL_OVERRIDES = [
    "model.num_hidden_layers=2", "model.hidden_size=32", "model.head_dim=16", "model.num_attention_heads=2",
    "model.num_key_value_heads=1", "model.intermediate_size=32", "model.num_experts=4", "model.experts_per_token=2",
    "model.vocab_size=320", "model.sliding_window=8", "model.moe_backend=loop",
    "train.batch_size=4", "train.seq_len=16", "train.max_steps=6", "train.log_every=1", "train.eval_every=3",
    "train.save_every=3", "train.warmup_steps=2", "train.device=cpu",
]

_WORDS = ("model expert router token layer window attention sink norm gate cache batch epoch step loss "
          "weight bias scale rotary sequence").split()


@pytest.fixture(scope="session")
def small_overrides() -> list[str]:
    """The `--set` overrides behind small_cfg, for tests that go through the CLI."""
    return list(SMALL_OVERRIDES)


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """GPTOSS_CACHE under tmp_path: the token cache never touches the home directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPTOSS_CACHE", str(cache))
    return cache


@pytest.fixture
def small_cfg(isolated_cache: Path) -> Callable[..., object]:
    """small_cfg(*overrides) -> the tiny config shrunk by SMALL_OVERRIDES, then `overrides` applied."""
    from gptoss_cli.config import load_config

    def make(*overrides: str):
        return load_config("tiny", [*SMALL_OVERRIDES, *overrides])

    return make


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """A .txt corpus of 14 short paragraphs: ~400 tokens, 6 batches of 4 x 16 tokens at vocab 320."""
    paragraphs = []
    for i in range(14):
        words = [_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(9 + i % 4)]
        paragraphs.append(f"Paragraph {i}: " + " ".join(words) + ".")
    path = tmp_path / "corpus" / "small.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def torch_one_thread():
    """One intra-op thread: the shapes are tiny and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gptoss(monkeypatch, capsys):
    """`gptoss ARGS` through cli.main in this process -> (exit code, stdout, stderr)."""
    monkeypatch.delenv("GPTOSS_DEBUG", raising=False)

    def call(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["gptoss", *map(str, args)])
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return call
