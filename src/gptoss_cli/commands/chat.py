"""`gptoss chat`: talk with a run fine-tuned on conversations; replies stream to stdout, notices to stderr."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import (
    CheckpointOpt,
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    JsonLinesOpt,
    PenaltyOpt,
    ReadRunOpt,
    SeedOpt,
    StopOpt,
    TemperatureOpt,
    ThreadsOpt,
    TokensOpt,
    TopKOpt,
    TopPOpt,
)

SystemOpt = Annotated[str | None, typer.Option("--system", help="The system message (/system TEXT changes it).")]


def command(
    run: ReadRunOpt = None,
    checkpoint: CheckpointOpt = None,
    system: SystemOpt = None,
    max_new_tokens: TokensOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    repetition_penalty: PenaltyOpt = None,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    compile: CompileOpt = None,
    json: JsonLinesOpt = False,
) -> None:
    """Chat with a run in its conversation format (default: the newest run under ./runs).

    From a terminal: an interactive prompt; /reset, /system TEXT, /exit; Ctrl-C stops a reply.

    From a pipe: one user message per line in, one reply per line out.

    Sampling defaults come from the run's infer section; options override them.

    Example: gptoss chat --run runs/demo-chat --system "You are terse."
    """
    from ..chat.open import open_chat
    from ..chat.session import run_chat
    from ..threads import set_threads

    set_threads(threads)
    session = open_chat(
        run=run,
        checkpoint=checkpoint,
        system=system,
        device=device,
        dtype=dtype,
        compile=compile,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
    )
    raise typer.Exit(run_chat(session, as_json=json))
