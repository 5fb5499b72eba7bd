"""`gptoss serve`: an OpenAI-compatible HTTP server for a trained run, with continuous batching."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import CheckpointOpt, DeviceOpt, DtypeOpt, ReadRunOpt, ThreadsOpt

HostOpt = Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")]
PortOpt = Annotated[int, typer.Option("--port", help="TCP port.")]
BatchOpt = Annotated[int, typer.Option("--max-batch", help="Requests decoded together (KV-cache slots).")]
QueueOpt = Annotated[int, typer.Option("--max-queue", help="Requests that may wait for a slot; more get 429.")]
LengthOpt = Annotated[
    int | None,
    typer.Option("--max-length", help="Prompt + completion tokens per request (default: the model's context)."),
]
ChunkOpt = Annotated[int, typer.Option("--prefill-chunk", help="Prompt tokens prefilled per decode step.")]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="GPTOSS_API_KEY",
        show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every request.",
    ),
]
HealthKeyOpt = Annotated[
    bool, typer.Option("--health-needs-key", help="Ask the API key on /health too (by default it is open).")
]
NameOpt = Annotated[
    str | None, typer.Option("--model-name", help="Model id clients ask for (default: the run directory's name).")
]
DrainOpt = Annotated[float, typer.Option("--drain-timeout", help="Seconds SIGTERM waits for requests in flight.")]
CompileOpt = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="Compile the decode step (torch.compile, once at start-up) or not. Default: compiled, timed "
        "against eager decoding, and kept when faster; the start-up line says which runs.",
    ),
]
BodyOpt = Annotated[
    str, typer.Option("--max-body", help="Largest request body (4MiB, 500KB, bytes); a larger one gets 413.")
]


def command(
    run: ReadRunOpt = None,
    checkpoint: CheckpointOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    max_batch: BatchOpt = 16,
    max_queue: QueueOpt = 64,
    max_length: LengthOpt = None,
    prefill_chunk: ChunkOpt = 256,
    api_key: KeyOpt = None,
    health_needs_key: HealthKeyOpt = False,
    model_name: NameOpt = None,
    drain_timeout: DrainOpt = 30.0,
    max_body: BodyOpt = "4MiB",
    compile: CompileOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Serve a trained run over the OpenAI HTTP API (completions, chat completions, streaming).

    Example: gptoss serve --run runs/demo --port 8000, then point the openai client at
    http://127.0.0.1:8000/v1 with the run directory's name as the model.
    """
    from ..serve.server import ServeOptions, serve
    from ..sizes import parse_size
    from ..threads import set_threads

    set_threads(threads)
    options = ServeOptions(
        host=host,
        port=port,
        max_batch=max_batch,
        max_queue=max_queue,
        max_length=max_length,
        prefill_chunk=prefill_chunk,
        api_key=api_key,
        health_needs_key=health_needs_key,
        model_name=model_name,
        drain_s=drain_timeout,
        max_body=parse_size(max_body, "--max-body"),
        compile=compile,
    )
    serve(Path(run) if run else None, checkpoint, options, device=device, dtype=dtype)
