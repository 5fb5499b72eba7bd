"""`gptoss export --format gguf`: a run's checkpoint -> one GGUF file for llama.cpp and the tools built on it.

    OUT.gguf    architecture gpt-oss: the hyper-parameters, the tokenizer (tokenizer.ggml.*, with the
                chat template when the run has a conversation format) and every tensor, written with the
                `gguf` package (llama.cpp's own writer) in the layout of gguf_names.py

Matrices are stored in the export's dtype (fp32, bf16 or fp16); norms, biases, sinks and the router in
fp32, as the precision policy keeps them. The experts of a packed run stay MXFP4, their bytes moved into
ggml's block layout (gguf_names.ggml_mxfp4), unless `dequantize`; a dense run's are quantized to MXFP4 with
`quantize="mxfp4"`, by the same OCP MX rounding and with the same per-matrix error as the Hugging Face
export (export.convert_experts). The file is written as a hidden sibling and renamed into place, so a
failure leaves nothing half-written; tensors are converted one at a time as they are written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ..atomic import staged_file
from ..errors import GptossError
from ..output import warn
from ..run.checkpoint import packed_weights, tensor_names
from ..run.open import open_run
from .chat_template import export_chat
from .export import convert_experts, refuse_overlap, special_tokens
from .gguf_names import (
    ARCH,
    EXPERTS,
    F32,
    MATRIX,
    GgufTensor,
    check_llama_cpp,
    ggml_mxfp4,
    tensor_plan,
    write_hparams,
)
from .gguf_vocab import GgufVocab, gguf_vocab
from .lora import run_weights

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
# --dtype -> (torch dtype, GGUF tensor type, general.file_type)
DTYPES = {
    "fp32": (torch.float32, Q.F32, FT.ALL_F32),
    "bf16": (torch.bfloat16, Q.BF16, FT.MOSTLY_BF16),
    "fp16": (torch.float16, Q.F16, FT.MOSTLY_F16),
}
QUANTIZE = ("mxfp4",)
MXFP4_BLOCK = gguf.GGML_QUANT_SIZES[Q.MXFP4][0]  # values per scale, along a matrix's input dimension


@dataclass
class Encoded:
    """A tensor as GGUF stores it: `data` is what is written (raw bytes for MXFP4), `shape` its logical shape."""

    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


def encode(t: GgufTensor, qtype: gguf.GGMLQuantizationType) -> Encoded:
    """Cast one tensor to `qtype` (MXFP4 experts: repack them); a value fp16 cannot hold is refused, naming
    the tensor."""
    if t.packed is not None:
        assert qtype == Q.MXFP4
        return Encoded(t.name, qtype, t.shape, ggml_mxfp4(*t.packed()).numpy())
    x = t.get().detach()
    shape = tuple(x.shape)
    if qtype == Q.F32:
        data = x.to(torch.float32).contiguous().numpy()
    elif qtype == Q.BF16:  # numpy has no bfloat16: the bits travel as int16
        data = x.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    elif qtype == Q.F16:
        half = x.to(torch.float16)
        if not torch.isfinite(half).all() and torch.isfinite(x).all():
            raise GptossError(f"{t.name}: a value exceeds fp16's range (65504); export with --dtype bf16 or fp32")
        data = half.contiguous().numpy()
    else:  # pragma: no cover - DTYPES lists every type a dense tensor is written in
        raise ValueError(f"no encoding for {qtype.name}")
    return Encoded(t.name, qtype, shape, data)


def tensor_type(t: GgufTensor, dtype: str) -> gguf.GGMLQuantizationType:
    if t.kind == F32:
        return Q.F32
    if t.packed is not None:
        return Q.MXFP4
    assert t.kind in (MATRIX, EXPERTS)
    return DTYPES[dtype][1]


def nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def write_vocab(writer: gguf.GGUFWriter, vocab: GgufVocab, template: str | None) -> None:
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre(vocab.pre.name)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.special["bos"])
    writer.add_eos_token_id(vocab.special["eos"])
    writer.add_pad_token_id(vocab.special["pad"])
    writer.add_add_bos_token(False)  # gptoss prompts start with their own first token, as gpt-oss's do
    writer.add_add_eos_token(False)
    if template is not None:
        writer.add_chat_template(template)


def _check_options(dtype: str, quantize: str | None, dequantize: bool) -> None:
    if dtype not in DTYPES:
        raise GptossError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise GptossError(f"--quantize {quantize!r}: expected {', '.join(QUANTIZE)}")
    if quantize and dequantize:
        raise GptossError("--quantize and --dequantize contradict each other: pick one")


def export_gguf(
    run: Path | None,
    out: Path,
    dtype: str = "bf16",
    checkpoint: Path | None = None,
    quantize: str | None = None,
    dequantize: bool = False,
    force: bool = False,
) -> dict:
    """Write the GGUF file `out`; returns a summary (file, tensors, bytes, checkpoint, experts, pre-tokenizer,
    each quantized expert matrix's error)."""
    _check_options(dtype, quantize, dequantize)
    opened = open_run(run, checkpoint)
    cfg, tok = opened.config.model, opened.tokenizer
    assert tok is not None and opened.tokenizer_path is not None  # open_run requires one
    vocab = gguf_vocab(tok, cfg.vocab_size, special_tokens(tok), str(opened.tokenizer_path))
    notes = check_llama_cpp(cfg) + ([vocab.pre.caveat] if vocab.pre.caveat else [])
    packed = bool(packed_weights(tensor_names(opened.base_weights)))  # a LoRA run: its base's
    if quantize == "mxfp4" and not packed and (cfg.hidden_size % MXFP4_BLOCK or cfg.intermediate_size % MXFP4_BLOCK):
        raise GptossError(
            f"--quantize mxfp4: hidden_size {cfg.hidden_size} and intermediate_size {cfg.intermediate_size} "
            f"must be multiples of {MXFP4_BLOCK} (MXFP4 scales blocks of {MXFP4_BLOCK} inputs)"
        )
    chat = export_chat(tok, opened.run.chat_template)
    out = Path(out)
    if not out.is_dir():  # staged_file refuses a directory, saying a file is wanted
        refuse_overlap(out, opened)
    with staged_file(out, force=force) as tmp:  # refuses an existing --out before reading the weights
        decoded = torch.float32 if dtype == "fp16" else DTYPES[dtype][0]  # MXFP4 values can underflow fp16
        weights, packed, merged = run_weights(opened, not dequantize, decoded)  # a LoRA run's adapters merged
        weights, packed, errors = convert_experts(cfg, weights, packed, quantize, dequantize, decoded)
        errors |= merged
        plan = tensor_plan(cfg, weights)
        types = [tensor_type(t, dtype) for t in plan]
        writer = gguf.GGUFWriter(None, ARCH)
        writer.add_name(opened.run.path.name)
        writer.add_file_type(FT.MOSTLY_MXFP4_MOE if packed else DTYPES[dtype][2])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(writer, cfg)
        write_vocab(writer, vocab, chat["template"] if chat else None)
        for t, qtype in zip(plan, types, strict=True):
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, qtype), raw_dtype=qtype)
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t, qtype in zip(plan, types, strict=True):  # one converted tensor in memory at a time
                writer.write_tensor_data(encode(t, qtype).data)
        finally:
            writer.close()
    for note in notes:
        warn(note)
    return {
        "out": str(out),
        "checkpoint": str(opened.checkpoint),
        "step": opened.step,
        "dtype": dtype,
        "experts": "mxfp4" if packed else dtype,
        "quantization_error": errors,
        "tensors": len(plan),
        "bytes": out.stat().st_size,
        "pre_tokenizer": vocab.pre.name,
        "chat_template": chat is not None,
        "notes": notes,
    }
