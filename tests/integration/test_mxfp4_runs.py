"""A run with packed MXFP4 experts, made the way a user makes one (`export --quantize mxfp4`, then `import`),
through every command that reads a run: infer, chat, serve, eval and export. The reference for each is the
same weights decoded (`import --dequantize`): the MXFP4 values are exact in bf16, so the two runs compute
the same model and their greedy tokens agree. The export of a packed run must hold the imported bytes
unchanged and load in transformers with its own MXFP4 support; importing a multi-shard MXFP4 checkpoint
with gpt-oss-20b's expert shapes must stay within a shard and a layer of anonymous memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptoss_cli.infer.generate import infer
from gptoss_cli.model.mxfp4 import PackedExperts
from gptoss_cli.run.checkpoint import resolve_checkpoint
from gptoss_cli.run.open import load_run
from tests.conftest import assert_close, rtol_for, save_demo_run
from tests.integration.same_model import (
    assert_same_chat,
    assert_same_greedy_tokens,
    assert_serves_as_infer,
    eval_results,
)
from tests.integration.test_serve import _tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = ["GPT models are", "The quick brown fox", "A sliding window keeps only the most recent"]
_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "mxfp4_20b.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torch_one_thread) -> dict[str, Path]:
    """dense: a demo run; hf: its MXFP4 export; packed / decoded: that export imported both ways."""
    from typer.testing import CliRunner

    from gptoss_cli.cli import app

    root = tmp_path_factory.mktemp("mxfp4")
    paths = {"dense": save_demo_run(root / "dense", _tokenizer(True), context=160, max_new_tokens=12, window=8)}
    paths |= {"hf": root / "hf", "packed": root / "packed", "decoded": root / "decoded"}
    for args in (
        ["export", "--run", paths["dense"], "--out", paths["hf"], "--quantize", "mxfp4", "--dtype", "fp32"],
        ["import", paths["hf"], "--run", paths["packed"]],
        ["import", paths["hf"], "--run", paths["decoded"], "--dequantize"],
    ):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, (result.output, result.exception)
    return paths


def test_a_packed_run_loads_packed_and_computes_the_decoded_model(runs):
    packed, decoded = load_run(runs["packed"], device="cpu"), load_run(runs["decoded"], device="cpu")
    assert isinstance(packed.model.block[0].mlp.mlp1_weight, PackedExperts)
    assert isinstance(decoded.model.block[0].mlp.mlp1_weight, torch.nn.Parameter)
    ids = torch.tensor([packed.tokenizer.encode(p).ids[:4] for p in PROMPTS])
    with torch.inference_mode():
        ref, got = decoded.model(ids).logits, packed.model(ids).logits
    assert ref.abs().max() > 0.1
    assert_close(got, ref, rtol=rtol_for(torch.float32, 32, 6))


def test_build_on_a_run_says_what_it_holds(runs, gptoss):
    for name, holds in (("packed", "mxfp4"), ("decoded", "dense")):
        code, out, err = gptoss("build", "--run", runs[name], "--json", "--context", "64")
        assert code == 0, err
        info = json.loads(out)
        assert info["experts_stored"] == holds and info["inference_at_context"]["context"] == 64
    code, out, err = gptoss("build", "--run", runs["packed"], "--no-tree")
    assert code == 0 and "this run holds MXFP4 experts" in err and "estimated peak" in err


def test_infer_greedy_tokens_equal_the_decoded_run(runs):
    assert_same_greedy_tokens(runs["packed"], runs["decoded"], PROMPTS)  # bf16 decode too


def test_chat_on_a_packed_run(runs):
    assert_same_chat(runs["packed"], runs["decoded"])


def test_eval_on_a_packed_run_equals_the_decoded_run(runs, tmp_path, gptoss, isolated_cache):
    results = eval_results(gptoss, {name: runs[name] for name in ("packed", "decoded")}, tmp_path)
    assert results["packed"]["tokens"] == results["decoded"]["tokens"] > 0
    assert results["packed"]["loss"] == pytest.approx(results["decoded"]["loss"], rel=1e-5)


def test_serve_on_a_packed_run_answers_as_infer(runs):
    assert_serves_as_infer(runs["packed"], "packed", runs["packed"], PROMPTS[:2])


def test_export_of_a_packed_run_is_byte_identical_and_loads_in_transformers(runs, tmp_path, gptoss):
    code, out, err = gptoss("export", "--run", runs["packed"], "--out", tmp_path / "again", "--dtype", "fp32", "--json")
    assert code == 0, err
    assert json.loads(out)["experts"] == "mxfp4"
    first, again = load_file(runs["hf"] / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert set(first) == set(again)
    packed = [n for n in first if n.endswith(("_blocks", "_scales"))]
    assert len(packed) == 8 and all(again[n].dtype == torch.uint8 and torch.equal(again[n], first[n]) for n in packed)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    # transformers' own MXFP4 support (on a CPU without its kernels it decodes at load) gives our logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    ours = load_run(runs["packed"], device="cpu").model
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    with torch.inference_mode():
        ref, got = hf(input_ids=ids, use_cache=False).logits, ours(ids).logits
    assert_close(got, ref, rtol=rtol_for(torch.float32, 32, 6))
    # --dequantize writes the experts decoded, exactly
    code, out, err = gptoss("export", "--run", runs["packed"], "--out", tmp_path / "bf16", "--dequantize", "--json")
    assert code == 0 and json.loads(out)["experts"] == "bf16", err
    decoded = load_file(resolve_checkpoint(runs["decoded"]) / "model.safetensors")
    dense = load_file(tmp_path / "bf16" / "model.safetensors")
    assert torch.equal(dense["model.layers.1.mlp.experts.down_proj"], decoded["block.1.mlp.mlp2_weight"].mT)


def test_quantize_reports_each_matrix_and_refuses_contradictions(runs, tmp_path, gptoss):
    code, out, err = gptoss("export", "--run", runs["dense"], "--out", tmp_path / "q", "--quantize", "mxfp4")
    assert code == 0, err
    assert "MXFP4 quantisation error" in err and "largest" in err
    code, out, err = gptoss("export", "--run", runs["dense"], "--out", tmp_path / "q2", "--quantize", "mxfp4", "--json")
    errors = json.loads(out)["quantization_error"]
    assert set(errors) == {f"block.{i}.mlp.mlp{j}_weight" for i in range(2) for j in (1, 2)}
    assert all(0 < e["relative_rms"] < 0.2 and e["max_abs"] > 0 for e in errors.values())
    code, out, err = gptoss(
        "export", "--run", runs["dense"], "--out", tmp_path / "q3", "--quantize", "mxfp4", "--dequantize"
    )
    assert code != 0 and "contradict" in err and not (tmp_path / "q3").exists()


def _bench():
    spec = importlib.util.spec_from_file_location("mxfp4_20b", _BENCH)  # benchmarks/ is scripts, not a package
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
def test_import_of_20b_expert_shapes_stays_within_a_shard_and_a_layer(tmp_path):
    """Two layers of gpt-oss-20b's expert shapes (about 420 MB of MXFP4 per layer, one shard each), a small
    vocabulary. The import's anonymous memory beyond a bare `python -c "import torch, gptoss_cli"` stays
    under the largest shard plus one layer; never near the ~1.6 GB of one layer decoded to bf16."""
    bench = _bench()
    sizes = bench.write_checkpoint(tmp_path / "hf", layers=2, vocab_size=512)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTOSS_DEBUG": "0"}
    bare = bench.peak_memory([sys.executable, "-c", "import torch, safetensors, gptoss_cli.cli"], env)
    done = bench.peak_memory([*bench.GPTOSS, "import", str(tmp_path / "hf"), "--run", str(tmp_path / "run")], env)
    grown = done["peak_anon"] - bare["peak_anon"]
    assert grown < sizes["largest_shard"] + sizes["layer_bytes"], (grown, sizes)
    weights = load_file(resolve_checkpoint(tmp_path / "run") / "model.safetensors")
    assert weights["block.1.mlp.mlp1_weight.blocks"].shape == (32, 5760, 90, 16)


@pytest.mark.slow
def test_compiled_decode_on_a_packed_run_equals_eager(runs):
    """`infer --compile` traces the packed experts' gather-and-decode branch (CPU inductor: a minute)."""
    for prompt in PROMPTS[:2]:
        compiled = infer([prompt], run=runs["packed"], device="cpu", temperature=0.0, compile_decode=True)
        eager = infer([prompt], run=runs["packed"], device="cpu", temperature=0.0)
        assert compiled.completions[0].token_ids == eager.completions[0].token_ids
        assert compiled.stats.compile_s > 0
