"""Serving under load: N concurrent streaming clients against `gptoss serve` on 127.0.0.1.

Each client sends `--requests` streaming completions one after another (greedy, `--max-tokens` each,
prompts taken in turn from a fixed list) and timestamps every server-sent event. Reported per server and
client count: total generated tokens/s (all clients' tokens over the wall time), time to first token
p50/p99 and inter-token latency p50/p99, a request's (last event - first event) / (tokens - 1), which
a client that reads several events in one go (a busy machine) does not distort as single gaps would.

The servers, each in its own process on a free port, with one torch thread each by default (--threads):
- `gptoss serve` (continuous batching, --max-batch 16);
- `transformers serve --continuous-batching`, the peer, on the same weights exported with `gptoss export`
  (fp32; it needs the `accelerate` package, a dev dependency: the reason is printed when it does not start).
Both are started first and stay up; then `--rounds` alternating rounds (gptoss, transformers, gptoss, ...)
each measure every client count on one server while the other idles, so both see the machine's load at
about the same time. Reported: each row, the medians over rounds, and per client count the median over
rounds of the ratio gptoss / transformers (tokens/s and TTFT p50), each round's pair measured back to back.
With --eager-too, `gptoss serve --no-compile` (eager decode steps) takes its turn in the same rounds: by
default the server compiles its decode step and keeps it when a timed step is faster. With --baselines,
one more round measures `gptoss serve --max-batch 1` (the same server decoding one
request at a time) and `transformers serve` without continuous batching. The batch-1 decode speed of
`gptoss infer` is printed beside them, as the latency a lone client should match.

    uv run python benchmarks/serve_load.py --run runs/tiny --clients 1,4,16 --requests 2 --max-tokens 32 --rounds 3

A benchmark, not a test: numbers depend on the machine; docs/performance.md records one run.
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
EAGER = "gptoss serve --no-compile"


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


class Server:
    """One server under test: its command (started on a free port), the model id clients ask for."""

    def __init__(self, name: str, cmd: list[str], model: str):
        self.name, self.cmd, self.model = name, cmd, model
        self.port = free_port()
        self.process: Process | None = None

    def start(self, env) -> str | None:
        """Start it and warm it up (first-call allocations, lazy imports); None when up, else why not."""
        self.process = Process([*self.cmd, "--port", str(self.port)], self.port, env)
        why = self.process.ready()
        if why is None:
            asyncio.run(load(self.process.url, self.model, 1, 1, 4))
            asyncio.run(load(self.process.url, self.model, 4, 1, 4))
        return why

    def measure(self, clients: int, args) -> dict:
        row = asyncio.run(load(self.process.url, self.model, clients, args.requests, args.max_tokens))
        print(
            f"{self.name:42s} {clients:3d} clients  {row['tokens_per_s']:8.1f} tok/s  "
            f"TTFT p50 {row['ttft_p50_ms']:7.1f} p99 {row['ttft_p99_ms']:7.1f} ms  "
            f"ITL p50 {row['itl_p50_ms']:6.1f} p99 {row['itl_p99_ms']:6.1f} ms  load {os.getloadavg()[0]:.1f}",
            file=sys.stderr,
            flush=True,
        )
        return {"server": self.name, **row}

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def run_servers(servers: list[Server], rounds: int, args, env) -> tuple[list[dict], dict[str, str]]:
    """Start every server, then `rounds` rounds in which each server in turn takes every client count (all
    servers stay up, idle while another is measured, so each round compares them under the same load)."""
    rows, skipped = [], {}
    try:
        for server in servers:
            why = server.start(env)
            if why is not None:
                skipped[server.name] = why
                server.stop()
        up = [s for s in servers if s.process is not None]
        for r in range(rounds):
            for server in up:
                for clients in args.clients:
                    rows.append({"round": r, **server.measure(clients, args)})
    finally:
        for server in servers:
            server.stop()
    return rows, skipped


def summary(rows: list[dict], clients: list[int]) -> list[dict]:
    """Medians over rounds per (server, clients), and the ratio of gptoss serve to the peer within each round."""
    out = []
    for name in dict.fromkeys(r["server"] for r in rows):
        for c in clients:
            mine = [r for r in rows if r["server"] == name and r["clients"] == c]
            if mine:
                keys = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
                out.append(
                    {"server": name, "clients": c, "rounds": len(mine)}
                    | {k: float(np.median([r[k] for r in mine])) for k in keys}
                )
    return out


def ratios(rows: list[dict], clients: list[int], ours: str, peer: str) -> list[dict]:
    """Per client count: the median over rounds of (ours / peer) tokens/s and TTFT p50, each round's pair
    measured back to back."""
    out = []
    for c in clients:
        pairs = []
        for r in sorted({x["round"] for x in rows}):
            a = [x for x in rows if x["server"] == ours and x["clients"] == c and x["round"] == r]
            b = [x for x in rows if x["server"] == peer and x["clients"] == c and x["round"] == r]
            if a and b:
                pairs.append((a[0]["tokens_per_s"] / b[0]["tokens_per_s"], a[0]["ttft_p50_ms"] / b[0]["ttft_p50_ms"]))
        if pairs:
            out.append(
                {
                    "clients": c,
                    "tokens_per_s_ratio": float(np.median([p[0] for p in pairs])),
                    "ttft_p50_ratio": float(np.median([p[1] for p in pairs])),
                    "per_round": [round(p[0], 2) for p in pairs],
                }
            )
    return out


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


def gptoss_cmd(run: str, threads: int, max_batch: int, *extra: str) -> list[str]:
    return [*GPTOSS, "serve", "--run", run, "--device", "cpu", "--threads", str(threads), "--max-queue", "256"] + [
        "--max-batch",
        str(max_batch),
        *extra,
    ]


def transformers_cmd(hf: Path, continuous_batching: bool, blocks: int) -> list[str]:
    cli = "import sys; from transformers.cli.transformers import main; sys.exit(main())"
    cb = ["--continuous-batching"] if continuous_batching else []
    if continuous_batching and blocks:
        cb += ["--cb-num-blocks", str(blocks)]
    return [sys.executable, "-c", cli, "serve", "--device", "cpu", *cb, str(hf)]


def print_summary(table: list[dict], ratio: list[dict], peer: str) -> None:
    print("medians over rounds:", file=sys.stderr)
    for row in table:
        print(
            f"  {row['server']:42s} {row['clients']:3d} clients  {row['tokens_per_s']:8.1f} tok/s  "
            f"TTFT p50 {row['ttft_p50_ms']:7.1f} p99 {row['ttft_p99_ms']:7.1f} ms  "
            f"ITL p50 {row['itl_p50_ms']:6.1f} p99 {row['itl_p99_ms']:6.1f} ms  ({row['rounds']} rounds)",
            file=sys.stderr,
        )
    for r in ratio:
        print(
            f"gptoss serve / {peer} at {r['clients']} clients: tokens/s x{r['tokens_per_s_ratio']:.2f} "
            f"(rounds {r['per_round']}), TTFT p50 x{r['ttft_p50_ratio']:.2f}",
            file=sys.stderr,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="A trained run directory.")
    parser.add_argument("--clients", default="1,4,16", help="Comma-separated concurrent client counts.")
    parser.add_argument("--requests", type=int, default=2, help="Requests each client sends, one after another.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds (medians are reported).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads in each server.")
    parser.add_argument("--no-transformers", action="store_true", help="Skip `transformers serve`.")
    parser.add_argument(
        "--peer-blocks",
        type=int,
        default=32,
        help="KV-cache blocks (of 256 tokens) for transformers' continuous batching; 0: its default, which on "
        "CPU takes most of the free memory (14 GiB of 23 here). 32 blocks hold twice what gptoss serve's 16 slots "
        "of the tiny model's 256-token context do.",
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="Also measure, one round after the others: gptoss serve --max-batch 1, transformers serve without "
        "continuous batching.",
    )
    parser.add_argument(
        "--eager-too",
        action="store_true",
        help="Also run `gptoss serve --no-compile` in the same alternating rounds (the default start-up chooses "
        "between the compiled and the eager decode step by timing them).",
    )
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON on stdout.")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    model = Path(args.run).resolve().name
    print(
        f"CPU {cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds; "
        f"{args.requests} requests x {args.max_tokens} tokens per client; {args.threads} torch thread(s) per server",
        file=sys.stderr,
    )
    peer = "transformers serve --continuous-batching"
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / model
        servers = [Server("gptoss serve", gptoss_cmd(args.run, args.threads, 16), model)]
        if args.eager_too:
            servers.append(Server(EAGER, gptoss_cmd(args.run, args.threads, 16, "--no-compile"), model))
        if not args.no_transformers:
            subprocess.run(
                [*GPTOSS, "export", "--run", args.run, "--out", str(hf), "--dtype", "fp32"],
                check=True,
                capture_output=True,
                env=env,
            )
            servers.append(Server(peer, transformers_cmd(hf, True, args.peer_blocks), str(hf)))
        rows, skipped = run_servers(servers, args.rounds, args, env)
        if args.baselines:
            baselines = [Server("gptoss serve --max-batch 1", gptoss_cmd(args.run, args.threads, 1), model)]
            if not args.no_transformers:
                baselines.append(Server("transformers serve", transformers_cmd(hf, False, 0), str(hf)))
            more, why = run_servers(baselines, 1, args, env)
            rows, skipped = rows + more, skipped | why
    table, ratio = summary(rows, args.clients), ratios(rows, args.clients, "gptoss serve", peer)
    print_summary(table, ratio, peer)
    if args.eager_too:
        for r in ratios(rows, args.clients, EAGER, peer):
            ratio_s = f"tokens/s x{r['tokens_per_s_ratio']:.2f} (rounds {r['per_round']})"
            print(f"{EAGER} / {peer} at {r['clients']} clients: {ratio_s}", file=sys.stderr)
    decode = infer_decode_speed(args.run, args.max_tokens, env)
    if decode:
        print(f"gptoss infer batch 1: decode {decode:.1f} tokens/s = {1e3 / decode:.1f} ms per token", file=sys.stderr)
    for name, why in skipped.items():
        print(f"{name}: did not run: {why}", file=sys.stderr)
    if args.json:
        result = {"cpu": cpu_name(), "rows": rows, "medians": table, "ratios": ratio, "skipped": skipped}
        print(json.dumps(result | {"infer_decode_tokens_per_s": decode}, indent=2))


if __name__ == "__main__":
    main()
