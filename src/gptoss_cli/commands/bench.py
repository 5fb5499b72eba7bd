"""`gptoss bench`: measure training and inference speed, MFU and peak memory of a config on this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import ConfigOpt, JsonOpt, SetOpt, ThreadsOpt


def command(
    config: ConfigOpt = "tiny",
    set_: SetOpt = None,
    train: Annotated[bool, typer.Option("--train", help="Measure training only (default: both).")] = False,
    infer: Annotated[bool, typer.Option("--infer", help="Measure inference only (default: both).")] = False,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Measured training steps (median reported).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Unmeasured steps first.")] = 2,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=2, help="Tokens per decode run.")] = 32,
    decode_batch: Annotated[int, typer.Option("--decode-batch", min=1, help="The larger decode batch.")] = 8,
    threads: ThreadsOpt = None,
    compile_decode: Annotated[
        bool,
        typer.Option(
            "--compile-decode",
            help="Decode with the compiled step (as infer --compile); its compile time is not counted.",
        ),
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Measure training tokens/s (forward / backward / optimizer ms), MFU, prefill and decode tokens/s, peak memory.

    Random tokens through the trainer's model, loss and optimizer, and through generate.py's decode loop;
    warm-up excluded, medians reported. Example: gptoss bench --config tiny --json
    """
    from ..bench import run_bench
    from ..config import load_config
    from ..output import console, print_json

    cfg = load_config(config, set_)
    both = not train and not infer
    report = run_bench(
        cfg,
        train=train or both,
        infer=infer or both,
        steps=steps,
        warmup=warmup,
        new_tokens=new_tokens,
        decode_batch=decode_batch,
        threads=threads,
        compile_decode=compile_decode,
        say=lambda line: console.print(line, highlight=False),
    )
    if json:
        print_json(report)
        return
    _print_report(report)


def _print_report(report: dict) -> None:
    from ..output import console

    dev = report["device"]
    where = dev.get("gpu") or f"{dev['cpu']}, {dev['cpu_threads']} thread(s)"
    console.print(f"[bold]{report['config']}[/] on {dev['type']} ({where}), torch {dev['torch']}", highlight=False)
    if "train" in report:
        tr = report["train"]
        ms = tr["ms_per_step"]
        console.print(
            f"train ({tr['precision']}, {tr['batch_size']} x {tr['seq_len']} tokens): "
            f"{tr['tokens_per_s']:,.0f} tokens/s, {ms['total']:.1f} ms/step = forward {ms['forward']:.1f} + "
            f"backward {ms['backward']:.1f} + optimizer {ms['optimizer']:.1f}",
            highlight=False,
        )
        console.print(
            f"  MFU {tr['mfu']:.1%}: {tr['achieved_tflops']:.3g} of {tr['peak_tflops']:.3g} TFLOP/s "
            f"({tr['peak_source']}); peak memory {tr['peak_memory_bytes'] / 2**20:,.0f} MiB "
            f"({tr['memory_kind']})",
            highlight=False,
        )
    if "infer" in report:
        inf = report["infer"]
        pre = inf["prefill"]
        console.print(
            f"prefill ({inf['dtype']}, {pre['tokens']} tokens): {pre['tokens_per_s']:,.0f} tokens/s "
            f"({pre['ms']:.1f} ms)",
            highlight=False,
        )
        for d in inf["decode"]:
            console.print(
                f"decode batch {d['batch']}{' (compiled step)' if inf['compile_decode'] else ''}: "
                f"{d['tokens_per_s']:,.0f} tokens/s ({d['ms_per_step']:.2f} ms/step)",
                highlight=False,
            )
        console.print(
            f"  batch 1 at {inf['decode_batch1_of_bound']:.1%} of its bandwidth bound "
            f"({inf['decode_bound_tokens_per_s']:,.0f} tokens/s = {inf['bandwidth_gb_s']:,.0f} GB/s, "
            f"{inf['bandwidth_source']}, / {inf['active_weight_bytes'] / 2**20:,.1f} MiB of active "
            "weights)",
            highlight=False,
        )
        console.print(
            f"  peak memory {inf['peak_memory_bytes'] / 2**20:,.0f} MiB ({inf['memory_kind']})", highlight=False
        )
