"""`gptoss export`: write a run's checkpoint as a Hugging Face `GptOssForCausalLM` directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from .options import CheckpointOpt, JsonOpt, ReadRunOpt

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="The Hugging Face directory to write.")]
ExportDtypeOpt = Annotated[
    Literal["bf16", "fp32"], typer.Option("--dtype", help="bf16 (norms and router stay fp32) or fp32 (exact).")
]
ShardOpt = Annotated[
    str,
    typer.Option(
        "--max-shard-size",
        help="Split model.safetensors above this size (5GB, 500MB, 2GiB), with model.safetensors.index.json.",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")]
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


def command(
    out: OutOpt,
    run: ReadRunOpt = None,
    dtype: ExportDtypeOpt = "bf16",
    checkpoint: CheckpointOpt = None,
    max_shard_size: ShardOpt = "5GB",
    force: ForceOpt = False,
    quantize: QuantizeOpt = None,
    dequantize: DequantizeOpt = False,
    adapter_only: AdapterOnlyOpt = False,
    json: JsonOpt = False,
) -> None:
    """Export a run for transformers: config.json, safetensors, generation and tokenizer files.

    A run with MXFP4 experts is written MXFP4, byte for byte, unless --dequantize. A LoRA run is written
    merged into its base (MXFP4 experts packed again, the error reported, unless --dequantize), or its
    adapters alone for PEFT with --adapter-only.

    Example: gptoss export --run runs/demo --out hf/demo --dtype fp32
    Then: AutoModelForCausalLM.from_pretrained("hf/demo")  (see docs/interop.md)
    """
    from ..interop.export import export_run
    from ..output import console, print_json

    summary = export_run(
        run,
        out,
        dtype=dtype,
        checkpoint=checkpoint,
        max_shard_size=max_shard_size,
        force=force,
        quantize=quantize,
        dequantize=dequantize,
        adapter_only=adapter_only,
    )
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
    shards = [f for f in summary["files"] if f.endswith(".safetensors")]
    if summary["lora_base"]:
        console.print(f"LoRA adapters merged into the weights of {summary['lora_base']}", highlight=False)
    console.print(
        f"exported {summary['checkpoint']} (step {summary['step']}) to [bold]{summary['out']}[/]: "
        f"{summary['tensors']} tensors, {summary['bytes'] / 2**20:,.1f} MiB {summary['dtype']} "
        f"(experts {summary['experts']}) in {len(shards)} file(s)",
        highlight=False,
    )
    errors = summary["quantization_error"]
    if errors:
        worst = max(errors, key=lambda n: errors[n]["relative_rms"])
        mean = sum(e["relative_rms"] for e in errors.values()) / len(errors)
        console.print(
            f"MXFP4 quantisation error ||W - Q(W)|| / ||W||: mean {mean:.4f} over {len(errors)} expert matrices, "
            f"largest {errors[worst]['relative_rms']:.4f} ({worst}); --json lists each",
            highlight=False,
        )
    _report_lost_update(errors)


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
