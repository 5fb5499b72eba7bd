"""`gptoss build`: turn a config into a model (on the meta device) and show its structure, counts and memory."""

from __future__ import annotations

from .options import ConfigOpt, JsonOpt, SetOpt


def command(config: ConfigOpt = "compact", set_: SetOpt = None, json: JsonOpt = False, tree: bool = True) -> None:
    """Show a config's module tree, parameter counts, FLOPs per token and memory needs. Allocates nothing.

    Example: gptoss build --config gpt-oss-120b
    """
    from rich.table import Table

    from ..config import load_config
    from ..output import console, print_json
    from ..sizing import GIB, describe

    cfg = load_config(config, set_)
    info = describe(cfg)
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
