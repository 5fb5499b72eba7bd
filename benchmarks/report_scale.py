"""`gptoss report` on a long run: wall time and peak RSS for a metrics.jsonl of N train lines.

It writes a run directory whose metrics.jsonl holds N train lines shaped as `gptoss train -c tiny` writes
them (4 layers x 8 experts of expert counts, every 10 steps) plus an eval line every 5th, then runs
`gptoss report --run DIR --json` in a subprocess and reads that process's peak RSS from the kernel
(getrusage of the finished child).

    uv run python benchmarks/report_scale.py --lines 1000000 --work /tmp/report_scale

A benchmark, not a test: docs/performance.md records runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path


def write_run(root: Path, lines: int) -> Path:
    run = root / f"run-{lines}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("name: tiny\n")
    rng = random.Random(0)
    with open(run / "metrics.jsonl", "w", encoding="utf-8") as f:
        for i in range(1, lines + 1):
            step = 10 * i
            line = {
                "kind": "train",
                "step": step,
                "precision": "fp32",
                "epoch": 0,
                "epochs": i / lines,
                "loss": 5.0 - 2.0 * i / lines,
                "aux_loss": 0.01,
                "z_loss": 0.0,
                "ppl": 100.0,
                "accuracy": 0.3,
                "lr": 3e-4,
                "grad_norm": 1.2,
                "tokens_per_s": 20000.0 + rng.random(),
                "tokens": 2048 * step,
                "elapsed_s": 0.5 * i,
                "expert_counts": [[rng.randint(0, 500) for _ in range(8)] for _ in range(4)],
            }
            f.write(json.dumps(line) + "\n")
            if i % 5 == 0:
                f.write(json.dumps({"kind": "eval", "step": step, "val_loss": 5.0 - 2.0 * i / lines}) + "\n")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    for lines in args.lines:
        run = write_run(args.work, lines)
        size = (run / "metrics.jsonl").stat().st_size
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "gptoss_cli", "report", "--run", str(run), "--json"],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if done.returncode:
            sys.exit(done.stderr)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kilobytes on Linux
        print(f"{lines:,} lines ({size / 2**20:,.0f} MiB): {wall:.1f} s, peak RSS {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
