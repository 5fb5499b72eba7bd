"""`gptoss export` / `gptoss import` against transformers' GptOssForCausalLM, on tiny random models (CPU).

The reference is transformers itself: an exported run must load with AutoModelForCausalLM / AutoTokenizer
and give our fp32 logits and token ids; an HF model saved with save_pretrained must import to a run whose
logits equal HF's. MXFP4-quantized experts import to the values packed by hand,
and every bad input must fail with one GptossError and leave no run directory behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from gptoss_cli.commands import export, import_  # noqa: E402
from gptoss_cli.config import RunConfig, config_from_dict, read_yaml  # noqa: E402
from gptoss_cli.data.tokenizer import EOS, PAD, train_tokenizer  # noqa: E402
from gptoss_cli.devices import keeps_fp32  # noqa: E402
from gptoss_cli.errors import GptossError  # noqa: E402
from gptoss_cli.model import ModelConfig, Transformer  # noqa: E402
from gptoss_cli.run.checkpoint import (  # noqa: E402
    load_weights,
    read_state,
    resolve_checkpoint,
    weights_state_dict,
)
from tests.conftest import assert_close, randomise, save_run, tiny_model_config  # noqa: E402
from tests.unit.model.test_mxfp4 import quantize_by_hand  # noqa: E402

# TOL is absolute on purpose: randomise's 0.08 weights keep the logits O(1) (assert_close prints max|ref|).
VOCAB, SEQ, TOL = 320, 20, 1e-5
TEXTS = [
    "GPT models are trained on text.",
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts routes every token to a few experts.",
    "Sliding windows keep attention local.",
] * 8
# The context each layout's config allows (transformers' max_position_embeddings follows it).
MAX_CONTEXT = {"released": 2048, "compact": 512}

app = typer.Typer()
app.command("export")(export.command)
app.command("import")(import_.command)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def fails(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code != 0 and isinstance(result.exception, GptossError), (result.output, result.exception)
    message = str(result.exception)
    assert "\n" not in message
    return message


# ---- tiny models --------------------------------------------------------------------------------


def tiny_config(layout: str, **over) -> ModelConfig:
    return tiny_model_config(layout, vocab_size=VOCAB, max_context_length=MAX_CONTEXT[layout], **over)


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        out = (
            model(ids if ids is not None else tokens())
            if isinstance(model, Transformer)
            else model(input_ids=ids if ids is not None else tokens(), use_cache=False)
        )
    return out.logits


def make_run(root: Path, layout: str, **over) -> tuple[Path, Transformer]:
    """A run directory as `gptoss train` writes one: config.yaml, tokenizer.json, checkpoints/step-N."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(layout, **over)).eval()
    randomise(model)
    tok = train_tokenizer(TEXTS, 300)
    cfg = RunConfig(model=model.config, name=f"tiny-{layout}")
    return save_run(root / f"run-{layout}", cfg, tok, model, step=7), model


def load_run(run: Path) -> Transformer:
    ckpt = resolve_checkpoint(run)
    cfg = config_from_dict(read_yaml(run / "config.yaml"), "config.yaml")
    assert read_state(ckpt).config["model"] == cfg.to_dict()["model"]
    model = Transformer(cfg.model).eval()
    load_weights(model, ckpt / "model.safetensors")
    return model


def hf_model(layout: str = "released", seed: int = 3, **over) -> transformers.GptOssForCausalLM:
    """A random HF model (sinks and biases randomised too); rope as HF builds it when `rope` is not given."""
    kw = (
        dict(
            num_hidden_layers=4,
            hidden_size=64,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=VOCAB,
            sliding_window=8,
            max_position_embeddings=131072,
            tie_word_embeddings=layout == "compact",
            attention_bias=layout != "compact",
        )
        | over
    )
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**kw)).eval()
    randomise(model, seed)
    return model


# ---- export -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["released", "compact"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, layout):
    run, ours = make_run(tmp_path, layout)
    out = tmp_path / "hf"
    ok("export", "--run", run, "--out", out, "--dtype", "fp32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["architectures"] == ["GptOssForCausalLM"]
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert config["rope_parameters"]["rope_type"] == ("yarn" if layout == "released" else "default")
    names = set(load_file(out / "model.safetensors"))
    assert ("lm_head.weight" in names) == (layout == "released")
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (layout == "released")
    assert "model.layers.0.mlp.router.bias" in names  # zeros for the bias-free router
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GptOssForCausalLM" and hf.dtype == torch.float32
    ref, got = logits(hf), logits(ours)
    assert ref.abs().max() > 0.1
    assert_close(got, ref, rtol=0, atol=TOL)


def test_export_tokenizer_matches_autotokenizer(tmp_path):
    run, _ = make_run(tmp_path, "compact")
    out = tmp_path / "hf"
    ok("export", "--run", run, "--out", out)
    ours = train_tokenizer(TEXTS, 300)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["GPT models are", "The lazy dog.", "héllo wörld 123 <|endoftext|>", "  spaces\nnewline"]:
        assert hf_tok(text)["input_ids"] == ours.encode(text).ids, text
    assert hf_tok.eos_token == EOS and hf_tok.pad_token == PAD
    generation = json.loads((out / "generation_config.json").read_text())
    # <|endoftext|> first, then the tokens that end an assistant turn (the run has a conversation format)
    assert generation["eos_token_id"][0] == ours.token_to_id(EOS) == hf_tok.eos_token_id
    assert set(generation["eos_token_id"][1:]) == {ours.token_to_id("<|return|>"), ours.token_to_id("<|end|>")}


def test_bf16_export_is_close_and_follows_the_precision_policy(tmp_path):
    run, ours = make_run(tmp_path, "released")
    ok("export", "--run", run, "--out", tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert tensors["model.norm.weight"].dtype == torch.float32  # norms and the router stay fp32 (devices.py)
    assert tensors["model.layers.0.mlp.router.weight"].dtype == torch.float32
    with torch.no_grad():  # the only loss is bf16 rounding of the weights: round ours the same way
        for name, p in ours.named_parameters():
            if not keeps_fp32(name):
                p.copy_(p.to(torch.bfloat16))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert_close(logits(hf), logits(ours), rtol=0, atol=TOL)


def test_export_refuses_what_hf_would_compute_differently_and_overwrites_only_with_force(tmp_path):
    run, _ = make_run(tmp_path, "compact", swiglu_limit=5.0)
    assert "swiglu_limit" in fails("export", "--run", run, "--out", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    run, _ = make_run(tmp_path, "released")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "--force" in fails("export", "--run", run, "--out", out)
    assert (out / "keep.txt").exists()
    ok("export", "--run", run, "--out", out, "--force")
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left


# ---- import -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["released", "compact", "hf-default-rope"])
def test_import_hf_save_pretrained_matches_hf_logits(tmp_path, case):
    rope = {
        "hf-default-rope": None,
        "compact": {"rope_type": "default", "rope_theta": 10000.0},
        "released": {
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 512,
            "truncate": False,
        },
    }[case]
    hf = hf_model(
        "compact" if case == "compact" else "released",
        rope_parameters=rope,
        max_position_embeddings={"hf-default-rope": 131072, "compact": 512, "released": 2048}[case],
    )
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    train_tokenizer(TEXTS, 300).save(str(src / "tokenizer.json"))
    if case == "hf-default-rope":  # old-style config.json: HF then means YaRN x32 over 4096 (configuration_gpt_oss.py)
        config = json.loads((src / "config.json").read_text())
        del config["rope_parameters"]
        (src / "config.json").write_text(json.dumps(config))
        hf = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
        assert hf.config.rope_parameters["factor"] == 32.0
    run = tmp_path / "runs" / "imported"
    ok("import", src, "--run", run)
    assert (run / "tokenizer.json").is_file() and (run / "checkpoints" / "step-00000000").is_dir()
    state = read_state(resolve_checkpoint(run))
    assert state.step == 0 and state.tokenizer_hash and state.imported_from.endswith("hf")
    ours = load_run(run)
    assert ours.config.tie_word_embeddings == (case == "compact")
    assert ours.config.rope_scaling_factor == {"released": 4.0, "compact": 1.0, "hf-default-rope": 32.0}[case]
    ref = logits(hf)
    assert_close(logits(ours), ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("layout", ["released", "compact"])
def test_sharded_export_import_round_trip(tmp_path, layout):
    run, ours = make_run(tmp_path, layout)
    out = tmp_path / "hf"
    ok("export", "--run", run, "--out", out, "--dtype", "fp32", "--max-shard-size", "40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    ok("import", out, "--run", tmp_path / "back")
    back = load_run(tmp_path / "back")
    assert back.config.router_bias == ours.config.router_bias  # exported zeros are recognised
    for key in (
        "tie_word_embeddings",
        "attention_bias",
        "rope_scaling_factor",
        "initial_context_length",
        "sliding_window",
        "max_context_length",
    ):
        assert getattr(back.config, key) == getattr(ours.config, key), key
    assert_close(logits(back), logits(ours), rtol=0, atol=TOL)


def test_import_without_tokenizer_warns_and_writes_weights(tmp_path):
    hf_model().save_pretrained(tmp_path / "hf")
    result = ok("import", tmp_path / "hf", "--run", tmp_path / "run")
    assert "tokenizer" in result.output
    assert not (tmp_path / "run" / "tokenizer.json").exists()
    assert read_state(resolve_checkpoint(tmp_path / "run")).tokenizer_hash is None


# ---- MXFP4 --------------------------------------------------------------------------------------


def hf_mxfp4_dir(root: Path) -> tuple[Path, transformers.GptOssForCausalLM, dict]:
    """An HF directory whose expert matrices are MXFP4 (values packed by hand), the HF model holding the
    same values dense, and {our name: (blocks, scales, decoded values)}."""
    hf = hf_model()
    src = root / "hf"
    hf.save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    expected = {}
    for i in range(4):
        for name, shape, ours in (
            ("gate_up_proj", (4, 64, 64), "mlp1_weight"),
            ("down_proj", (4, 64, 32), "mlp2_weight"),
        ):
            key = f"model.layers.{i}.mlp.experts.{name}"
            blocks, scales, values = quantize_by_hand(shape, seed=10 * i + len(name))
            del tensors[key]
            tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
            expected[f"block.{i}.mlp.{ours}"] = blocks, scales, values  # our layout (E, out, in) = the blocks'
            with torch.no_grad():  # the same values, dense, in HF's (E, in, out) layout
                hf.get_parameter(key).copy_(values.transpose(1, 2))
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (src / "config.json").write_text(json.dumps(config))
    return src, hf, expected


def test_import_hf_mxfp4_keeps_the_experts_packed(tmp_path):
    src, hf, expected = hf_mxfp4_dir(tmp_path)
    result = ok("import", src, "--run", tmp_path / "run", "--json")
    assert json.loads(result.stdout)["experts"] == "mxfp4"
    ckpt = resolve_checkpoint(tmp_path / "run")
    assert read_state(ckpt).quantization == "mxfp4"
    weights = load_file(ckpt / "model.safetensors")
    for name, (blocks, scales, _) in expected.items():
        assert name not in weights
        assert torch.equal(weights[name + ".blocks"], blocks) and torch.equal(weights[name + ".scales"], scales)
    assert_close(logits(load_run(tmp_path / "run")), logits(hf), rtol=0, atol=TOL)  # decoded into a dense model


def test_import_hf_mxfp4_dequantize_decodes_to_bf16(tmp_path):
    src, hf, expected = hf_mxfp4_dir(tmp_path)
    ok("import", src, "--run", tmp_path / "run", "--dequantize")
    ckpt = resolve_checkpoint(tmp_path / "run")
    assert read_state(ckpt).quantization is None
    weights = load_file(ckpt / "model.safetensors")
    for name, (_, _, values) in expected.items():
        assert weights[name].dtype == torch.bfloat16 and torch.equal(weights[name].float(), values), name
    assert_close(logits(load_run(tmp_path / "run")), logits(hf), rtol=0, atol=TOL)


def test_import_openai_original_layout(tmp_path):
    torch.manual_seed(0)
    ours = Transformer(tiny_config("released")).eval()
    randomise(ours)
    src = tmp_path / "gpt-oss-tiny" / "original"
    src.mkdir(parents=True)
    tensors = weights_state_dict(ours)
    blocks, scales, values = quantize_by_hand((4, 64, 64), seed=5)  # layer 1's mlp1 in MXFP4
    del tensors["block.1.mlp.mlp1_weight"]
    tensors["block.1.mlp.mlp1_weight.blocks"], tensors["block.1.mlp.mlp1_weight.scales"] = blocks, scales
    with torch.no_grad():
        ours.block[1].mlp.mlp1_weight.copy_(values)
    save_file({k: v.contiguous() for k, v in tensors.items()}, src / "model.safetensors")
    c = ours.config
    (src / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 4,
                "num_experts": 4,
                "experts_per_token": 2,
                "vocab_size": VOCAB,
                "hidden_size": 64,
                "intermediate_size": 32,
                "swiglu_limit": 7.0,
                "head_dim": 16,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "sliding_window": 8,
                "initial_context_length": c.initial_context_length,
                "rope_theta": c.rope_theta,
                "rope_scaling_factor": c.rope_scaling_factor,
                "rope_ntk_alpha": 1.0,
                "rope_ntk_beta": 32.0,
            }
        )
    )
    train_tokenizer(TEXTS, 300).save(str(src.parent / "tokenizer.json"))  # a release keeps it one level up
    result = ok("import", src, "--run", tmp_path / "run")
    assert "only 1 of the 8 expert matrices are MXFP4" in result.output  # decoded, losslessly, to bf16
    back = load_run(tmp_path / "run")
    assert (back.config.tie_word_embeddings, back.config.attention_bias, back.config.router_bias) == (False, True, True)
    assert back.config.max_context_length == 2048 and (tmp_path / "run" / "tokenizer.json").is_file()
    assert torch.equal(back.block[1].mlp.mlp1_weight, values)
    assert_close(logits(back), logits(ours), rtol=0, atol=TOL)


# ---- bad input ----------------------------------------------------------------------------------


def _edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize("problem", ["llama", "missing-shard", "shape", "gptq", "truncate", "layer-types"])
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, problem):
    src = tmp_path / "hf"
    hf_model().save_pretrained(src, max_shard_size="100KB" if problem == "missing-shard" else "5GB")
    expect = {
        "llama": "model_type",
        "missing-shard": "missing",
        "shape": "shape",
        "gptq": "gptq",
        "truncate": "truncate",
        "layer-types": "layer_types",
    }[problem]
    if problem == "llama":
        _edit_config(src, model_type="llama")
    elif problem == "missing-shard":
        shard = sorted(src.glob("model-*.safetensors"))[1]
        shard.unlink()
        expect = shard.name
    elif problem == "shape":
        _edit_config(src, intermediate_size=48)
        expect = "mlp.experts.gate_up_proj"
    elif problem == "gptq":
        _edit_config(src, quantization_config={"quant_method": "gptq", "bits": 4})
    elif problem == "truncate":
        _edit_config(src, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 150000.0})
    else:
        _edit_config(src, layer_types=["full_attention", "sliding_attention"] * 2)
    run = tmp_path / "runs" / "new"
    assert expect in fails("import", src, "--run", run)
    assert not run.exists()
    assert not (run.parent.exists() and any(run.parent.iterdir()))


def test_import_refuses_a_non_empty_run(tmp_path):
    hf_model().save_pretrained(tmp_path / "hf")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert "not empty" in fails("import", tmp_path / "hf", "--run", tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]
