"""Frozen weights read from the mapped checkpoint (run/checkpoint.py `load_weights(frozen=True)`): a tensor
stored in the dtype the model holds it in becomes a view of the file's pages, any other is copied; the model
computes exactly what a copied one does, ties stay tied, only the pages read become resident, nothing is
ever written to the mapping or the file, and inference (run/open.py `load_run`) loads this way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gptoss_cli.data.shards import file_sha256
from gptoss_cli.devices import materialize
from gptoss_cli.model import ModelConfig
from gptoss_cli.model.mxfp4 import pack_experts
from gptoss_cli.run import checkpoint as ckpt
from gptoss_cli.run.open import load_run
from gptoss_cli.transforms import build_model, checkpoint_transforms
from tests.conftest import HAS_SMAPS, SMALL_OVERRIDES, file_mapping, mapped_from, save_run, tiny_model_config

pytestmark = [
    pytest.mark.usefixtures("torch_one_thread"),
    pytest.mark.skipif(not HAS_SMAPS, reason="reads this process's mappings from /proc/self/smaps (Linux)"),
]


def config(tied: bool = False) -> ModelConfig:
    # vocab 4096: an embedding table of 1 MiB in fp32, 256 pages, of which a forward reads a few rows
    return tiny_model_config(
        num_hidden_layers=2, vocab_size=4096, intermediate_size=64, sliding_window=4, tie_word_embeddings=tied
    )


def saved(path: Path, dtype: torch.dtype, *, packed: bool = False, tied: bool = False) -> Path:
    """A model.safetensors of random weights, every float tensor in `dtype`, as an imported release stores
    them (the model keeps its norms and router fp32 under a bf16 policy: those differ from the file)."""
    cfg = config(tied)
    model = build_model(cfg, seed=3)
    if packed:
        pack_experts(model)
    tensors = ckpt.weights_state_dict(model)
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(path))
    return path


def loaded(path: Path, dtype: torch.dtype, *, frozen: bool, tied: bool = False):
    cfg = config(tied)
    model = build_model(cfg, device=torch.device("meta"))
    for transform in checkpoint_transforms(ckpt.tensor_names(path)):
        transform(model)
    materialize(model, torch.device("cpu"), dtype)
    ckpt.load_weights(model, path, frozen=frozen)
    return model.requires_grad_(False).eval()


TOKENS = torch.tensor([[5, 17, 4000, 17, 9, 2]])


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_frozen_weights_in_the_models_dtype_are_views_of_the_file(tmp_path, stored, packed):
    path = saved(tmp_path / "model.safetensors", stored, packed=packed)
    digest = file_sha256(path)
    copied, mapped = loaded(path, stored, frozen=False), loaded(path, stored, frozen=True)
    own, theirs = ckpt.model_tensors(mapped), ckpt.model_tensors(copied)
    for name, t in own.items():
        assert torch.equal(t, theirs[name]), name
        assert not mapped_from(path, theirs[name]), name  # frozen=False copies, as before
        # norms and the router stay fp32 under a bf16 policy: those are copies, the rest is the file's
        assert mapped_from(path, t) == (t.dtype == stored or t.dtype == torch.uint8), name
    assert packed == any(name.endswith(".blocks") for name in own)
    assert mapped_from(path, mapped.block[0].attn.norm.scale) == (stored == torch.float32)
    with torch.no_grad():
        assert torch.equal(mapped(TOKENS).logits, copied(TOKENS).logits)
    written = file_mapping(path)
    assert written["mappings"] >= 1 and written["anonymous_kb"] == 0  # no page of the mapping was written
    assert file_sha256(path) == digest


def test_a_frozen_fp32_model_copies_weights_stored_in_bf16(tmp_path):
    path = saved(tmp_path / "model.safetensors", torch.bfloat16)
    model = loaded(path, torch.float32, frozen=True)
    dtypes = {t.dtype for t in ckpt.model_tensors(model).values()}
    assert dtypes == {torch.float32}
    assert not any(mapped_from(path, t) for t in ckpt.model_tensors(model).values())


def test_tied_weights_stay_one_tensor_on_the_file(tmp_path):
    path = saved(tmp_path / "model.safetensors", torch.float32, tied=True)
    model = loaded(path, torch.float32, frozen=True, tied=True)
    assert model.unembedding.weight is model.embedding.weight
    assert mapped_from(path, model.embedding.weight)


def test_only_the_pages_read_become_resident(tmp_path):
    """A forward over a few tokens reads a few rows of the embedding table (1 MiB): the file's resident pages
    stay well below its size, where a copied model holds all of it."""
    path = saved(tmp_path / "model.safetensors", torch.float32)
    model = loaded(path, torch.float32, frozen=True)
    with torch.no_grad():
        model(TOKENS)
    assert mapped_from(path, model.embedding.weight)
    table = model.embedding.weight.numel() * 4 // 1024
    mapping = file_mapping(path)
    assert mapping["rss_kb"] < path.stat().st_size // 1024 - table // 2, mapping


def test_inference_loads_the_weights_from_the_mapped_checkpoint(tmp_path, builtin_tok):
    from gptoss_cli.config import load_config

    cfg = load_config("tiny", [*SMALL_OVERRIDES, "model.vocab_size=400"])
    run = save_run(tmp_path / "run", cfg, builtin_tok, build_model(cfg.model, seed=1), step=1)
    path = ckpt.resolve_checkpoint(run) / ckpt.MODEL
    fp32 = load_run(run, device="cpu", dtype="fp32")
    assert mapped_from(path, fp32.model.block[0].attn.qkv.weight)
    assert mapped_from(path, fp32.model.embedding.weight)
    bf16 = load_run(run, device="cpu", dtype="bf16")  # stored fp32, computed bf16: copies
    assert not mapped_from(path, bf16.model.block[0].attn.qkv.weight)
    assert mapped_from(path, bf16.model.block[0].attn.norm.scale)  # fp32 under the policy: still the file's
