"""`gptoss env`: is this machine ready to train? Works (and exits 0) on CPU-only machines too."""

from __future__ import annotations

from .options import JsonOpt


def command(json: JsonOpt = False) -> None:
    """Check Python, torch/CUDA, GPUs (via NVML), nvidia-smi, nvcc, attention and MoE backends, the MXFP4
    expert path, torch.compile.

    The report goes to stdout (gptoss env > env.txt).

    Example: gptoss env --json
    """
    from rich.table import Table

    from ..envinfo import collect
    from ..output import print_json, report_console

    info = collect()
    if json:
        print_json(info)
        return

    def yes(flag: bool) -> str:
        return "[green]yes[/]" if flag else "[red]no[/]"

    console = report_console()  # the report is the command's output: stdout, so it can be saved or piped
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_row("python", info["python"])
    table.add_row("platform", info["platform"])
    table.add_row("torch", f"{info['torch']} (CUDA build: {info['torch_cuda_build'] or 'none'})")
    table.add_row("CUDA available", yes(info["cuda_available"]))
    table.add_row("GPUs", str(info["gpu_count"]))
    for tool in ("nvidia_smi", "nvcc"):
        t = info[tool]
        table.add_row(
            tool.replace("_", "-"),
            f"{t['path']} ({t['version'] or 'version unknown'})" if t["found"] else "[dim]not found[/]",
        )
    table.add_row("NVML", info["nvml"])
    table.add_row("attention", ", ".join(f"{k} {yes(v)}" for k, v in info["attention_backends"].items()))
    table.add_row("MoE", ", ".join(f"{k} {yes(v)}" for k, v in info["moe_backends"].items()))
    mx = info["mxfp4_experts"]
    table.add_row(
        "MXFP4 experts", f"{yes(mx['works'])} on {mx['device']}: {mx['path']}; fused kernel: {mx['fused_kernel']}"
    )
    table.add_row("torch.compile", f"{yes(info['compile']['available'])} ({info['compile']['why']})")
    table.add_row("CPU threads", str(info["cpu_threads"]))
    console.print(table)
    if info["gpus"]:
        gpus = Table(title="GPUs")
        for col in ("index", "name", "memory used / total (GiB)", "driver", "compute", "bf16"):
            gpus.add_column(col)
        for g in info["gpus"]:
            gpus.add_row(
                str(g["index"]),
                g["name"],
                f"{g['memory_used_gib']} / {g['memory_total_gib']}",
                g["driver"],
                g["compute_capability"],
                yes(g["bf16"]),
            )
        console.print(gpus)
    color = "green" if info["ready"] else "yellow"
    console.print(f"[bold {color}]{info['verdict']}[/]")
