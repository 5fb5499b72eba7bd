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
QuantizeOpt = Annotated[
    Literal["mxfp4"] | None,
    typer.Option("--quantize", help="gguf: store the expert matrices in MXFP4 (llama.cpp's rounding)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing --out.")]


def command(
    out: OutOpt,
    run: ReadRunOpt = None,
    fmt: FormatOpt = "hf",
    dtype: ExportDtypeOpt = "bf16",
    checkpoint: CheckpointOpt = None,
    max_shard_size: ShardOpt = None,
    quantize: QuantizeOpt = None,
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Export a run for transformers (config.json, safetensors, generation and tokenizer files) or, with
    --format gguf, as one GGUF file for llama.cpp, Ollama and LM Studio.

    Example: gptoss export --run runs/demo --out hf/demo --dtype fp32
    Then: AutoModelForCausalLM.from_pretrained("hf/demo")  (see docs/interop.md)
    Example: gptoss export --run runs/demo --format gguf --out demo.gguf
    Then: llama-completion -m demo.gguf -p "GPT models are" -no-cnv  (see docs/interop.md)
    """
    from ..errors import GptossError
    from ..output import console, print_json

    if fmt == "gguf":
        if max_shard_size is not None:
            raise GptossError("--max-shard-size is for --format hf (a GGUF export is one file)")
        from ..interop.gguf_export import export_gguf

        summary = export_gguf(run, out, dtype=dtype, checkpoint=checkpoint, quantize=quantize, force=force)
    else:
        if quantize is not None:
            raise GptossError("--quantize is for --format gguf")
        from ..interop.export import export_run

        summary = export_run(
            run, out, dtype=dtype, checkpoint=checkpoint, max_shard_size=max_shard_size or "5GB", force=force
        )
    if json:
        print_json(summary)
        return
    if fmt == "gguf":
        experts = f" (experts {summary['quantize']})" if summary["quantize"] else ""
        console.print(
            f"exported {summary['checkpoint']} (step {summary['step']}) to [bold]{summary['out']}[/]: "
            f"{summary['tensors']} tensors, {summary['bytes'] / 2**20:,.1f} MiB {summary['dtype']}{experts}, "
            f"tokenizer pre-tokenizer {summary['pre_tokenizer']}"
            + (", chat template" if summary["chat_template"] else ""),
            highlight=False,
        )
        return
    shards = [f for f in summary["files"] if f.endswith(".safetensors")]
    console.print(
        f"exported {summary['checkpoint']} (step {summary['step']}) to [bold]{summary['out']}[/]: "
        f"{summary['tensors']} tensors, {summary['bytes'] / 2**20:,.1f} MiB {summary['dtype']} "
        f"in {len(shards)} file(s)",
        highlight=False,
    )
