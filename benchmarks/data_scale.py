"""Data pipeline at scale: `gptoss prepare` and training from a prepared dataset on real text.

For each corpus size it builds a corpus of real text found on the machine (Python sources and docs of
the standard library and site-packages, /usr/share/doc, man pages decompressed; the pool is repeated
when the size asks for more text than it holds, which the output says), then measures:
- prepare: wall time and MB/s of `gptoss prepare --workers N` (vocab 32000, tokenizer trained on its
  default capped sample), the tokenize phase's MB/s against `tokenizers`' own `encode_batch` on the same
  text with the same cores (16 MB spread over the corpus, best of 3: the ceiling, since prepare also
  reads, splits and writes), and peak RSS of the prepare process plus its workers (the sum over the
  process tree, sampled every 0.1 s);
- training: `gptoss train -c tiny` (vocab 32000) for 5 steps on the prepared dataset: the time from the
  command's start to its first logged step, and its peak RSS;
- one batch draw (8 x 1024 tokens) from the memory-mapped shards, median of 2000 draws;
- loader only, at --loader-scale x the largest corpus: the same shards listed that many times in one
  index (no extra disk), and one batch draw there.

    uv run python benchmarks/data_scale.py --sizes 100M 1G --work /tmp/data_scale   # --workers 0 = all cores

A benchmark, not a test: docs/performance.md records runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import psutil

ROOTS = [
    Path(sysconfig.get_paths()["stdlib"]),
    Path(sysconfig.get_paths()["purelib"]),
    Path("/usr/share/doc"),
    Path("/usr/share/man"),
]
SUFFIXES = {".py", ".pyi", ".txt", ".md", ".rst", ".h", ".c", ".html"}
PART = 64 << 20  # bytes per corpus file


def parse_size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def texts():
    """Real text files on this machine, in a fixed order; man pages and docs decompressed."""
    for root in ROOTS:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.stat().st_size > 8 << 20:
                continue
            try:
                if path.suffix == ".gz" and (root.name == "man" or Path(path.stem).suffix in SUFFIXES):
                    data = gzip.decompress(path.read_bytes())
                elif path.suffix in SUFFIXES:
                    data = path.read_bytes()
                else:
                    continue
                yield data.decode("utf-8")
            except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
                continue


def build_corpus(size: int, out: Path) -> dict:
    """`size` bytes of text in PART-sized .txt files (files joined by blank lines). Reuses a complete one."""
    stamp = out.with_name(out.name + ".json")  # beside the corpus: not part of it
    if stamp.is_file():
        return json.loads(stamp.read_text())
    out.mkdir(parents=True, exist_ok=True)
    written, part, f, passes, unique = 0, 0, None, 0, 0
    while written < size:
        passes += 1
        for text in texts():
            data = (text.strip("\n") + "\n\n").encode("utf-8")
            if passes == 1:
                unique += len(data)
            if f is None or f.tell() >= PART:
                if f:
                    f.close()
                f = open(out / f"part-{part:04d}.txt", "wb")  # noqa: SIM115
                part += 1
            f.write(data)
            written += len(data)
            if written >= size:
                break
    f.close()
    info = {"bytes": written, "files": part, "unique_bytes": unique if passes > 1 else written, "passes": passes}
    stamp.write_text(json.dumps(info))
    return info


class PeakRSS:
    """Peak of the summed RSS of a process and its children, sampled in a thread."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)

    def stop(self) -> int:
        self._stop.set()
        self.thread.join()
        return self.peak


def gptoss(*args: str, env: dict, watch: Path | None = None) -> tuple[dict, float, int, float | None]:
    """Run `gptoss ARGS --json` -> (its JSON, wall s, peak RSS bytes, s until `watch` got a train line)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptoss_cli", *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    rss = PeakRSS(proc.pid)
    first = None
    while proc.poll() is None:
        if watch is not None and first is None and watch.is_file() and '"kind": "train"' in watch.read_text():
            first = time.perf_counter() - t0
        time.sleep(0.05)
    out, err = proc.communicate()
    wall, peak = time.perf_counter() - t0, rss.stop()
    if proc.returncode:
        raise SystemExit(f"gptoss {' '.join(args[:2])} failed: {err[-2000:]}")
    return json.loads(out), wall, peak, first


def encode_batch_rate(dataset: Path, corpus: Path, corpus_bytes: int, sample: int, repeats: int = 3) -> float:
    """tokenizers' own encode_batch, all cores, on about `sample` bytes of the corpus' documents taken
    evenly over the whole corpus (every k-th document, so it holds the same mix of text as what prepare
    tokenized): MB/s, the best of `repeats` timings (the ceiling, and the least disturbed by other load)."""
    from tokenizers import Tokenizer

    from gptoss_cli.data.corpus import find_sources, iter_documents

    tok = Tokenizer.from_file(str(dataset / "tokenizer.json"))
    stride = max(1, corpus_bytes // sample)
    docs = [doc for n, doc in enumerate(iter_documents(find_sources([str(corpus)]))) if n % stride == 0]
    size = sum(len(doc.encode("utf-8")) for doc in docs)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        tok.encode_batch(docs)
        best = min(best, time.perf_counter() - t0)
    return size / 1e6 / best


def draw_ms(index_root: Path, draws: int = 2000) -> float:
    from gptoss_cli.data import shards
    from gptoss_cli.data.batches import TokenBatches

    index = shards.read_index(index_root)
    data = TokenBatches(shards.open_split(index_root, index, "train").arrays, 1024, 8, seed=1)
    times = []
    for i in range(draws):
        t0 = time.perf_counter()
        data.batch(i // data.batches_per_epoch, i % data.batches_per_epoch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def loader_only(dataset: Path, out: Path, scale: int) -> tuple[int, float]:
    """The dataset's train shards listed `scale` times in a new index (symlinked) -> (tokens, draw ms)."""
    from gptoss_cli.data import shards

    index = shards.read_index(dataset)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for copy in range(scale):
        for entry in index["train"]["shards"]:
            name = f"{copy:03d}-{entry['file']}"
            link = out / name
            link.unlink(missing_ok=True)  # a link left by an earlier run may point at another corpus' shard
            link.symlink_to(dataset / entry["file"])
            entries.append({**entry, "file": name, "mtime_ns": link.stat().st_mtime_ns})
    big = {
        **index,
        "train": {"tokens": sum(e["tokens"] for e in entries), "shards": entries},
        "val": {"tokens": 0, "shards": []},
    }
    (out / "index.json").write_text(json.dumps(big))
    (out / "tokenizer.json").write_bytes((dataset / "tokenizer.json").read_bytes())
    return big["train"]["tokens"], draw_ms(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["100M"])
    ap.add_argument("--work", type=Path, default=Path("data_scale"))
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--loader-scale", type=int, default=10)
    ap.add_argument("--encode-sample", default="16M", help="text for the encode_batch reference")
    args = ap.parse_args()
    env = {**os.environ, "GPTOSS_CACHE": str(args.work / "cache")}
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        ),
        platform.processor(),
    )
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu}, {os.cpu_count()} cores, "
        f"workers {args.workers or os.cpu_count()}"
    )
    rows = []
    for size_text in args.sizes:
        size = parse_size(size_text)
        corpus = args.work / f"corpus-{size_text}"
        info = build_corpus(size, corpus)
        dataset = args.work / f"prepared-{size_text}"
        if dataset.exists():
            subprocess.run(["rm", "-rf", str(dataset)], check=True)
        prep, wall, prep_rss, _ = gptoss(
            "prepare", str(corpus), "--out", str(dataset), "-c", "compact", "--workers", str(args.workers), env=env
        )
        times = prep["times_s"]
        tokenize_rate = info["bytes"] / 1e6 / times["tokenize_s"]
        reference = encode_batch_rate(dataset, corpus, info["bytes"], parse_size(args.encode_sample))
        run = args.work / f"run-{size_text}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        sets = [
            "model.vocab_size=32000",
            "train.max_steps=5",
            "train.log_every=1",
            "train.eval_every=5",
            f"data.prepared={dataset}",
            "train.device=cpu",
        ]
        train, _, train_rss, first = gptoss(
            "train",
            "-c",
            "tiny",
            "-r",
            str(run),
            *[a for s in sets for a in ("--set", s)],
            env=env,
            watch=run / "metrics.jsonl",
        )
        row = {
            "corpus": size_text,
            "bytes": info["bytes"],
            "unique_bytes": info["unique_bytes"],
            "train_tokens": prep["train_tokens"],
            "prepare_s": wall,
            "prepare_mb_s": info["bytes"] / 1e6 / wall,
            "read_s": times["read_s"],
            "tokenizer_s": times["tokenizer_s"],
            "tokenize_s": times["tokenize_s"],
            "tokenize_mb_s": tokenize_rate,
            "encode_batch_mb_s": reference,
            "prepare_peak_rss_gib": prep_rss / 2**30,
            "train_first_step_s": first,
            "train_peak_rss_gib": train_rss / 2**30,
            "train_setup_s": train["setup_s"],
            "draw_ms": draw_ms(dataset),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    big_tokens, big_draw = loader_only(
        args.work / f"prepared-{args.sizes[-1]}", args.work / "loader-only", args.loader_scale
    )
    print(
        "\n| corpus | prepare | prepare MB/s | tokenize MB/s (encode_batch MB/s) | peak RSS prepare | "
        "first step | peak RSS train | batch draw |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        repeated = f" ({r['unique_bytes'] / 1e6:.0f} MB unique)" if r["unique_bytes"] < r["bytes"] else ""
        print(
            f"| {r['bytes'] / 1e6:,.0f} MB{repeated}, {r['train_tokens'] / 1e6:,.0f} M tokens | "
            f"{r['prepare_s']:.0f} s (tokenizer {r['tokenizer_s']:.0f} s) | {r['prepare_mb_s']:.2f} | "
            f"{r['tokenize_mb_s']:.2f} ({r['encode_batch_mb_s']:.2f}, "
            f"{r['tokenize_mb_s'] / r['encode_batch_mb_s']:.0%}) | "
            f"{r['prepare_peak_rss_gib']:.2f} GiB | {r['train_first_step_s']:.1f} s | "
            f"{r['train_peak_rss_gib']:.2f} GiB | {r['draw_ms']:.3f} ms |"
        )
    print(
        f"| loader only: {args.loader_scale} x {args.sizes[-1]}, {big_tokens / 1e9:.2f} G tokens | | | | | | | "
        f"{big_draw:.3f} ms |"
    )


if __name__ == "__main__":
    main()
