"""`gptoss import`: turn a Hugging Face gpt_oss directory (or openai's original/ layout) into a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import JsonOpt, NewRunOpt

SourceArg = Annotated[
    Path,
    typer.Argument(
        help="A Hugging Face gpt_oss directory (config.json + safetensors), or a release's original/ directory.",
        show_default=False,
    ),
]


DequantizeOpt = Annotated[
    bool,
    typer.Option(
        "--dequantize", help="Decode MXFP4 experts to bf16 (exact; about 3x the memory) instead of keeping them packed."
    ),
]


def command(source: SourceArg, run: NewRunOpt, dequantize: DequantizeOpt = False, json: JsonOpt = False) -> None:
    """Import released or exported gpt-oss weights (bf16, fp32 or MXFP4; sharded or not) as step 0 of a run.

    MXFP4 experts stay packed (infer, chat, serve, eval and export decode them as they are used).

    Example: gptoss import ~/models/gpt-oss-20b --run runs/gpt-oss-20b
    Then: gptoss infer "Hello" --run runs/gpt-oss-20b
    """
    from ..interop.import_ import import_dir
    from ..output import console, print_json

    summary = import_dir(source, run, dequantize=dequantize)
    if json:
        print_json(summary)
        return
    quant = ""
    if summary["quantized_tensors"]:
        kept = "kept packed" if summary["experts"] == "mxfp4" else "decoded to bf16"
        quant = f", {summary['quantized_tensors']} MXFP4 tensors {kept}"
    quant += ", its chat template kept" if summary["chat_template"] else ""
    console.print(
        f"imported {source} ({summary['layout']} layout{quant}): {summary['params']:,} parameters, "
        f"{summary['bytes'] / 2**30:.2f} GiB -> [bold]{summary['checkpoint']}[/]",
        highlight=False,
    )
