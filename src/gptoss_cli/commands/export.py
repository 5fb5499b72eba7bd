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
AdapterOnlyOpt = Annotated[
    bool,
    typer.Option(
        "--adapter-only",
        help="A LoRA run: write its adapters for PEFT (adapter_config.json, adapter_model.safetensors) "
        "instead of the merged model.",
    ),
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
    adapter_only: AdapterOnlyOpt = False,
    json: JsonOpt = False,
) -> None:
    """Export a run for transformers (config.json, safetensors, generation and tokenizer files) or, with
    --format gguf, as one GGUF file for llama.cpp, Ollama and LM Studio.

    A run with MXFP4 experts is written MXFP4, byte for byte, unless --dequantize. A LoRA run is written
    merged into its base (MXFP4 experts packed again, the error reported, unless --dequantize), or its
    adapters alone for PEFT with --adapter-only.

    Example: gptoss export --run runs/demo --out hf/demo --dtype fp32
    Then: AutoModelForCausalLM.from_pretrained("hf/demo")  (see docs/interop.md)
    Example: gptoss export --run runs/demo --format gguf --out demo.gguf
    Then: llama-completion -m demo.gguf -p "GPT models are" -no-cnv  (see docs/interop.md)
    """
    from ..errors import GptossError
    from ..output import console, print_json

    options = dict(dtype=dtype, checkpoint=checkpoint, quantize=quantize, dequantize=dequantize, force=force)
    if fmt == "gguf":
        if max_shard_size is not None or adapter_only:
            flag = "--adapter-only" if adapter_only else "--max-shard-size"
            raise GptossError(f"{flag} is for --format hf (a GGUF export is one file)")
        from ..interop.gguf_export import export_gguf

        summary = export_gguf(run, out, **options)
    else:
        from ..interop.export import export_run

        summary = export_run(run, out, max_shard_size=max_shard_size or "5GB", adapter_only=adapter_only, **options)
    if json:
        print_json(summary)
        return
    if summary.get("adapter"):
        console.print(
            f"exported the LoRA adapters of {summary['checkpoint']} (step {summary['step']}) for PEFT to "
            f"[bold]{summary['out']}[/]: {summary['tensors']} tensors, {summary['bytes'] / 2**20:,.1f} MiB fp32; "
            f"their base is {summary['lora_base']} (export it without --adapter-only from that run)",
            highlight=False,
        )
        return
    if summary.get("lora_base"):
        console.print(f"LoRA adapters merged into the weights of {summary['lora_base']}", highlight=False)
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
        _report_lost_update(summary["quantization_error"])


def _report_lost_update(errors: dict) -> None:
    """Merged LoRA experts packed again: how much of the adapters' update the MXFP4 rounding kept."""
    from ..output import console, warn

    lost = {n: e["update_relative_rms"] for n, e in errors.items() if "update_relative_rms" in e}
    if not lost:
        return
    mean = sum(lost.values()) / len(lost)
    console.print(
        f"the MXFP4 rounding moves the merged experts by {mean:.2f}x their LoRA update (mean "
        "||Q(W + dW) - (W + dW)|| / ||dW|| over the adapted matrices)",
        highlight=False,
    )
    if mean > 0.5:
        warn(
            "packed again, the experts keep little of what the adapters learned: export with --dequantize "
            "(bf16 experts), or --adapter-only to apply the adapters with PEFT on the packed base"
        )
