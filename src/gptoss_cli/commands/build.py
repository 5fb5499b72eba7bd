"""`gptoss build`: turn a config into a model (on the meta device) and show its structure, counts and memory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import ConfigOpt, JsonOpt, SetOpt

ContextOpt = Annotated[
    int | None,
    typer.Option("--context", min=1, help="Tokens of context for the inference estimate (default: train.seq_len)."),
]
BuildRunOpt = Annotated[
    Path | None,
    typer.Option("--run", "--run-dir", "-r", help="Describe this run's model (its checkpoint's config) instead."),
]


def command(
    config: ConfigOpt = "compact",
    set_: SetOpt = None,
    run: BuildRunOpt = None,
    context: ContextOpt = None,
    json: JsonOpt = False,
    tree: bool = True,
) -> None:
    """Show a config's module tree, parameter counts, FLOPs per token and memory needs. Allocates nothing.

    The inference estimate gives the weights with MXFP4 experts (as released gpt-oss checkpoints are
    imported) and decoded, and the peak at --context tokens: whether a model fits before downloading it.

    Example: gptoss build --config gpt-oss-20b --context 8192
    """
    from rich.table import Table

    from ..config import load_config
    from ..output import console, print_json
    from ..sizing import GIB, describe

    cfg, holds = _run_config(run, set_) if run is not None else (load_config(config, set_), None)
    info = describe(cfg, context=context) | ({"run": str(run), "experts_stored": holds} if run is not None else {})
    if json:
        print_json(info)
        return
    if tree:
        console.print(info["module_tree"], highlight=False, soft_wrap=True)
    console.print(f"\n[bold]{cfg.name}[/]: layers {', '.join(info['layer_types'])}")
    params = Table(title="Parameters", show_header=True)
    params.add_column("part")
    params.add_column("count", justify="right")
    params.add_column("share", justify="right")
    for part, n in info["params_by_part"].items():
        params.add_row(part, f"{n:,}", f"{n / info['total_params']:.1%}")
    params.add_row("[bold]total[/]", f"[bold]{info['total_params']:,}[/]", "")
    params.add_row(
        "active per token", f"{info['active_params']:,}", f"{info['active_params'] / info['total_params']:.1%}"
    )
    console.print(params)
    console.print(f"Training FLOPs per token: {info['train_flops_per_token']:.3e} (at seq_len {info['seq_len']})")
    mem = Table(
        title=f"Memory estimate (GiB): training at batch {info['batch_size']} x {info['seq_len']}, "
        f"{info['precision']}; inference {info['inference_dtype']}"
    )
    mem.add_column("training")
    mem.add_column("GiB", justify="right")
    mem.add_column("inference")
    mem.add_column("GiB", justify="right")
    train_rows = list(info["train_memory_bytes"].items())
    infer_rows = list(info["inference_memory_bytes"].items())
    for n in range(max(len(train_rows), len(infer_rows))):
        tr = train_rows[n] if n < len(train_rows) else ("", None)
        ir = infer_rows[n] if n < len(infer_rows) else ("", None)
        mem.add_row(
            tr[0], "" if tr[1] is None else f"{tr[1] / GIB:.2f}", ir[0], "" if ir[1] is None else f"{ir[1] / GIB:.2f}"
        )
    console.print(mem)
    inf = info["inference_at_context"]
    stored = {"mxfp4": " (this run holds MXFP4 experts)", "dense": " (this run holds dense experts)"}.get(holds, "")
    console.print(
        f"Inference at {inf['context']:,} tokens, batch 1, {info['inference_dtype']}{stored}: weights "
        f"{inf['weights_mxfp4_experts'] / GIB:.2f} GiB with MXFP4 experts, {inf['weights_decoded'] / GIB:.2f} GiB "
        f"decoded; KV cache {inf['kv_cache'] / GIB:.2f} GiB; prefill transients {inf['prefill_transients'] / GIB:.2f}"
        f" GiB; estimated peak [bold]{inf['peak_mxfp4_experts'] / GIB:.2f} GiB[/] packed, "
        f"{inf['peak_decoded'] / GIB:.2f} GiB decoded",
        highlight=False,
    )
    if "lora" in info:
        _print_lora(info, holds)


def _run_config(run: Path, overrides: list[str] | None):
    """A run's config with `--set` overrides of its other sections (lora, train), and whether its checkpoint (a
    LoRA run's base) holds MXFP4 or dense experts."""
    from ..config import apply_overrides, config_from_dict
    from ..errors import GptossError
    from ..run.checkpoint import packed_weights, tensor_names
    from ..run.open import open_run

    if any(o.strip().startswith("model.") for o in overrides or []):
        raise GptossError("--set model.*: the model's shapes come from the run's checkpoint (leave --run out)")
    opened = open_run(run, need_tokenizer=False)
    cfg = config_from_dict(apply_overrides(opened.config.to_dict(), overrides or []), "--set")
    return cfg, "mxfp4" if packed_weights(tensor_names(opened.base_weights)) else "dense"


def _print_lora(info: dict, holds: str | None) -> None:
    """The LoRA run's trainable parameters and its estimated training peak (sizing.lora_training)."""
    from ..output import console
    from ..sizing import GIB

    lo, mem = info["lora"], info["lora"]["memory_bytes"]
    n = lo["trainable_params"]
    console.print(
        f"LoRA rank {lo['rank']} (alpha {lo['alpha']:g}) on {', '.join(lo['targets'])} of {lo['layers']} layers: "
        f"[bold]{n:,}[/] trainable parameters ({n / info['total_params']:.2%} of {info['total_params']:,}); "
        + ", ".join(f"{t} {c:,}" for t, c in lo["trainable_by_target"].items()),
        highlight=False,
    )
    own = mem["adapters"] + mem["gradients"] + mem["optimizer"]
    packed = f"[bold]{mem['peak_mxfp4_experts'] / GIB:.2f} GiB[/] with MXFP4 experts"
    decoded = f"{mem['peak_decoded'] / GIB:.2f} GiB decoded"
    dense_run = f"[bold]{mem['peak_decoded'] / GIB:.2f} GiB[/] (this run's experts are dense)"
    peaks = {"mxfp4": packed + " (this run's)", "dense": dense_run}
    console.print(
        f"LoRA training at batch {info['batch_size']} x {info['seq_len']}, {lo['precision']}: frozen base "
        f"{mem['base_mxfp4_experts'] / GIB:.2f} GiB with MXFP4 experts ({mem['base_decoded'] / GIB:.2f} decoded); "
        f"adapters, gradients and AdamW {own / GIB:.2f} GiB; activations {mem['activations'] / GIB:.2f} GiB; "
        f"logits {mem['logits'] / GIB:.2f} GiB; estimated peak {peaks.get(holds, packed + ', ' + decoded)} "
        "(plus ~0.5 GiB for Python and torch)",
        highlight=False,
    )
