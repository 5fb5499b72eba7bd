"""`gptoss train`: train a model from scratch (or resume one) and write a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import JsonOpt, OptionalConfigOpt, RunOpt, SetOpt, ThreadsOpt


def command(
    config: OptionalConfigOpt = None,
    set_: SetOpt = None,
    run: RunOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest complete checkpoint of --run.")] = False,
    resume_from: Annotated[
        Path | None,
        typer.Option(
            "--resume-from", help="Continue from this checkpoint (a run directory or a checkpoints/step-N directory)."
        ),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="Start a new run from the weights of this run or checkpoint (fine-tuning; e.g. an imported model).",
        ),
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Reuse this tokenizer.json.")] = None,
    threads: ThreadsOpt = None,
    json: JsonOpt = False,
) -> None:
    """Train from scratch on a text corpus (the built-in sample corpus when data.paths is empty).

    Examples: gptoss train --config tiny --run runs/demo;  gptoss train --run runs/demo --resume

    Exit status: 0 finished, 2 refused (bad config or input, run locked, divergence), 130 / 143 stopped by
    Ctrl-C / SIGTERM after saving a checkpoint (summary.json says "interrupted").
    """
    from ..config import load_config
    from ..output import print_json, warn

    # Before torch is imported: a bad config fails in an instant.
    cfg = None
    if config is None:  # resuming or starting from weights: that run's config; otherwise the reference model
        source = init_from or resume_from or (run if resume else None)
        cfg = _saved_config(Path(source), set_) if source is not None else None
    default_model = config is None and cfg is None
    if cfg is None:
        cfg = load_config(config or "compact", set_)
    cfg.validate_for_training()
    if default_model:
        warn(
            "no --config: training the compact reference model (~1.4 billion parameters), which needs a GPU; "
            "for a first run on a CPU use --config tiny"
        )
    from ..threads import set_threads
    from ..train.distributed import shutdown
    from ..train.loop import Trainer, setup_training

    set_threads(threads)
    try:
        setup = setup_training(
            cfg,
            run,
            resume=resume,
            resume_from=resume_from,
            tokenizer_path=tokenizer,
            init_from=init_from,
            progress=not json,
        )
        try:
            summary = Trainer(setup).run()
        finally:
            setup.release()
    finally:
        shutdown()
    if not setup.dist.main:  # under torchrun only rank 0 reports
        return
    code = {"SIGINT": 130, "SIGTERM": 143}.get(summary.get("signal"), 0) if summary["status"] == "interrupted" else 0
    if json:
        print_json(summary)
        raise typer.Exit(code)
    _print_summary(summary)
    raise typer.Exit(code)


def _print_summary(summary: dict) -> None:
    from ..output import console

    best, final = summary["best_val_loss"], summary["final_loss"]
    rate = f"{summary['tokens_per_s']:,.0f} tokens/s"
    if summary["session_tokens"] != summary["tokens"]:  # resumed: the rate is this session's
        rate = f"this session {summary['session_tokens']:,} tokens in {summary['session_s']:.1f} s, {rate}"
    console.print(
        f"[bold]{summary['status']}[/]: {summary['steps']} steps, {summary['tokens']:,} tokens in "
        f"{summary['elapsed_s']:.1f} s ({rate})",
        highlight=False,
    )
    losses = [f"final loss {final:.4f}" if final is not None else "no step finished"]
    if best is not None:
        losses.append(f"best validation loss {best:.4f}")
    console.print(", ".join(losses), highlight=False)
    console.print(f"run: {summary['run_dir']}", highlight=False, soft_wrap=True)
    console.print(f"checkpoint: {summary['checkpoint']}", highlight=False, soft_wrap=True)


def _saved_config(source: Path, overrides: list[str] | None):
    """The config of the run that `source` (a run, its checkpoints/ folder or a step directory) belongs to,
    with `overrides` applied: its config.yaml, or for a step directory copied on its own, the config saved
    in its state.json; None when there is neither."""
    import json

    from ..config import apply_overrides, config_from_dict, load_config
    from ..run.layout import STATE, RunDir

    for candidate in (RunDir(source), RunDir(source.parent), RunDir.of_checkpoint(source)):
        if candidate.config.is_file():
            return load_config(str(candidate.config), overrides)
    try:
        saved = json.loads((source / STATE).read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        return None  # not a readable checkpoint: the trainer's own checks name the problem
    if not isinstance(saved, dict):
        return None
    return config_from_dict(apply_overrides(saved, overrides or []), str(source / STATE))
