"""What every test shares, defined once: the tiny run config (SMALL_OVERRIDES, small_cfg) and the tiny
model config of the transformers comparisons (tiny_model_config), randomised weights (randomise), the float
comparison (assert_close, rtol_for), an isolated token cache, a small text corpus, single-threaded torch,
the in-process CLI, this process's mappings of a file (file_mapping, mapped_from), and the hook that skips
`gpu`-marked tests on a machine without CUDA.

Test modules import the helpers as `from tests.conftest import ...` (tests/ is a package, so test files in
different folders may share a basename). Fixture names are specific (small_cfg, isolated_cache, ...).
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gptoss_cli import cli

# ---- float comparisons ----------------------------------------------------------------------------
# The rule for every float comparison in this suite: a result computed in a finite precision is compared to
# its reference as max|got - ref| <= atol + rtol * max|ref|, so the bound grows with the size of the values
# compared (an absolute 1e-5 is 80 ulps at magnitude 1 but under 3 ulps at magnitude 37, where a different
# but equally correct summation order, e.g. AVX2 against AVX-512 kernels, already exceeds it). rtol comes
# from the dtype and the computation, never from a machine: rounding one sum of n terms in a dtype of
# machine epsilon eps errs by about eps * sqrt(n) relative to its terms (random-walk accumulation), a
# computation of k chained such reductions (norm, projections, softmax, ...; a backward pass counts double)
# by k times that, and a factor 4 covers the tail over the elements compared: rtol_for(dtype, n, k) =
# 4 * k * sqrt(n) * eps. A float64 reference (or a float64 run of both sides) makes that the error of the
# lower-precision side alone. atol is a small absolute term only where the reference can be ~0. Where values
# span orders of magnitude (frequencies, exponentials) the comparison is per element (elementwise=True).
# Checks that two results must DIFFER (a wrong formula gives "> 1e-2") are lower bounds, not rounding
# bounds, and stay as written.


# torch.compile on a CPU builds C++: the tests that really compile skip without a compiler
HAS_COMPILER = any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def rtol_for(dtype: torch.dtype, reduction: int = 1, stages: int = 1) -> float:
    """Relative rounding budget of `stages` chained reductions of length `reduction` in `dtype`."""
    return 4 * stages * math.sqrt(reduction) * torch.finfo(dtype).eps


def assert_close(
    got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float = 0.0, *, elementwise: bool = False, what: str = ""
) -> None:
    """max|got - ref| <= atol + rtol * max|ref| (or |got - ref| <= atol + rtol * |ref| per element), in
    float64; the message gives the error, the reference's magnitude and the bound."""
    got, ref = torch.as_tensor(got), torch.as_tensor(ref)
    assert got.shape == ref.shape, f"{what} shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.detach().double() - ref.detach().double()).abs()
    magnitude = ref.detach().double().abs()
    if elementwise:
        excess = err - (atol + rtol * magnitude)
        worst = int(excess.flatten().argmax()) if excess.numel() else 0
        assert excess.numel() == 0 or excess.max().item() <= 0, (
            f"{what} error {err.flatten()[worst].item():.3g} at an element of magnitude "
            f"{magnitude.flatten()[worst].item():.3g} > {atol:.3g} + {rtol:.3g} * |ref| "
            f"(max error {err.max().item():.3g})"
        )
        return
    max_err = err.max().item() if err.numel() else 0.0
    max_ref = magnitude.max().item() if magnitude.numel() else 0.0
    bound = atol + rtol * max_ref
    assert max_err <= bound, (
        f"{what} max|got - ref| = {max_err:.3g} > {atol:.3g} + {rtol:.3g} * max|ref| "
        f"= {bound:.3g} (max|ref| = {max_ref:.3g}, "
        f"relative error {max_err / max(max_ref, 1e-300):.3g})"
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| in float64: for the checks that two results must differ."""
    return (a.detach().double() - b.detach().double()).abs().max().item()


# ---- randomised weights and the tiny model ---------------------------------------------------------


@torch.no_grad()
def randomise(
    module: torch.nn.Module, seed: int = 0, *, std: float = 0.08, bias_std: float = 0.3, mlp1_std: float = 0.4
) -> None:
    """Every parameter random and non-zero, one normal draw per parameter in named_parameters order: norm
    scales 1 + 0.2 N, sinks N (spread, so they matter), biases bias_std N, the expert up-projections
    mlp1_std N (large enough that the SwiGLU clamp at 7 fires), everything else std N. Our names and
    transformers' (layernorm.weight, gate_up_proj) both. The scales differ per test module on purpose: each
    picks them so its clamp and sink checks fire while its logits stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith((".scale", "layernorm.weight", "norm.weight")):
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("sinks"):
            p.copy_(noise)
        elif "bias" in name:
            p.copy_(bias_std * noise)
        elif name.endswith(("mlp1_weight", "gate_up_proj")):
            p.copy_(mlp1_std * noise)
        else:
            p.copy_(std * noise)


# The two layouts the transformers comparisons cover.
TINY_LAYOUTS = {
    # The released checkpoints' layout: untied, qkv/out/router biases, YaRN (factor 4 over L0 = 512).
    "released": dict(
        tie_word_embeddings=False,
        attention_bias=True,
        router_bias=True,
        rope_theta=150000.0,
        rope_scaling_factor=4.0,
        initial_context_length=512,
    ),
    # The compact reference layout: tied embeddings, no qkv/out/router bias, plain RoPE.
    "compact": dict(
        tie_word_embeddings=True,
        attention_bias=False,
        router_bias=False,
        rope_theta=10000.0,
        rope_scaling_factor=1.0,
        initial_context_length=4096,
    ),
}


def tiny_model_config(layout: str = "released", **overrides):
    """A 4-layer model (hidden 64, 4 experts top-2, window 8) in one of TINY_LAYOUTS, then `overrides`."""
    from gptoss_cli.model import ModelConfig

    return ModelConfig(
        **(
            dict(
                num_hidden_layers=4,
                num_experts=4,
                experts_per_token=2,
                vocab_size=256,
                hidden_size=64,
                intermediate_size=32,
                head_dim=16,
                num_attention_heads=4,
                num_key_value_heads=2,
                sliding_window=8,
                max_context_length=64,
                attention_backend="eager",
                moe_backend="loop",
            )
            | TINY_LAYOUTS[layout]
            | overrides
        )
    )


# ---- this process's mappings of a file (Linux /proc) -------------------------------------------------------
HAS_SMAPS = Path("/proc/self/smaps").is_file()


def file_mapping(path: Path) -> dict[str, int]:
    """This process's mappings of `path`, summed from /proc/self/smaps: `mappings`, the `kb` mapped, the
    `rss_kb` resident and the `anonymous_kb` that were written (a private mapping's page turns anonymous
    when it is written: copy-on-write), plus the address `ranges`."""
    target = str(Path(path).resolve())
    out: dict = {"mappings": 0, "kb": 0, "rss_kb": 0, "anonymous_kb": 0, "ranges": []}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:  # a mapping's first line: "start-end perms offset dev inode path"
            inside = len(head) >= 6 and " ".join(head[5:]) == target
            if inside:
                start, end = (int(x, 16) for x in head[0].split("-"))
                out["mappings"] += 1
                out["ranges"].append((start, end))
        elif inside and head[0] in ("Size:", "Rss:", "Anonymous:"):
            out[{"Size:": "kb", "Rss:": "rss_kb", "Anonymous:": "anonymous_kb"}[head[0]]] += int(head[1])
    return out


def mapped_from(path: Path, tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s memory lies in a mapping of the file `path`."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(lo <= start and end <= hi for lo, hi in file_mapping(path)["ranges"])


# ---- GPU tests ---------------------------------------------------------------------------------------


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests are skipped, with the reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- the tiny run ------------------------------------------------------------------------------------

# A model of a few thousand parameters that trains a step in milliseconds on one CPU thread.
SMALL_OVERRIDES = [
    "model.num_hidden_layers=2",
    "model.hidden_size=32",
    "model.head_dim=16",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=1",
    "model.intermediate_size=32",
    "model.num_experts=4",
    "model.experts_per_token=2",
    "model.vocab_size=320",
    "model.sliding_window=8",
    "model.moe_backend=loop",
    "train.batch_size=4",
    "train.seq_len=16",
    "train.max_steps=6",
    "train.log_every=1",
    "train.eval_every=3",
    "train.save_every=3",
    "train.warmup_steps=2",
    "train.device=cpu",
]

_WORDS = (
    "model expert router token layer window attention sink norm gate cache batch epoch step loss "
    "weight bias scale rotary sequence"
).split()


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


@pytest.fixture(scope="session")
def builtin_tok():
    """A 400-token BPE tokenizer trained on the built-in corpus (once per session)."""
    from gptoss_cli.data.corpus import load_documents
    from gptoss_cli.data.tokenizer import train_tokenizer

    return train_tokenizer(load_documents([]), 400)


@pytest.fixture(scope="module")
def torch_one_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("torch_one_thread")`
    or a test's argument): the shapes are tiny, and a second OpenMP thread only adds contention on a shared
    machine (10x slower on two cores)."""
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


def save_run(path: Path, cfg, tok, model: torch.nn.Module, step: int) -> Path:
    """A run directory as `gptoss train` leaves it: config.yaml, tokenizer.json and one checkpoint of `model`
    at `step` (tests build the model and tokenizer they need, then write them the one way a run is laid out)."""
    from gptoss_cli.config import save_config
    from gptoss_cli.data.tokenizer import tokenizer_hash
    from gptoss_cli.run.checkpoint import CheckpointState, save_checkpoint, weights_state_dict
    from gptoss_cli.run.layout import RunDir

    run = RunDir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.config)
    run.tokenizer.write_text(tok.to_str(), encoding="utf-8")
    state = CheckpointState(step=step, tokenizer_hash=tokenizer_hash(tok), config=cfg.to_dict())
    save_checkpoint(run.checkpoints, step, weights_state_dict(model), {"rng.torch": torch.zeros(1)}, state, keep=1)
    return run.path


def save_demo_run(
    path: Path, tok, *, context: int, max_new_tokens: int, vocab_size: int = 320, window: int = 8, name: str = "demo"
):
    """The generation tests' run: a 2-layer model with random weights whose logits are spread out,
    so greedy text never hinges on a near-tie, and sampling defaults of temperature 0.8, top-k 20."""
    from gptoss_cli.config import InferConfig, RunConfig, TrainConfig
    from gptoss_cli.model import ModelConfig, Transformer

    model_cfg = ModelConfig(
        num_hidden_layers=2,
        num_experts=4,
        experts_per_token=2,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=32,
        head_dim=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
        initial_context_length=context,
        max_context_length=context,
        moe_backend="loop",
    )
    cfg = RunConfig(
        model=model_cfg,
        train=TrainConfig(seq_len=32),
        infer=InferConfig(max_new_tokens=max_new_tokens, temperature=0.8, top_k=20),
        name=name,
    )
    model = Transformer(model_cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.embedding.weight.mul_(5)
    return save_run(path, cfg, tok, model, step=10)
