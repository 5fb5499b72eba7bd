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


def command(
    out: OutOpt,
    run: ReadRunOpt = None,
    dtype: ExportDtypeOpt = "bf16",
    checkpoint: CheckpointOpt = None,
    max_shard_size: ShardOpt = "5GB",
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Export a run for transformers: config.json, safetensors, generation and tokenizer files.

    Example: gptoss export --run runs/demo --out hf/demo --dtype fp32
    Then: AutoModelForCausalLM.from_pretrained("hf/demo")  (see docs/interop.md)
    """
    from ..interop.export import export_run
    from ..output import console, print_json

    summary = export_run(run, out, dtype=dtype, checkpoint=checkpoint, max_shard_size=max_shard_size, force=force)
    if json:
        print_json(summary)
        return
    shards = [f for f in summary["files"] if f.endswith(".safetensors")]
    console.print(
        f"exported {summary['checkpoint']} (step {summary['step']}) to [bold]{summary['out']}[/]: "
        f"{summary['tensors']} tensors, {summary['bytes'] / 2**20:,.1f} MiB {summary['dtype']} "
        f"in {len(shards)} file(s)",
        highlight=False,
    )
