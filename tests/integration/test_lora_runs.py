"""A LoRA run after training, through every command that reads a run: the adapters applied on the fly
(`infer`, `chat`, `serve`, `eval`, `build`) compute what the merged model computes (`export`, then
`import`), and PEFT on transformers, given our export of the base and `export --adapter-only`, computes our
logits. Each on a dense base and on a base whose experts are packed MXFP4 (merged with --dequantize; packed
again by default, with the share of the update the rounding loses reported).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptoss_cli.config import load_config
from gptoss_cli.model import Transformer
from gptoss_cli.model.mxfp4 import pack_experts
from gptoss_cli.run import checkpoint as ckpt
from gptoss_cli.run.open import load_run
from gptoss_cli.train.loop import Trainer, setup_training
from tests.conftest import assert_close, max_diff, rtol_for, save_demo_run, save_run
from tests.integration.same_model import (
    assert_same_chat,
    assert_same_greedy_tokens,
    assert_serves_as_infer,
    eval_results,
)
from tests.integration.test_serve import _tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = ["GPT models are", "The quick brown fox", "A sliding window keeps only the most recent"]
TRAIN = [
    "lora.rank=4",
    "lora.alpha=8",
    "lora.targets=[attention,router,experts]",
    "train.lr=3e-2",
    "train.warmup_steps=0",
    "train.max_steps=6",
    "train.batch_size=4",
    "train.eval_every=6",
    "train.save_every=6",
    "train.device=cpu",
]
# fp32 logits of the 2-layer demo model: per layer attention (3) and MoE (4) reductions, the unembedding,
# over H = 32 features (tests/conftest.py's rule).
LOGITS_RTOL = rtol_for(torch.float32, 32, 2 * 7 + 1)


def cli(*args) -> dict:
    from typer.testing import CliRunner

    from gptoss_cli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torch_one_thread) -> dict[str, Path]:
    """base / packed-base: the demo model, dense and with its experts packed; lora / lora-packed: 6 LoRA
    steps on each (attention, router and experts); subset: rank 4 on qkv and mlp2 of layer 1 only;
    merged / merged-packed: the LoRA runs exported merged (fp32, experts decoded) and imported again."""
    root = tmp_path_factory.mktemp("lora")
    paths = {"base": save_demo_run(root / "base", _tokenizer(True), context=160, max_new_tokens=12, window=8)}
    opened = load_run(paths["base"], device="cpu")
    packed = Transformer(opened.config.model)
    packed.load_state_dict(opened.model.state_dict())
    pack_experts(packed)
    paths["packed-base"] = save_run(root / "packed-base", opened.config, opened.tokenizer, packed, step=10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTOSS_CACHE", str(root / "cache"))
        for name, base, extra in (
            ("lora", "base", []),
            ("lora-packed", "packed-base", []),
            ("subset", "base", ["lora.layers=[1]", "lora.targets=[qkv,mlp2]"]),
        ):
            cfg = load_config(str(paths[base] / "config.yaml"), [*TRAIN, *extra])
            p = setup_training(cfg, root / name, init_from=paths[base], progress=False)
            assert Trainer(p).run()["status"] == "completed"
            paths[name] = root / name
    for name, lora in (("merged", "lora"), ("merged-packed", "lora-packed")):
        cli("export", "--run", paths[lora], "--out", root / f"hf-{name}", "--dtype", "fp32", "--dequantize")
        cli("import", root / f"hf-{name}", "--run", root / name)
        paths[name] = root / name
    return paths


def logits(run: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return load_run(run, device="cpu", dtype="fp32").model(ids).logits


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 33, 2]])


@pytest.mark.parametrize("lora, base", [("lora", "base"), ("lora-packed", "packed-base"), ("subset", "base")])
def test_peft_on_transformers_computes_our_logits(runs, tmp_path, lora, base):
    cli("export", "--run", runs[base], "--out", tmp_path / "hf", "--dtype", "fp32")
    cli("export", "--run", runs[lora], "--out", tmp_path / "adapter", "--adapter-only")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = peft.LoraConfig.from_pretrained(tmp_path / "adapter")
    assert config.r == 4 and config.lora_alpha == 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.inference_mode():
        plain = hf(input_ids=IDS, use_cache=False).logits
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    # every tensor of the file was loaded into a LoRA module: none left at PEFT's initial zero B
    loaded = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(state) == set(loaded) and all(torch.equal(state[k], loaded[k]) for k in loaded)
    with torch.inference_mode():
        ref = model(input_ids=IDS, use_cache=False).logits
    ours = logits(runs[lora], IDS)
    assert max_diff(ref, plain) > 1e-2  # the adapters change the model
    assert_close(ours, ref, rtol=LOGITS_RTOL)


@pytest.mark.parametrize("lora, merged", [("lora", "merged"), ("lora-packed", "merged-packed")])
def test_a_lora_run_computes_its_merged_model(runs, lora, merged):
    got, ref = logits(runs[lora], IDS), logits(runs[merged], IDS)
    assert max_diff(got, logits(runs["base"], IDS)) > 1e-2
    assert_close(got, ref, rtol=LOGITS_RTOL)
    assert_same_greedy_tokens(runs[lora], runs[merged], PROMPTS)  # adapters on the fly, through the KV cache


def test_chat_and_eval_on_a_lora_run_equal_the_merged_run(runs, tmp_path, gptoss, isolated_cache):
    assert_same_chat(runs["lora"], runs["merged"])
    names = ("lora", "merged", "base")  # --context: the import's seq_len is another
    results = eval_results(gptoss, {name: runs[name] for name in names}, tmp_path, "--context", 64)
    assert results["lora"]["tokens"] == results["merged"]["tokens"] > 0
    assert results["lora"]["loss"] == pytest.approx(results["merged"]["loss"], rel=1e-5)
    assert results["lora"]["loss"] != pytest.approx(results["base"]["loss"], rel=1e-3)


def test_serve_on_a_lora_run_answers_as_the_merged_run(runs):
    assert_serves_as_infer(runs["lora"], "lora", runs["merged"], PROMPTS[:2])


def test_a_packed_base_is_merged_packed_again_with_the_lost_update_reported(runs, tmp_path, gptoss):
    code, out, err = gptoss("export", "--run", runs["lora-packed"], "--out", tmp_path / "q", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["experts"] == "mxfp4" and summary["lora_base"] is not None
    errors = summary["quantization_error"]
    assert set(errors) == {f"block.{i}.mlp.mlp{j}_weight" for i in range(2) for j in (1, 2)}
    assert all(0 < e["relative_rms"] < 0.2 and e["update_relative_rms"] > 0 for e in errors.values())
    weights = load_file(tmp_path / "q" / "model.safetensors")
    assert weights["model.layers.0.mlp.experts.gate_up_proj_blocks"].dtype == torch.uint8
    code, _, err = gptoss("export", "--run", runs["lora-packed"], "--out", tmp_path / "q2")
    assert code == 0 and "the MXFP4 rounding moves the merged experts by" in err


def test_adapter_only_refuses_a_whole_model_and_build_sizes_a_lora_run(runs, tmp_path, gptoss):
    code, _, err = gptoss("export", "--run", runs["base"], "--out", tmp_path / "a", "--adapter-only")
    assert code == 2 and "holds a whole model, not LoRA adapters" in err and len(err.strip().splitlines()) == 1
    code, out, err = gptoss("build", "--run", runs["lora-packed"], "--json")
    assert code == 0, err
    info = json.loads(out)
    saved = load_file(ckpt.resolve_checkpoint(runs["lora-packed"]) / ckpt.MODEL)
    assert info["experts_stored"] == "mxfp4"
    assert info["lora"]["trainable_params"] == sum(t.numel() for t in saved.values())
    memory = info["lora"]["memory_bytes"]
    assert memory["peak_mxfp4_experts"] < memory["peak_decoded"]


def test_the_gguf_export_of_a_lora_run_is_its_merged_model(runs, tmp_path, gptoss):
    from tests.integration.test_gguf_export import expected_tensors, read_gguf

    pytest.importorskip("gguf")
    code, out, err = gptoss(
        "export", "--run", runs["lora"], "--format", "gguf", "--out", tmp_path / "l.gguf", "--dtype", "fp32"
    )
    assert code == 0, err
    _, tensors = read_gguf(tmp_path / "l.gguf")
    merged = load_run(runs["merged"], device="cpu", dtype="fp32")
    weights = {n: t.detach() for n, t in ckpt.model_tensors(merged.model).items()}
    expected = expected_tensors(merged.config.model, weights)
    assert set(tensors) == set(expected)
    for name, ref in expected.items():
        assert torch.equal(tensors[name][1], ref.float()), name  # the same fp32 sums as the merged HF export
