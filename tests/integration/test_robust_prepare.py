"""`gptoss prepare` and train's data cache when things go wrong: a prepare killed with SIGKILL (its worker
processes die with it) or stopped by a full disk is run again and continues to the very tokens a clean prepare
writes; a shard damaged afterwards is prepared again when the advice says so; a corpus that is one huge line
is tokenized in bounded pieces; a cut-short .zst is an error.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zstandard

from gptoss_cli.data import corpus, shards
from gptoss_cli.data import prepare as prep
from gptoss_cli.data.corpus import find_sources, iter_pieces
from gptoss_cli.data.prepare import Settings, prepare_dataset
from gptoss_cli.data.tokenizer import EOS, load_tokenizer
from gptoss_cli.errors import GptossError
from tests.integration.test_prepare import SETTINGS, corpus_dir, decode_split, stream

pytestmark = pytest.mark.usefixtures("isolated_cache")

SMALL = {"chunk_bytes": 200, "shard_tokens": 300}  # many shards from a small corpus


def same_dataset(a: Path, b: Path) -> None:
    """Token for token: both splits' streams, the documents counted, the tokenizer."""
    for split in shards.SPLITS:
        assert stream(a, split) == stream(b, split), split
    ia, ib = (json.loads((p / shards.INDEX).read_text()) for p in (a, b))
    assert ia["documents"] == ib["documents"] and ia["tokenizer_hash"] == ib["tokenizer_hash"]
    assert not (a / shards.PROGRESS).exists() and not list(a.glob("*.tmp"))


def big_corpus(tmp_path: Path, n: int = 6000) -> Path:
    root = tmp_path / "big"
    root.mkdir()
    words = "expert router token layer window attention sink norm gate cache batch epoch".split()
    paras = [" ".join(words[(i * 7 + j) % len(words)] for j in range(20 + i % 30)) for i in range(n)]
    (root / "a.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return root


PREPARE_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from gptoss_cli.data.corpus import find_sources
    from gptoss_cli.data.prepare import Settings, prepare_dataset

    if __name__ == "__main__":
        sources = find_sources([sys.argv[1]])
        settings = Settings(vocab_size=320, val_fraction=0.2, seed=5)
        prepare_dataset(sources, Path(sys.argv[2]), settings, workers=2, show=False, chunk_bytes=20_000,
                        shard_tokens=20_000)
    """
)


def signal_after_shards(tmp_path: Path, data: Path, out: Path, shards_done: int, sig: int):
    """PREPARE_SCRIPT (two worker processes) sent `sig` once progress.json names `shards_done` train shards ->
    (the finished process, the worker pids seen)."""
    script = tmp_path / "prepare.py"
    script.write_text(PREPARE_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(data), str(out)], env={**os.environ}, stderr=subprocess.PIPE
    )
    workers: set[int] = set()
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, "the prepare ended before it could be signalled"
            assert time.monotonic() < deadline
            workers |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            try:
                done = len(json.loads((out / shards.PROGRESS).read_text())["train"]["shards"])
            except (OSError, ValueError, KeyError):
                done = 0
            if done >= shards_done:
                break
            time.sleep(0.01)
        proc.send_signal(sig)
    finally:
        proc.wait(timeout=120)
    return proc, workers


def test_sigterm_mid_prepare_unwinds_without_leaking_and_exits_143(tmp_path):
    """SIGTERM (a scheduler's stop) shuts the worker pool down: exit 143, no multiprocessing warning about
    leaked semaphores, finished shards kept for the next run."""
    data = big_corpus(tmp_path)
    proc, workers = signal_after_shards(tmp_path, data, tmp_path / "ds", 1, signal.SIGTERM)
    err = proc.stderr.read().decode()
    assert proc.returncode == 143 and workers, err
    assert "leaked semaphore" not in err and "Traceback" not in err, err
    assert "prepare stopped (SIGTERM): finished shards are kept" in err
    assert json.loads((tmp_path / "ds" / shards.PROGRESS).read_text())["train"]["shards"]


def test_sigkill_mid_prepare_continues_to_a_clean_result_and_kills_the_workers(tmp_path):
    """A real prepare with two worker processes is killed with SIGKILL once it has closed three shards: its
    workers end too, and the same prepare run again keeps the finished shards and writes what a clean
    prepare writes."""
    data = big_corpus(tmp_path)
    sources = find_sources([str(data)])
    clean = prepare_dataset(
        sources, tmp_path / "clean", SETTINGS, workers=1, show=False, chunk_bytes=20_000, shard_tokens=20_000
    )
    assert len(clean.index["train"]["shards"]) > 6
    out = tmp_path / "ds"
    proc, workers = signal_after_shards(tmp_path, data, out, 3, signal.SIGKILL)
    assert workers  # the pool was running
    deadline = time.monotonic() + 30
    while alive := [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]:
        assert time.monotonic() < deadline, f"worker processes outlived their parent: {alive}"
        time.sleep(0.1)
    kept = json.loads((out / shards.PROGRESS).read_text())
    assert not (out / shards.INDEX).exists() and kept["pieces_done"] > 0
    done = prepare_dataset(sources, out, SETTINGS, workers=1, show=False, chunk_bytes=20_000, shard_tokens=20_000)
    assert not done.cached and done.times["tokenizer_s"] == 0  # the tokenizer it had was kept
    same_dataset(out, tmp_path / "clean")


def test_prepare_killed_before_its_first_shard_is_continued(gptoss, tmp_path):
    """Killed while it tokenizes its first shard: the same command runs again (it once refused its own --out
    as "not a prepared dataset")."""
    data = big_corpus(tmp_path)
    args = ["prepare", str(data), "--out", str(tmp_path / "ds"), "-c", "tiny", "--set", "model.vocab_size=320"]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from gptoss_cli.cli import main; main()", *args],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / "ds").glob("*.bin.tmp")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert (tmp_path / "ds" / shards.PROGRESS).is_file()
    code, _, err = gptoss(*args)
    assert code == 0, err
    code, _, err = gptoss(*args[:3], str(tmp_path / "again"), *args[4:])
    assert code == 0, err
    same_dataset(tmp_path / "ds", tmp_path / "again")


def test_kept_shards_are_verified_before_continuing(tmp_path, monkeypatch):
    """A prepare stopped midway whose finished shards were then damaged: the damaged one and those after it
    are prepared again; the result is a clean prepare's."""
    sources = find_sources([str(corpus_dir(tmp_path, 200))])
    prepare_dataset(sources, tmp_path / "clean", SETTINGS, workers=1, show=False, **SMALL)
    calls, real = [], prep._encode

    def stopping(*args, **kw):
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(prep, "_encode", stopping)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(sources, out, SETTINGS, workers=1, show=False, **SMALL)
    monkeypatch.undo()
    kept = json.loads((out / shards.PROGRESS).read_text())["train"]["shards"]
    assert len(kept) >= 4
    victim = out / kept[2]["file"]
    victim.write_bytes(bytes(b ^ 0xFF for b in victim.read_bytes()))  # same size, same name, other bytes
    done = prepare_dataset(sources, out, SETTINGS, workers=1, show=False, **SMALL)
    assert done.redone == [kept[2]["file"]]
    same_dataset(out, tmp_path / "clean")


@pytest.mark.parametrize("damage", ["flip", "cut", "delete"])
def test_prepare_again_redoes_the_shard_train_refused(gptoss, small_overrides, tmp_path, damage):
    """train refuses a damaged shard with "prepare the data again"; doing so prepares it (and those after it)
    again instead of answering "already prepared"."""
    sources = find_sources([str(corpus_dir(tmp_path, 200))])
    prepare_dataset(sources, tmp_path / "clean", SETTINGS, workers=1, show=False, **SMALL)
    out = tmp_path / "ds"
    prepare_dataset(sources, out, SETTINGS, workers=1, show=False, **SMALL)
    index = shards.read_index(out)
    victim = out / index["train"]["shards"][3]["file"]
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[0] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "cut":
        victim.write_bytes(victim.read_bytes()[:-2])
    else:
        victim.unlink()
    with pytest.raises(GptossError, match="prepare the data again$"):
        shards.open_split(out, index, "train")
    again = prepare_dataset(sources, out, SETTINGS, workers=1, show=False, **SMALL)
    assert not again.cached and again.redone == [victim.name]
    same_dataset(out, tmp_path / "clean")
    shards.open_split(out, shards.read_index(out), "train")  # accepted now


def test_train_continues_and_repairs_its_data_cache(gptoss, small_overrides, tmp_path, isolated_cache, monkeypatch):
    """train's implicit prepare: an entry left by a stopped preparation is continued, one with a damaged shard
    is repaired, and an entry holding something else is refused naming the entry, not an option train lacks."""
    from gptoss_cli.config import load_config
    from gptoss_cli.data import dataset
    from gptoss_cli.data.dataset import open_training_data, settings_of

    data = corpus_dir(tmp_path, 200)
    cfg = load_config("tiny", [*small_overrides, f"data.paths=[{data}]"])
    sources = find_sources([str(data)])
    root = isolated_cache / "datasets" / prep.dataset_key(sources, settings_of(cfg), prep.TRAINED)[:32]
    monkeypatch.setattr(prep, "SHARD_TOKENS", 300)
    monkeypatch.setattr(prep, "CHUNK_BYTES", 200)
    calls, real = [], prep._encode

    def stopping(*args, **kw):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(prep, "_encode", stopping)
    monkeypatch.setattr(dataset, "prepare_dataset", functools.partial(prepare_dataset, workers=1))  # in process
    with pytest.raises(KeyboardInterrupt):
        open_training_data(cfg, None, show=False)
    assert (root / shards.PROGRESS).is_file()
    first = open_training_data(cfg, None, show=False)  # continued
    assert first.root == root and first.train.tokens > 0
    victim = root / first.index["val"]["shards"][0]["file"]
    victim.unlink()
    repaired = open_training_data(cfg, None, show=False)
    assert repaired.train.tokens == first.train.tokens and repaired.val.tokens == first.val.tokens
    for name in os.listdir(root):
        (root / name).unlink()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(GptossError) as info:
        open_training_data(cfg, None, show=False)
    assert str(info.value) == (
        f"{root}: exists and is not a prepared dataset (it holds notes.txt); delete {root} (a gptoss data cache "
        "entry) and run again"
    )


def test_disk_full_names_the_path_and_the_prepare_continues(tmp_path, isolated_cache):
    """A real write error from the operating system (RLIMIT_FSIZE: files may not grow past 64 KB, so a shard
    write fails with EFBIG as it would with ENOSPC on a full disk): one line naming the shard, exit 1; the
    same command without the limit completes to a clean prepare's result."""
    data = big_corpus(tmp_path, 3000)
    args = ["prepare", str(data), "--out", str(tmp_path / "ds"), "-c", "tiny", "--set", "model.vocab_size=320"]
    cmd = [sys.executable, "-c", "from gptoss_cli.cli import main; main()", *args]

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    env = {**os.environ, "GPTOSS_DEBUG": "0"}
    full = subprocess.run(cmd, preexec_fn=limited, capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in full.stderr.strip().splitlines() if line.startswith("error:")]
    assert full.returncode == 1 and len(errors) == 1, full.stderr  # after the progress lines of a pipe
    assert full.stderr.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith(f"error: {tmp_path / 'ds'}/train-00000.bin.tmp: File too large"), errors[0]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    clean = subprocess.run([*cmd[:6], str(tmp_path / "clean"), *cmd[7:]], capture_output=True, env=env, timeout=300)
    assert clean.returncode == 0
    same_dataset(tmp_path / "ds", tmp_path / "clean")


# ---- inputs: one huge line, cut-short compressed files ---------------------------------------------


def test_one_huge_line_is_tokenized_in_bounded_pieces_to_the_whole_documents_tokens(tmp_path, monkeypatch):
    """A corpus that is one 3 MB line: the reader hands it over in pieces of at most PIECE_CHARS (+ one read
    block), the tokenizer sample is never empty ("no text found" was false), and the shard holds exactly the
    tokens of the whole document encoded at once."""
    words = "expert router token layer window attention sink norm gate cache batch epoch".split()
    line = " ".join(words[(i * 7) % len(words)] + str(i % 97) for i in range(330_000))  # ~3 MB, no blank line
    path = tmp_path / "one.txt"
    path.write_text(line, encoding="utf-8")
    pieces = list(iter_pieces(find_sources([str(path)])))
    assert len(pieces) >= 3 and [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    assert max(len(p) for p, _ in pieces) <= corpus.PIECE_CHARS + corpus.BLOCK
    assert "".join(p for p, _ in pieces) == line

    biggest = []
    real = prep._encode
    monkeypatch.setattr(prep, "_encode", lambda p, *a, **k: biggest.append(max(map(len, p))) or real(p, *a, **k))
    settings = Settings(vocab_size=320, val_fraction=0.05, seed=5, tokenizer_sample_bytes=1000)
    result = prepare_dataset(find_sources([str(path)]), tmp_path / "ds", settings, workers=1, show=False)
    assert max(biggest) <= corpus.PIECE_CHARS + corpus.BLOCK
    assert result.index["documents"] == {"train": 1, "val": 0}
    tok = load_tokenizer(tmp_path / "ds" / shards.TOKENIZER)
    ids = np.frombuffer(stream(tmp_path / "ds", "train"), dtype=result.index["dtype"]).tolist()
    assert ids == tok.encode(line).ids + [tok.token_to_id(EOS)]
    assert decode_split(tmp_path / "ds", "train") == [line]


def test_a_cut_short_zst_is_refused_and_frames_are_read_to_the_end(tmp_path):
    text = "\n\n".join(f"document {i} " + "word " * (i % 40) for i in range(3000)).encode()
    frames = zstandard.ZstdCompressor().compress(text[:50_000]) + zstandard.ZstdCompressor().compress(text[50_000:])
    for name in ("a.txt.zst", "a.jsonl.zst"):
        body = (
            frames
            if name.endswith("txt.zst")
            else zstandard.ZstdCompressor().compress(
                b"".join(json.dumps({"text": d}).encode() + b"\n" for d in text.decode().split("\n\n"))
            )
        )
        whole = tmp_path / name
        whole.write_bytes(body)
        assert len(list(corpus.iter_documents(find_sources([str(whole)])))) == 3000  # every frame
        for cut in (len(body) // 2, len(body) - 1, 5):
            part = tmp_path / f"cut-{cut}-{name}"
            part.write_bytes(body[:cut])
            with pytest.raises(GptossError) as info:
                list(corpus.iter_documents(find_sources([str(part)])))
            assert str(info.value) == (
                f"{part}: cannot read (the compressed data ends inside a zstd frame (the file is cut short))"
            )
    junk = tmp_path / "junk.txt.zst"
    junk.write_bytes(frames + b"not a frame")
    with pytest.raises(GptossError, match=f"{junk}: cannot decompress"):
        list(corpus.iter_documents(find_sources([str(junk)])))
