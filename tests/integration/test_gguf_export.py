"""`gptoss export --format gguf`, read back with the `gguf` package's own reader (llama.cpp's Python reader).

Every tensor must equal the checkpoint after the layout llama.cpp's gpt-oss loader reads (q/k/v rows split,
mlp1's interleaved gate/linear rows apart, an untied output, zero biases where the model has none), exactly
in fp32 and as the checkpoint rounded to bf16 / fp16; MXFP4 experts must decode to the checkpoint when its
values are MXFP4 numbers. The expected tensors are sliced here by hand from llama.cpp's shapes
(src/models/openai-moe.cpp), not with the exporter's map. The metadata and the tokenizer are checked key by
key, and every refusal is one line that writes nothing. llama.cpp itself runs the files in
test_gguf_llama_cpp.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

gguf = pytest.importorskip("gguf")

from gptoss_cli.config import RunConfig, TrainConfig  # noqa: E402
from gptoss_cli.data.chat_format import CHAT_TEMPLATE  # noqa: E402
from gptoss_cli.data.tokenizer import EOS, PAD, SPECIAL_TOKENS  # noqa: E402
from gptoss_cli.model import Transformer  # noqa: E402
from gptoss_cli.model.mxfp4 import dequantize, pack_experts  # noqa: E402
from gptoss_cli.run.checkpoint import resolve_checkpoint  # noqa: E402
from gptoss_cli.run.layout import MODEL  # noqa: E402
from tests.conftest import randomise, save_run, tiny_model_config  # noqa: E402
from tests.unit.model.test_mxfp4 import quantize_by_hand  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

VOCAB = 416  # the 400-token builtin tokenizer plus 16 ids it never produces


def make_run(
    path: Path, tok, layout: str = "compact", *, mxfp4_values: bool = False, packed: bool = False, **over
) -> Path:
    """A run of a randomised tiny model; `mxfp4_values`: expert matrices made of MXFP4 numbers (quantizing
    them loses nothing); `packed`: saved with those experts packed (.blocks / .scales), as an import keeps
    a release's."""
    cfg = tiny_model_config(layout, vocab_size=VOCAB, max_context_length=128, intermediate_size=32, **over)
    model = Transformer(cfg)
    with torch.no_grad():
        randomise(model)
        if mxfp4_values or packed:
            for i, block in enumerate(model.block):
                for k, name in enumerate(("mlp1_weight", "mlp2_weight")):
                    weight = getattr(block.mlp, name)
                    weight.copy_(quantize_by_hand(tuple(weight.shape), seed=10 * i + k)[2])
        if packed:
            pack_experts(model)
    return save_run(path, RunConfig(model=cfg, train=TrainConfig(seq_len=32)), tok, model, step=7)


def _load(run: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as saved (our names)."""
    return load_file(str(resolve_checkpoint(run) / MODEL))


def expected_tensors(cfg, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llama.cpp's gpt-oss tensors in numpy (out x in) order, sliced by hand."""
    nh, nkv, d, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_experts
    q, k = nh * d, nh * d + nkv * d
    out = {"token_embd.weight": w["embedding.weight"], "output_norm.weight": w["norm.scale"]}
    out["output.weight"] = w["embedding.weight" if cfg.tie_word_embeddings else "unembedding.weight"]
    for i in range(cfg.num_hidden_layers):
        p, b = f"block.{i}.", f"blk.{i}."
        qkv = w[p + "attn.qkv.weight"]
        qkv_b = w[p + "attn.qkv.bias"] if cfg.attention_bias else torch.zeros(qkv.shape[0])
        out |= {
            b + "attn_norm.weight": w[p + "attn.norm.scale"],
            b + "attn_q.weight": qkv[:q],
            b + "attn_k.weight": qkv[q:k],
            b + "attn_v.weight": qkv[k:],
            b + "attn_q.bias": qkv_b[:q],
            b + "attn_k.bias": qkv_b[q:k],
            b + "attn_v.bias": qkv_b[k:],
            b + "attn_output.weight": w[p + "attn.out.weight"],
            b + "attn_output.bias": w[p + "attn.out.bias"] if cfg.attention_bias else torch.zeros(cfg.hidden_size),
            b + "attn_sinks.weight": w[p + "attn.sinks"],
            b + "post_attention_norm.weight": w[p + "mlp.norm.scale"],
            b + "ffn_gate_inp.weight": w[p + "mlp.gate.weight"],
            b + "ffn_gate_inp.bias": w[p + "mlp.gate.bias"] if cfg.router_bias else torch.zeros(e),
            b + "ffn_gate_exps.weight": torch.stack([w[p + "mlp.mlp1_weight"][x, 0::2] for x in range(e)]),
            b + "ffn_up_exps.weight": torch.stack([w[p + "mlp.mlp1_weight"][x, 1::2] for x in range(e)]),
            b + "ffn_gate_exps.bias": w[p + "mlp.mlp1_bias"][:, 0::2],
            b + "ffn_up_exps.bias": w[p + "mlp.mlp1_bias"][:, 1::2],
            b + "ffn_down_exps.weight": w[p + "mlp.mlp2_weight"],
            b + "ffn_down_exps.bias": w[p + "mlp.mlp2_bias"],
        }
    return out


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[str, torch.Tensor]]]:
    """(metadata {key: value}, {tensor name: (GGML type name, values as fp32 in numpy order)})."""
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (t.tensor_type.name, torch.from_numpy(values.copy()).reshape(tuple(reversed(t.shape))))
    return fields, tensors


ROUND = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STORED = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
ALWAYS_F32 = ("norm.weight", ".bias", "attn_sinks.weight", "ffn_gate_inp.weight")  # vectors and the router


@pytest.mark.parametrize(
    ("layout", "dtype"), [("compact", "fp32"), ("released", "fp32"), ("released", "bf16"), ("compact", "fp16")]
)
def test_every_tensor_reads_back_as_the_checkpoint(gptoss, builtin_tok, tmp_path, layout, dtype):
    run = make_run(tmp_path / "run", builtin_tok, layout)
    out = tmp_path / "model.gguf"
    code, _, err = gptoss("export", "--run", run, "--format", "gguf", "--dtype", dtype, "--out", out)
    assert code == 0, err
    cfg = tiny_model_config(layout, vocab_size=VOCAB, max_context_length=128, intermediate_size=32)
    expected = expected_tensors(cfg, _load(run))
    _, tensors = read_gguf(out)
    assert set(tensors) == set(expected)
    for name, ref in expected.items():
        kind, got = tensors[name]
        f32 = name.endswith(ALWAYS_F32)
        assert kind == ("F32" if f32 else STORED[dtype]), name
        assert got.shape == ref.shape, name
        assert torch.equal(got, ref.float() if f32 else ref.to(ROUND[dtype]).float()), name


def _dense(run: Path) -> dict[str, torch.Tensor]:
    """The checkpoint with packed experts decoded (exactly: MXFP4 values are fp32 numbers)."""
    w = _load(run)
    for name in [n.removesuffix(".blocks") for n in w if n.endswith(".blocks")]:
        w[name] = dequantize(w.pop(name + ".blocks"), w.pop(name + ".scales"), torch.float32)
    return w


@pytest.mark.parametrize("source", ["packed", "quantized"])
def test_mxfp4_experts_are_the_checkpoints_numbers(gptoss, builtin_tok, tmp_path, source):
    """A packed run's experts go byte for byte (gguf's own dequantizer gives back the values the codes were
    drawn from); a dense run's are packed with --quantize, losslessly here since its values are MXFP4
    numbers."""
    packed = source == "packed"
    run = make_run(tmp_path / "run", builtin_tok, "released", mxfp4_values=True, packed=packed)
    assert any(n.endswith(".blocks") for n in _load(run)) == packed
    out = tmp_path / "model.gguf"
    args = ["--run", run, "--format", "gguf", "--out", out, "--json"] + ([] if packed else ["--quantize", "mxfp4"])
    code, stdout, err = gptoss("export", *args)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["experts"] == "mxfp4"
    assert all(e["relative_rms"] == 0 for e in summary["quantization_error"].values())
    assert len(summary["quantization_error"]) == (0 if packed else 8)
    cfg = tiny_model_config("released", vocab_size=VOCAB, max_context_length=128, intermediate_size=32)
    fields, tensors = read_gguf(out)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    for name, ref in expected_tensors(cfg, _dense(run)).items():
        kind, got = tensors[name]
        assert kind == ("MXFP4" if "_exps.weight" in name else "F32" if name.endswith(ALWAYS_F32) else "BF16"), name
        assert torch.equal(got, ref if kind != "BF16" else ref.to(torch.bfloat16).float()), name
    raw = {t.name: t.data for t in gguf.GGUFReader(out).tensors}["blk.0.ffn_down_exps.weight"]  # (E, H, G * 17)
    scales = _load(run)["block.0.mlp.mlp2_weight.scales"] if packed else None
    if scales is not None:  # every 17-byte block opens with its E8M0 scale, unchanged
        assert torch.equal(torch.from_numpy(raw.copy()).view(*scales.shape, 17)[..., 0], scales)


def test_dequantize_writes_a_packed_runs_experts_decoded(gptoss, builtin_tok, tmp_path):
    run = make_run(tmp_path / "run", builtin_tok, "compact", packed=True)
    out = tmp_path / "model.gguf"
    code, _, err = gptoss("export", "--run", run, "--format", "gguf", "--dtype", "fp32", "--dequantize", "--out", out)
    assert code == 0, err
    cfg = tiny_model_config("compact", vocab_size=VOCAB, max_context_length=128, intermediate_size=32)
    fields, tensors = read_gguf(out)
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    for name, ref in expected_tensors(cfg, _dense(run)).items():
        assert tensors[name][0] == "F32" and torch.equal(tensors[name][1], ref), name


def test_metadata_and_tokenizer(gptoss, builtin_tok, tmp_path):
    run = make_run(tmp_path / "run", builtin_tok, "released")
    out = tmp_path / "model.gguf"
    code, stdout, err = gptoss("export", "--run", run, "--format", "gguf", "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["pre_tokenizer"] == "gpt-4o" and summary["bytes"] == out.stat().st_size
    fields, tensors = read_gguf(out)
    cfg = tiny_model_config("released", vocab_size=VOCAB, max_context_length=128, intermediate_size=32)
    assert summary["tensors"] == len(tensors) == 3 + 19 * cfg.num_hidden_layers
    expected = {
        "general.architecture": "gpt-oss",
        "general.file_type": gguf.LlamaFileType.MOSTLY_BF16,
        "gpt-oss.block_count": cfg.num_hidden_layers,
        "gpt-oss.context_length": 128,
        "gpt-oss.embedding_length": cfg.hidden_size,
        "gpt-oss.expert_feed_forward_length": cfg.intermediate_size,
        "gpt-oss.attention.head_count": cfg.num_attention_heads,
        "gpt-oss.attention.head_count_kv": cfg.num_key_value_heads,
        "gpt-oss.attention.key_length": cfg.head_dim,
        "gpt-oss.attention.value_length": cfg.head_dim,
        "gpt-oss.attention.sliding_window": cfg.sliding_window,
        "gpt-oss.expert_count": cfg.num_experts,
        "gpt-oss.expert_used_count": cfg.experts_per_token,
        "gpt-oss.rope.freq_base": cfg.rope_theta,
        "gpt-oss.rope.scaling.type": "yarn",
        "gpt-oss.rope.scaling.factor": cfg.rope_scaling_factor,
        "gpt-oss.rope.scaling.original_context_length": cfg.initial_context_length,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-4o",
        "tokenizer.ggml.eos_token_id": builtin_tok.token_to_id(EOS),
        "tokenizer.ggml.bos_token_id": builtin_tok.token_to_id(EOS),
        "tokenizer.ggml.padding_token_id": builtin_tok.token_to_id(PAD),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert {k: fields.get(k) for k in expected} == expected  # every number here is exact in float32
    assert fields["gpt-oss.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == VOCAB
    n = builtin_tok.get_vocab_size()
    assert tokens[:n] == [builtin_tok.id_to_token(i) for i in range(n)]
    control = {builtin_tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == sorted(control)
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types[:n]) if i not in control)
    assert all(t == gguf.TokenType.UNUSED for t in types[n:]) and len(set(tokens)) == VOCAB
    merges = json.loads(builtin_tok.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]


def test_a_run_without_a_window_gets_one_as_long_as_its_context(gptoss, builtin_tok, tmp_path):
    run = make_run(tmp_path / "run", builtin_tok, "compact", sliding_window=0)
    out = tmp_path / "model.gguf"
    assert gptoss("export", "--run", run, "--format", "gguf", "--out", out)[0] == 0
    fields, _ = read_gguf(out)
    assert fields["gpt-oss.attention.sliding_window"] == 128 and "gpt-oss.rope.scaling.type" not in fields


# ---- tokenizers ------------------------------------------------------------------------------------


def _with_pre_tokenizer(tok, pre=None, normalizer=None):
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    if pre is not None:
        spec["pre_tokenizer"] = pre
    if normalizer is not None:
        spec["normalizer"] = normalizer
    return Tokenizer.from_str(json.dumps(spec))


O200K = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


def test_older_and_released_tokenizers_go_with_their_llama_cpp_pre_tokenizer(gptoss, builtin_tok, tmp_path):
    gpt2 = _with_pre_tokenizer(builtin_tok, BYTES | {"use_regex": True})  # the split earlier gptoss versions used
    o200k = _with_pre_tokenizer(
        builtin_tok,
        {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": O200K}, "behavior": "Isolated", "invert": False},
                BYTES,
            ],
        },
    )
    for tok, pre, note in ((gpt2, "gpt-2", None), (o200k, "gpt-4o", "tells letter case apart for A-Z only")):
        run = make_run(tmp_path / pre, tok)
        code, _, err = gptoss("export", "--run", run, "--format", "gguf", "--out", tmp_path / f"{pre}.gguf")
        assert code == 0, err
        assert read_gguf(tmp_path / f"{pre}.gguf")[0]["tokenizer.ggml.pre"] == pre
        assert (note in " ".join(err.split())) if note else "warning" not in err


@pytest.mark.parametrize(
    ("pre", "normalizer", "message"),
    [
        (None, {"type": "NFC"}, "its normalizer (NFC) has no llama.cpp counterpart"),
        (
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
            None,
            "its pre-tokenizer (Metaspace) splits text in a way llama.cpp does not implement",
        ),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": r"\w+|\s+"}, "behavior": "Isolated", "invert": False},
                    BYTES,
                ],
            },
            None,
            "its pre-tokenizer (Split + ByteLevel) splits text in a way llama.cpp does not implement",
        ),
    ],
)
def test_a_tokenizer_llama_cpp_cannot_reproduce_is_refused_with_the_reason(
    gptoss, builtin_tok, tmp_path, pre, normalizer, message
):
    run = make_run(tmp_path / "run", _with_pre_tokenizer(builtin_tok, pre, normalizer))
    code, out, err = gptoss("export", "--run", run, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert code != 0 and out == ""
    assert message in err and "tokenizer.json" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.glob("*m.gguf*")) == []


# ---- refusals ----------------------------------------------------------------------------------------


def fails(gptoss, *args) -> str:
    code, out, err = gptoss("export", *args)
    assert code != 0 and out == "", err
    assert len(err.strip().splitlines()) == 1, err
    return " ".join(err.split())


def test_bad_options_and_models_are_refused_before_anything_is_written(gptoss, builtin_tok, tmp_path):
    run = make_run(tmp_path / "run", builtin_tok)
    out = tmp_path / "m.gguf"
    assert "--quantize and --dequantize contradict" in fails(
        gptoss, "--run", run, "--format", "gguf", "--quantize", "mxfp4", "--dequantize", "--out", out
    )
    assert "--max-shard-size is for --format hf" in fails(
        gptoss, "--run", run, "--format", "gguf", "--max-shard-size", "1GB", "--out", out
    )
    assert "--dtype 'fp16': expected one of bf16, fp32" in fails(gptoss, "--run", run, "--dtype", "fp16", "--out", out)
    odd = make_run(tmp_path / "odd", builtin_tok, hidden_size=48)
    assert "must be multiples of 32" in fails(
        gptoss, "--run", odd, "--format", "gguf", "--quantize", "mxfp4", "--out", out
    )
    limit = make_run(tmp_path / "limit", builtin_tok, swiglu_limit=5.0)
    assert "llama.cpp's gpt-oss hard-codes 7" in fails(gptoss, "--run", limit, "--format", "gguf", "--out", out)
    betas = make_run(tmp_path / "betas", builtin_tok, "released", rope_ntk_beta=16.0)
    assert "uses YaRN's 32/1" in fails(gptoss, "--run", betas, "--format", "gguf", "--out", out)
    huge = make_run(tmp_path / "huge", builtin_tok)
    weights = _load(huge)
    weights["block.0.attn.out.weight"][0, 0] = 1e6
    save_file(weights, str(resolve_checkpoint(huge) / MODEL))
    assert "blk.0.attn_output.weight: a value exceeds fp16's range" in fails(
        gptoss, "--run", huge, "--format", "gguf", "--dtype", "fp16", "--out", out
    )
    assert not out.exists() and list(tmp_path.glob(".m.gguf*")) == []


def test_yarn_exports_with_a_warning_that_llama_cpp_rounds_its_range(gptoss, builtin_tok, tmp_path):
    run = make_run(tmp_path / "run", builtin_tok, "released")
    code, _, err = gptoss("export", "--run", run, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert code == 0 and "llama.cpp rounds YaRN's correction range" in " ".join(err.split())


def test_an_existing_file_is_kept_unless_forced_and_a_failure_leaves_nothing(
    gptoss, builtin_tok, tmp_path, monkeypatch
):
    run = make_run(tmp_path / "run", builtin_tok)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    assert "m.gguf exists (add --force to replace it)" in fails(gptoss, "--run", run, "--format", "gguf", "--out", out)
    assert out.read_bytes() == b"keep me"
    assert "is a directory" in fails(gptoss, "--run", run, "--format", "gguf", "--out", tmp_path)

    from gptoss_cli.errors import GptossError
    from gptoss_cli.interop import gguf_export

    def broken(t, qtype):
        if t.name.startswith("blk.1."):
            raise GptossError("disk on fire")
        return real(t, qtype)

    real = gguf_export.encode
    monkeypatch.setattr(gguf_export, "encode", broken)
    assert "disk on fire" in fails(gptoss, "--run", run, "--format", "gguf", "--out", out, "--force")
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "run"]
    monkeypatch.setattr(gguf_export, "encode", real)
    code, _, err = gptoss("export", "--run", run, "--format", "gguf", "--out", out, "--force")
    assert code == 0, err
    assert read_gguf(out)[0]["general.architecture"] == "gpt-oss"
