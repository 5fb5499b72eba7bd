"""LoRA fine-tuning runs (`lora.rank > 0` with --init-from) through the trainer as the CLI drives it: only the
adapters train, only they are in the optimizer and in the checkpoints (beside a verified record of the base),
the base stays bit for bit what it was (dense, or packed MXFP4 and never decoded), step 0 is the base model,
a resume continues exactly as an uninterrupted run, dropout and activation checkpointing included, and a
base read from its mapped file trains exactly as a copied one without a page of it being written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptoss_cli.config import load_config
from gptoss_cli.data.shards import file_sha256
from gptoss_cli.errors import GptossError
from gptoss_cli.model.lora import adapter_tensors, is_adapter
from gptoss_cli.model.mxfp4 import PackedExperts, pack_experts
from gptoss_cli.run import checkpoint as ckpt
from gptoss_cli.run.open import load_run
from gptoss_cli.train.loop import Trainer, setup_training
from gptoss_cli.transforms import build_model
from tests.conftest import HAS_SMAPS, SMALL_OVERRIDES, file_mapping, mapped_from, save_run

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ASSETS = Path(__file__).resolve().parents[2] / "src" / "gptoss_cli" / "assets"
LORA = ["lora.rank=4", "lora.alpha=8", "train.lr=1e-2", "train.warmup_steps=0"]


def base_config(*extra: str):
    return load_config("tiny", [*SMALL_OVERRIDES, "model.vocab_size=400", *extra])


@pytest.fixture(scope="module")
def bases(tmp_path_factory, builtin_tok) -> dict[str, Path]:
    """Two trained-looking bases of the small model: dense, and with its experts packed in MXFP4."""
    root = tmp_path_factory.mktemp("bases")
    cfg = base_config()
    out = {}
    for kind in ("dense", "packed"):
        model = build_model(cfg.model, seed=5)
        if kind == "packed":
            pack_experts(model)
        out[kind] = save_run(root / kind, cfg, builtin_tok, model, step=1)
    return out


def lora_run(bases, kind: str, run: Path, *extra: str, stop_after=None, **kw):
    cfg = base_config(*LORA, *extra)
    p = setup_training(cfg, run, init_from=None if kw.get("resume") else bases[kind], **kw)
    return p, Trainer(p, stop_after=stop_after).run()


@pytest.mark.parametrize("kind", ["dense", "packed"])
def test_a_lora_run_trains_and_saves_only_its_adapters(bases, kind, tmp_path, isolated_cache):
    base_ckpt = ckpt.resolve_checkpoint(bases[kind])
    base_tensors = load_file(str(base_ckpt / ckpt.MODEL))
    p, summary = lora_run(bases, kind, tmp_path / "lora")
    assert summary["status"] == "completed" and summary["steps"] == 6
    adapters = adapter_tensors(p.model)
    optimized = {id(q) for group in p.optimizer.param_groups for q in group["params"]}
    assert optimized == {id(t) for t in adapters.values()}  # the optimizer holds the adapters and nothing else
    assert isinstance(p.model.block[0].mlp.mlp1_weight, PackedExperts) == (kind == "packed")  # never decoded
    assert p.transforms[-1].startswith("lora rank 4 on qkv, out, mlp1, mlp2")

    saved = ckpt.resolve_checkpoint(tmp_path / "lora")
    weights = load_file(str(saved / ckpt.MODEL))
    assert set(weights) == set(adapters) and all(map(is_adapter, weights))
    assert any(weights[n].abs().max() > 0 for n in weights if n.endswith("lora_B"))  # B moved off zero
    moments = {n for n in load_file(str(saved / ckpt.TRAINER)) if not n.startswith("rng.")}
    assert moments == {f"optim.{n}.{k}" for n in adapters for k in ("exp_avg", "exp_avg_sq", "step")}
    state = ckpt.read_state(saved)
    assert state.base["checkpoint"] == str(base_ckpt.resolve())
    assert state.base["sha256"] == file_sha256(base_ckpt / ckpt.MODEL)
    assert (saved / ckpt.MODEL).stat().st_size < (base_ckpt / ckpt.MODEL).stat().st_size
    # The base, in memory after six steps, is what its checkpoint holds, bit for bit.
    own = ckpt.model_tensors(p.model)
    for name, t in base_tensors.items():
        assert torch.equal(own[name].detach(), t), name


def test_step_0_of_a_lora_run_is_its_base_model(bases, tmp_path, isolated_cache):
    cfg = base_config(*LORA)
    p = setup_training(cfg, tmp_path / "lora", init_from=bases["packed"])
    p.release()
    base = load_run(bases["packed"], device="cpu")
    tokens = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    p.model.eval()
    with torch.no_grad():
        got, ref = p.model(tokens).logits, base.model(tokens).logits
    assert ref.abs().max() > 0.1 and torch.equal(got, ref)  # B = 0: the update is exactly zero


def test_lora_resume_equals_an_uninterrupted_run(bases, tmp_path, isolated_cache):
    """Packed base, dropout on the adapters' inputs, activation checkpointing: the resumed run's losses,
    adapters and AdamW state are the uninterrupted run's, bit for bit."""
    extra = ("lora.dropout=0.1", "train.activation_checkpointing=true", "lora.targets=[attention,router,experts]")
    pa, summary_a = lora_run(bases, "packed", tmp_path / "a", *extra)
    _, interrupted = lora_run(bases, "packed", tmp_path / "b", *extra, stop_after=3)
    assert interrupted["status"] == "interrupted" and interrupted["steps"] == 3
    pb, summary_b = lora_run(bases, "packed", tmp_path / "b", *extra, resume=True)
    assert summary_b["steps"] == 6 and summary_a["final_loss"] == summary_b["final_loss"]

    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 6
    for name, t in adapter_tensors(pa.model).items():
        assert torch.equal(t, adapter_tensors(pb.model)[name]), name
    sa, sb = pa.optimizer.state_dict()["state"], pb.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) == len(adapter_tensors(pa.model))
    for idx in sa:
        assert all(torch.equal(sa[idx][k], sb[idx][k]) for k in ("step", "exp_avg", "exp_avg_sq")), idx


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [rec["loss"] for rec in map(json.loads, lines) if rec["kind"] == "train"]


@pytest.mark.skipif(not HAS_SMAPS, reason="reads this process's mappings from /proc/self/smaps (Linux)")
def test_a_base_read_from_its_mapped_file_trains_as_a_copied_one_and_is_never_written(
    bases, tmp_path, isolated_cache, monkeypatch
):
    """On a CPU the frozen base's weights stored in the training dtype are views of its checkpoint
    (load_weights `frozen`): the same losses and adapters as a copied base, bit for bit, with activation
    checkpointing; no page of the mapping is written (copy-on-write would make it anonymous) and the file
    is unchanged. The packed base covers buffers (the MXFP4 codes) and parameters."""
    weights = ckpt.resolve_checkpoint(bases["packed"]) / ckpt.MODEL
    digest = file_sha256(weights)
    extra = ("train.activation_checkpointing=true",)
    mapped, _ = lora_run(bases, "packed", tmp_path / "mapped", *extra)
    base = mapped.model.block[0]
    assert mapped_from(weights, base.attn.qkv.weight) and mapped_from(weights, base.mlp.mlp1_weight.blocks)
    assert mapped_from(weights, mapped.model.embedding.weight)
    assert file_mapping(weights)["anonymous_kb"] == 0

    real = ckpt.load_weights
    monkeypatch.setattr(ckpt, "load_weights", lambda model, path, frozen=False: real(model, path))
    copied, _ = lora_run(bases, "packed", tmp_path / "copied", *extra)
    assert not mapped_from(weights, copied.model.block[0].attn.qkv.weight)
    assert _losses(tmp_path / "mapped") == _losses(tmp_path / "copied") and len(_losses(tmp_path / "mapped")) == 6
    for name, t in adapter_tensors(copied.model).items():
        assert torch.equal(adapter_tensors(mapped.model)[name], t), name
    assert file_mapping(weights)["anonymous_kb"] == 0 and file_sha256(weights) == digest


def test_lora_on_conversations_and_in_bf16(bases, tmp_path, isolated_cache):
    """The masked SFT of conversations, bf16 weights with fp32 adapters, a subset of layers."""
    data = f"data.paths=[{ASSETS / 'conversations.jsonl'}]"
    extra = (data, "train.seq_len=128", "train.precision=bf16", "lora.layers=[1]")
    p, summary = lora_run(bases, "packed", tmp_path / "chat", *extra)
    assert summary["status"] == "completed" and summary["final_loss"] > 0
    assert p.precision == "bf16" and p.model.block[1].attn.qkv.weight.dtype == torch.bfloat16
    names = set(adapter_tensors(p.model))
    assert names and all(n.startswith("block.1.") for n in names)
    assert all(t.dtype == torch.float32 for t in adapter_tensors(p.model).values())


def test_a_lora_run_opens_with_its_base_moved_and_refuses_other_base_weights(bases, tmp_path, isolated_cache):
    root = tmp_path / "runs"
    shutil.copytree(bases["dense"], root / "base")
    lora_run({"dense": root / "base"}, "dense", root / "lora")
    moved = tmp_path / "moved"
    shutil.move(root, moved)  # runs/ moved whole: the base is found relative to the LoRA run
    loaded = load_run(moved / "lora", device="cpu")
    assert loaded.base == (moved / "lora" / "../base/checkpoints" / ckpt.step_dir_name(1))
    weights = moved / "base" / "checkpoints" / ckpt.step_dir_name(1) / ckpt.MODEL
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the same size, other bytes: the sha256 decides
    weights.write_bytes(bytes(data))
    with pytest.raises(GptossError, match="other base weights"):
        load_run(moved / "lora", device="cpu")
    shutil.rmtree(moved / "base")
    with pytest.raises(GptossError, match="which is gone"):
        load_run(moved / "lora", device="cpu")


def test_what_a_lora_run_refuses(bases, tmp_path, isolated_cache, gptoss):
    with pytest.raises(GptossError, match="--init-from RUN"):
        setup_training(base_config(*LORA), tmp_path / "no-base")
    lora_run(bases, "dense", tmp_path / "lora")
    with pytest.raises(GptossError, match="holds LoRA adapters, not a whole model"):
        setup_training(base_config(*LORA), tmp_path / "chain", init_from=tmp_path / "lora")
    with pytest.raises(GptossError, match="lora.rank=4, the config has 8"):
        setup_training(base_config(*LORA, "lora.rank=8", "train.max_steps=9"), tmp_path / "lora", resume=True)
    with pytest.raises(GptossError, match="trained LoRA adapters; the config has lora.rank=0"):
        setup_training(base_config("train.max_steps=9"), tmp_path / "lora", resume=True)
    with pytest.raises(GptossError, match="not supported: use ddp"):
        setup_training(base_config(*LORA, "train.parallel=fsdp"), tmp_path / "fsdp", init_from=bases["dense"])
    code, _, err = gptoss("train", "--init-from", bases["dense"], "--set", "lora.layers=[9]")
    assert code == 2 and "lora.layers: layer 9 does not exist" in err and "Traceback" not in err
    code, _, err = gptoss("train", "--init-from", bases["dense"], "--set", "lora.targets=[mlp3]")
    assert code == 2 and "lora.targets[0]: expected one of" in err


def test_gptoss_train_says_what_a_lora_run_trains_and_its_estimated_peak(bases, tmp_path, isolated_cache, gptoss):
    code, out, err = gptoss(
        "train", "--init-from", bases["packed"], "--run", tmp_path / "lora", "--set", "lora.rank=4",
        "--set", "train.max_steps=2", "--json",
    )  # fmt: skip
    assert code == 0, err
    line = next(x for x in err.splitlines() if x.startswith("LoRA rank 4"))
    assert "on qkv, out, mlp1, mlp2 of every layer:" in line and "(MXFP4 experts, frozen, fp32)" in line
    assert "trainable parameters" in line and "estimated peak" in line
    assert json.loads(out)["status"] == "completed"
