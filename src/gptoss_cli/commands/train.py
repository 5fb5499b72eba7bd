"""`gptoss train`: train a model from scratch (or resume one) and write a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import JsonOpt, OptionalConfigOpt, RunOpt, SetOpt


def command(
    config: OptionalConfigOpt = None,
    set_: SetOpt = None,
    run: RunOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest complete checkpoint of --run.")] = False,
    resume_from: Annotated[Path | None, typer.Option("--resume-from", help="Continue from this checkpoint "
                                                     "(a run directory or a checkpoints/step-N directory).")] = None,
    init_from: Annotated[Path | None, typer.Option("--init-from", help="Start a new run from the weights of this "
                                                   "run or checkpoint (fine-tuning; e.g. an imported model).")] = None,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Reuse this tokenizer.json.")] = None,
    json: JsonOpt = False,
) -> None:
    """Train from scratch on a text corpus (the built-in sample corpus when data.paths is empty).

    Examples: gptoss train --config tiny --run runs/demo;  gptoss train --run runs/demo --resume
    """
    from ..config import load_config
    from ..output import console, print_json
    from ..run.layout import RunDir

    if config is None:  # resuming or starting from weights: that run's config; otherwise the reference model
        source = init_from or resume_from or (run if resume else None)
        saved = RunDir.of_checkpoint(Path(source)).config if source is not None else None
        config = str(saved) if saved and saved.is_file() else "compact"
    cfg = load_config(config, set_)  # before torch is imported: a bad config fails in an instant
    from ..train.distributed import shutdown
    from ..train.loop import Trainer, prepare

    try:
        prepared = prepare(cfg, run, resume=resume, resume_from=resume_from, tokenizer_path=tokenizer,
                           init_from=init_from, progress=not json)
        summary = Trainer(prepared).run()
    finally:
        shutdown()
    if not prepared.dist.main:  # under torchrun only rank 0 reports
        return
    if json:
        print_json(summary)
        return
    best = summary["best_val_loss"]
    console.print(f"[bold]{summary['status']}[/]: {summary['steps']} steps, {summary['tokens']:,} tokens in "
                  f"{summary['elapsed_s']:.1f} s ({summary['tokens_per_s']:,.0f} tokens/s)", highlight=False)
    console.print(f"final loss {summary['final_loss']:.4f}"
                  + (f", best validation loss {best:.4f}" if best is not None else ""), highlight=False)
    console.print(f"run: {summary['run_dir']}", highlight=False, soft_wrap=True)
    console.print(f"checkpoint: {summary['checkpoint']}", highlight=False, soft_wrap=True)
