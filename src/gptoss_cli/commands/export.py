"""`gptoss export`: write a run's checkpoint as a Hugging Face `GptOssForCausalLM` directory or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from .options import CheckpointOpt, JsonOpt, ReadRunOpt

OutOpt = Annotated[
    Path,
    typer.Option("--out", "-o", help="The Hugging Face directory (--format hf) or the .gguf file (gguf) to write."),
]
FormatOpt = Annotated[
    Literal["hf", "gguf"],
    typer.Option("--format", help="hf: a transformers directory; gguf: one file for llama.cpp and Ollama."),
]
ExportDtypeOpt = Annotated[
    Literal["bf16", "fp32", "fp16"],
    typer.Option("--dtype", help="bf16 (norms and router stay fp32), fp32 (exact), or fp16 (gguf only)."),
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--max-shard-size",
        help="hf: split model.safetensors above this size (default 5GB; 500MB, 2GiB), with an index file.",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing --out.")]
QuantizeOpt = Annotated[
    Literal["mxfp4"] | None,
    typer.Option("--quantize", help="Pack the experts of a bf16/fp32 run as MXFP4 (OCP MX rounding; error reported)."),
]
DequantizeOpt = Annotated[
    bool, typer.Option("--dequantize", help="Write a packed run's MXFP4 experts decoded, in --dtype.")
]


def _print_quantization_error(errors: dict) -> None:
    from ..output import console

    worst = max(errors, key=lambda n: errors[n]["relative_rms"])
    mean = sum(e["relative_rms"] for e in errors.values()) / len(errors)
    console.print(
        f"MXFP4 quantisation error ||W - Q(W)|| / ||W||: mean {mean:.4f} over {len(errors)} expert matrices, "
        f"largest {errors[worst]['relative_rms']:.4f} ({worst}); --json lists each",
        highlight=False,
    )


def command(
    out: OutOpt,
    run: ReadRunOpt = None,
    fmt: FormatOpt = "hf",
    dtype: ExportDtypeOpt = "bf16",
    checkpoint: CheckpointOpt = None,
    max_shard_size: ShardOpt = None,
    force: ForceOpt = False,
    quantize: QuantizeOpt = None,
    dequantize: DequantizeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Export a run for transformers (config.json, safetensors, generation and tokenizer files) or, with
    --format gguf, as one GGUF file for llama.cpp, Ollama and LM Studio.

    A run with MXFP4 experts is written MXFP4, byte for byte, unless --dequantize.

    Example: gptoss export --run runs/demo --out hf/demo --dtype fp32
    Then: AutoModelForCausalLM.from_pretrained("hf/demo")  (see docs/interop.md)
    Example: gptoss export --run runs/demo --format gguf --out demo.gguf
    Then: llama-completion -m demo.gguf -p "GPT models are" -no-cnv  (see docs/interop.md)
    """
    from ..errors import GptossError
    from ..output import console, print_json

    options = dict(dtype=dtype, checkpoint=checkpoint, quantize=quantize, dequantize=dequantize, force=force)
    if fmt == "gguf":
        if max_shard_size is not None:
            raise GptossError("--max-shard-size is for --format hf (a GGUF export is one file)")
        from ..interop.gguf_export import export_gguf

        summary = export_gguf(run, out, **options)
    else:
        from ..interop.export import export_run

        summary = export_run(run, out, max_shard_size=max_shard_size or "5GB", **options)
    if json:
        print_json(summary)
        return
    where = f"exported {summary['checkpoint']} (step {summary['step']}) to [bold]{summary['out']}[/]"
    size = f"{summary['tensors']} tensors, {summary['bytes'] / 2**20:,.1f} MiB {summary['dtype']}"
    if fmt == "gguf":
        chat = ", chat template" if summary["chat_template"] else ""
        tail = f"tokenizer pre-tokenizer {summary['pre_tokenizer']}{chat}"
        console.print(f"{where}: {size} (experts {summary['experts']}), {tail}", highlight=False)
    else:
        shards = [f for f in summary["files"] if f.endswith(".safetensors")]
        console.print(f"{where}: {size} (experts {summary['experts']}) in {len(shards)} file(s)", highlight=False)
    if summary["quantization_error"]:
        _print_quantization_error(summary["quantization_error"])
