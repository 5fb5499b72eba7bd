"""Serving under load: N concurrent streaming clients against `gptoss serve` on 127.0.0.1.

Each client sends `--requests` streaming completions one after another (greedy, `--max-tokens` each,
prompts taken in turn from a fixed list) and timestamps every server-sent event. Reported per server and
client count: total generated tokens/s (all clients' tokens over the wall time), time to first token
p50/p99 and inter-token latency p50/p99, a request's (last event - first event) / (tokens - 1), which
a client that reads several events in one go (a busy machine) does not distort as single gaps would.

Servers, one at a time, each in its own process on a free port:
- `gptoss serve` (continuous batching, --max-batch 16);
- `gptoss serve --max-batch 1`: the same server decoding one request at a time, the no-batching baseline;
- `transformers serve` on the same weights exported with `gptoss export` (fp32), when it starts here
  (it needs the `accelerate` package, which gptoss does not depend on: the reason is printed otherwise).
The batch-1 decode speed of `gptoss infer` is printed beside them, as the latency a lone client should match.

    uv run python benchmarks/serve_load.py --run runs/tiny --clients 1,4,16 --requests 2 --max-tokens 32

A benchmark, not a test: numbers depend on the machine; docs/serve.md records one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package is built on
import numpy as np

from gptoss_cli.bench import cpu_name

PROMPTS = [
    "Once upon a time",
    "The expert router",
    "In the beginning the model",
    "A sliding window of keys",
    "Language models are",
    "The cache holds",
    "Every token goes to",
    "Attention sinks keep",
]
GPTOSS = [sys.executable, "-c", "from gptoss_cli.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A server subprocess; `ready()` waits for GET /health (or /v1/models) to answer."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str]):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err, env=env)

    def ready(self, timeout: float = 300) -> str | None:
        """None when up, else why not (the last line of its stderr)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.err.seek(0)
                lines = [x for x in self.err.read().decode(errors="replace").splitlines() if x.strip()]
                return lines[-1] if lines else f"exited {self.proc.returncode}"
            for path in ("/health", "/v1/models"):
                try:
                    if httpx.get(self.url + path, timeout=1).status_code == 200:
                        return None
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        return f"not up after {timeout:.0f} s"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.err.close()


async def one_client(
    client: httpx.AsyncClient, url: str, model: str, first: int, requests: int, max_tokens: int, out: list[dict]
) -> None:
    for r in range(requests):
        body = {
            "model": model,
            "prompt": PROMPTS[(first + r) % len(PROMPTS)],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        times, usage = [], None
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
                if any(c.get("text") for c in event.get("choices", [])):
                    times.append(time.perf_counter())
        tokens = usage if usage is not None else len(times)
        itl = (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else None
        out.append({"ttft": times[0] - start if times else None, "itl": itl, "tokens": tokens})


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    out: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one_client(client, url, model, i, requests, max_tokens, out) for i in range(clients)))
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in out if r["ttft"] is not None]
    itl = [r["itl"] for r in out if r["itl"] is not None]
    tokens = sum(r["tokens"] for r in out)

    def pct(xs, q):
        return float(np.percentile(xs, q) * 1e3) if xs else float("nan")

    return {
        "clients": clients,
        "requests": len(out),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50),
        "itl_p99_ms": pct(itl, 99),
    }


def bench_server(name: str, cmd: list[str], port: int, model: str, args, env) -> tuple[list[dict], str | None]:
    server = Process(cmd, port, env)
    try:
        why = server.ready()
        if why is not None:
            return [], why
        asyncio.run(load(server.url, model, 1, 1, 4))  # warm-up: first-call allocations, lazy imports
        rows = []
        for clients in args.clients:
            row = asyncio.run(load(server.url, model, clients, args.requests, args.max_tokens))
            rows.append({"server": name, **row})
            print(
                f"{name:28s} {clients:3d} clients  {row['tokens_per_s']:8.1f} tok/s  "
                f"TTFT p50 {row['ttft_p50_ms']:7.1f} p99 {row['ttft_p99_ms']:7.1f} ms  "
                f"ITL p50 {row['itl_p50_ms']:6.1f} p99 {row['itl_p99_ms']:6.1f} ms",
                file=sys.stderr,
                flush=True,
            )
        return rows, None
    finally:
        server.stop()


def infer_decode_speed(run: str, max_tokens: int, env) -> float | None:
    """`gptoss infer`'s own batch-1 decode tokens/s (from its summary line), greedy, same length."""
    done = subprocess.run(
        [*GPTOSS, "infer", PROMPTS[0], "-n", str(max_tokens), "-t", "0", "--run", run, "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
    )
    match = re.search(r"decode ([\d.]+) tokens/s", done.stderr)
    return float(match.group(1)) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="A trained run directory.")
    parser.add_argument("--clients", default="1,4,16", help="Comma-separated concurrent client counts.")
    parser.add_argument("--requests", type=int, default=2, help="Requests each client sends, one after another.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="Torch threads in each server (default: all).")
    parser.add_argument("--no-transformers", action="store_true", help="Skip `transformers serve`.")
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON on stdout.")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    model = Path(args.run).resolve().name
    print(
        f"CPU {cpu_name()}, {os.cpu_count()} cores; {args.requests} requests x {args.max_tokens} tokens per client",
        file=sys.stderr,
    )

    rows, skipped = [], {}
    for name, extra in (("gptoss serve", ["--max-batch", "16"]), ("gptoss serve --max-batch 1", ["--max-batch", "1"])):
        port = free_port()
        cmd = [
            *GPTOSS,
            "serve",
            "--run",
            args.run,
            "--port",
            str(port),
            "--device",
            "cpu",
            "--max-queue",
            "256",
            *extra,
        ]
        got, why = bench_server(name, cmd, port, model, args, env)
        rows += got
        if why:
            skipped[name] = why
    if not args.no_transformers:
        with tempfile.TemporaryDirectory() as tmp:
            hf = Path(tmp) / model
            subprocess.run(
                [*GPTOSS, "export", "--run", args.run, "--out", str(hf), "--dtype", "fp32"],
                check=True,
                capture_output=True,
                env=env,
            )
            port = free_port()
            cmd = [
                sys.executable,
                "-c",
                "import sys; from transformers.cli.transformers import main; sys.exit(main())",
                "serve",
                "--device",
                "cpu",
                "--port",
                str(port),
                str(hf),
            ]
            got, why = bench_server("transformers serve", cmd, port, str(hf), args, env)
            rows += got
            if why:
                skipped["transformers serve"] = why
    decode = infer_decode_speed(args.run, args.max_tokens, env)
    if decode:
        print(f"gptoss infer batch 1: decode {decode:.1f} tokens/s = {1e3 / decode:.1f} ms per token", file=sys.stderr)
    for name, why in skipped.items():
        print(f"{name}: did not run: {why}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {"cpu": cpu_name(), "rows": rows, "skipped": skipped, "infer_decode_tokens_per_s": decode}, indent=2
            )
        )


if __name__ == "__main__":
    main()
