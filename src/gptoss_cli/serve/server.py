"""`gptoss serve` as one call: load the run, start the decode loop, listen on a socket with uvicorn.

SIGTERM and Ctrl-C drain (exit 0): the listening socket closes, requests in flight (queued ones too) finish
within `drain_s`; then the decode loop stops and answers whatever is left with a 503 (an error event in
a stream), and the process exits 0. uvicorn cancels any response still open a few seconds later.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import GptossError
from .limits import DEFAULT_MAX_BODY

FINAL_WRITES_S = 3.0  # after the drain, time for the answers of stopped requests to go out


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_queue: int = 64
    max_length: int | None = None  # per-request context (prompt + completion); default the model's
    prefill_chunk: int = 256
    api_key: str | None = None
    health_needs_key: bool = False  # /health is open by default: load balancers' checks carry no key
    model_name: str | None = None
    drain_s: float = 30.0
    max_body: int = DEFAULT_MAX_BODY  # bytes of one request body
    compile: bool | None = None  # the decode step: compiled, eager, or None: whichever is faster (compiled.py)

    def validate(self) -> None:
        checks = [
            (self.max_batch >= 1, f"--max-batch must be >= 1, got {self.max_batch}"),
            (self.max_queue >= 1, f"--max-queue must be >= 1, got {self.max_queue}"),
            (self.max_length is None or self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}"),
            (self.prefill_chunk >= 1, f"--prefill-chunk must be >= 1, got {self.prefill_chunk}"),
            (0 <= self.port < 65536, f"--port must be in 0..65535, got {self.port}"),
            (self.drain_s >= 0, f"--drain-timeout must be >= 0, got {self.drain_s}"),
            (self.api_key is None or self.api_key.strip() != "", "--api-key must not be empty"),
            (self.max_body >= 1024, f"--max-body must be at least 1024 bytes, got {self.max_body}"),
        ]
        for ok, message in checks:
            if not ok:
                raise GptossError(message)


def serve(
    run: Path | None, checkpoint: Path | None, options: ServeOptions, device: str = "auto", dtype: str = "auto"
) -> None:
    import uvicorn

    from ..data.chat_format import chat_format
    from ..data.conversations import chat_status
    from ..data.tokenizer import EOS
    from ..output import console, warn
    from ..run.open import load_run
    from ..threads import describe
    from .app import Served, create_app
    from .engine import Engine

    options.validate()
    if options.api_key is None and not _is_loopback(options.host):
        warn(
            f"--host {options.host} without an API key: anyone who can reach this port can use the model; "
            "set --api-key (or GPTOSS_API_KEY), or keep the default 127.0.0.1 behind a reverse proxy"
        )
    listener = _listen(options.host, options.port)  # before loading: a busy port fails fast
    loaded = load_run(run, checkpoint, device, dtype)  # the one place the server opens a run
    ctx = loaded.config.model.max_context_length
    if options.max_length is not None and options.max_length > ctx:
        raise GptossError(f"--max-length {options.max_length} exceeds the model's context ({ctx} tokens)")
    if options.compile is not False:
        console.print(
            "serve: compiling the decode step and timing it against eager decoding (inductor caches the "
            "compiled step for later starts; --no-compile skips this)",
            markup=False,
            highlight=False,
        )
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        eos_id=loaded.tokenizer.token_to_id(EOS),
        max_batch=options.max_batch,
        max_queue=options.max_queue,
        max_length=options.max_length,
        prefill_chunk=options.prefill_chunk,
        compile=options.compile,
    )
    fmt = chat_format(loaded.tokenizer, loaded.run.chat_template)  # None: completions only, chat answers 400
    # What a request leaves out: the run's infer section, but a seed and stop strings only when the request
    # gives them (as the OpenAI API: no seed, fresh randomness).
    defaults = dataclasses.replace(loaded.config.infer, seed=None, stop=[])
    name = options.model_name or loaded.run.path.resolve().name
    served = Served(engine, loaded.tokenizer, model_name=name, defaults=defaults, chat_format=fmt)
    app = create_app(served, options.api_key, options.max_body, options.health_needs_key)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=options.drain_s + FINAL_WRITES_S,
    )
    host, port = listener.getsockname()[:2]
    console.print(
        f"serving {name} ({loaded.checkpoint.name} on {loaded.device.type}) at http://{host}:{port}/v1 | "
        f"max batch {options.max_batch} | context {engine.max_length} | chat {chat_status(fmt, loaded)}"
        f" | decode {engine.decode_choice}"
        f"{' | API key required' if options.api_key else ''} | {describe()}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    server = _draining_server(config, lambda: engine.stop(), options.drain_s)
    server.run(sockets=[listener])
    if server.started is False:
        raise GptossError("the server did not start (see the message above)")
    console.print("serve: stopped", markup=False, highlight=False)
    sys.stderr.flush()


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: only "localhost" is known to stay on this machine
        return host == "localhost"


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise GptossError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def _draining_server(config, stop_engine, drain_s: float):
    """A uvicorn.Server whose SIGTERM or Ctrl-C drains: after `drain_s` the engine stops (what still runs
    is answered with an error, so responses end cleanly), and the process returns normally (exit 0)
    instead of re-raising the signal after shutdown, as uvicorn does by default."""
    import uvicorn

    class Server(uvicorn.Server):
        timer: threading.Timer | None = None

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            if sig in (signal.SIGTERM, signal.SIGINT) and sig in self._captured_signals:
                self._captured_signals.remove(sig)
            if self.timer is None:
                self.timer = threading.Timer(drain_s, stop_engine)
                self.timer.daemon = True
                self.timer.start()

    return Server(config)
