"""`gptoss prepare` and the prepared dataset: shards that decode back to the documents, the index, the
train/validation split, worker processes giving the same shards as one process, a killed prepare that
continues, the tokenizer cache, training from data.prepared, and every bad input as one line.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from gptoss_cli.data import prepare as prep
from gptoss_cli.data import shards
from gptoss_cli.data.corpus import find_sources, load_documents
from gptoss_cli.data.prepare import Settings, prepare_dataset
from gptoss_cli.data.tokenizer import EOS, load_tokenizer, train_tokenizer
from gptoss_cli.errors import GptossError

pytestmark = pytest.mark.usefixtures("isolated_cache")


def corpus_dir(tmp_path: Path, n: int = 60) -> Path:
    root = tmp_path / "corpus"
    root.mkdir(parents=True, exist_ok=True)
    words = "expert router token layer window attention sink norm gate cache batch epoch".split()
    paras = [f"Document {i}: " + " ".join(words[(i * 5 + j) % len(words)] for j in range(8 + i % 9)) for i in range(n)]
    (root / "a.txt").write_text("\n\n".join(paras[: n // 2]) + "\n", encoding="utf-8")
    (root / "b.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[n // 2 :]), encoding="utf-8")
    return root


def decode_split(root: Path, split: str) -> list[str]:
    """The documents a split's shards hold, decoded with the dataset's own tokenizer."""
    index = json.loads((root / shards.INDEX).read_text())
    tok = load_tokenizer(root / shards.TOKENIZER)
    ids = np.concatenate(
        [np.fromfile(root / e["file"], dtype=index["dtype"]) for e in index[split]["shards"]]
        or [np.zeros(0, dtype=index["dtype"])]
    )
    eos = tok.token_to_id(EOS)
    assert ids.size == 0 or ids[-1] == eos
    cuts = np.flatnonzero(ids == eos)
    return [tok.decode(part.tolist()) for part in np.split(ids, cuts + 1)[:-1] for part in [part[:-1]]]


def stream(root: Path, split: str) -> bytes:
    index = json.loads((root / shards.INDEX).read_text())
    return b"".join((root / e["file"]).read_bytes() for e in index[split]["shards"])


SETTINGS = Settings(vocab_size=320, val_fraction=0.2, seed=5)


def test_prepare_cli_writes_shards_that_decode_to_the_documents(gptoss, small_overrides, tmp_path):
    data = corpus_dir(tmp_path)
    sets = [a for o in small_overrides + ["data.val_fraction=0.2"] for a in ("--set", o)]
    code, out, err = gptoss("prepare", str(data), "--out", tmp_path / "ds", "-c", "tiny", *sets, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert err.strip() == ""  # quiet under --json: no progress bars
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    assert index["format"] == shards.FORMAT and index["dtype"] == "<u2" and index["complete"]
    assert [Path(s["path"]).name for s in index["sources"]] == ["a.txt", "b.jsonl"]
    assert summary["train_tokens"] == index["train"]["tokens"] > 0 and summary["val_tokens"] > 0
    train, val = decode_split(tmp_path / "ds", "train"), decode_split(tmp_path / "ds", "val")
    docs = load_documents([str(data)])
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert [d for d in docs if d in set(train)] == train  # each split keeps the corpus order
    assert 0.05 < len(val) / len(docs) < 0.4 and index["documents"] == {"train": len(train), "val": len(val)}
    for split in ("train", "val"):
        for entry in index[split]["shards"]:
            assert shards.file_sha256(tmp_path / "ds" / entry["file"]) == entry["sha256"]
    # Again with the same arguments: nothing to do; the human output names the dataset.
    code, out, err = gptoss("prepare", str(data), "--out", tmp_path / "ds", "-c", "tiny", *sets)
    assert code == 0 and out == "" and "already prepared" in err and f"data.prepared={tmp_path / 'ds'}" in err
    # The closing hint carries the config and the model/train overrides the data was prepared with, and works.
    hint = next(line for line in err.splitlines() if line.startswith("train on it: ")).removeprefix("train on it: ")
    args = shlex.split(hint)[1:]  # without "gptoss"
    assert args[:3] == ["train", "-c", "tiny"] and "data.val_fraction" not in hint
    code, _, err = gptoss(*args, "--set", "train.max_steps=1", "--run", tmp_path / "run")
    assert code == 0 and "completed: 1 steps" in err, err


def test_off_a_terminal_prepare_says_each_phase(gptoss, small_overrides, tmp_path):
    """Piped or logged (no terminal): a line per phase and the bytes done, instead of nothing for minutes."""
    sets = [a for o in small_overrides for a in ("--set", o)]
    code, _, err = gptoss("prepare", str(corpus_dir(tmp_path)), "--out", tmp_path / "ds", "-c", "tiny", *sets)
    assert code == 0, err
    lines = err.splitlines()
    assert "reading a tokenizer sample: started" in lines and "tokenizing: started" in lines
    assert any(line.startswith("training the tokenizer on a ") for line in lines)
    assert any(line.startswith("tokenizing: done, ") and "MB (100%)" in line for line in lines), err


def test_text_with_a_few_bad_bytes_is_named_then_replaced_and_counted(gptoss, small_overrides, tmp_path):
    data = corpus_dir(tmp_path)
    raw = (data / "a.txt").read_bytes()
    (data / "a.txt").write_bytes(raw[:20] + b"\xff\xfe" + raw[20:])
    sets = [a for o in small_overrides for a in ("--set", o)]
    code, _, err = gptoss("prepare", str(data), "--out", tmp_path / "ds", "-c", "tiny", *sets)
    assert code == 2 and err.splitlines()[-1].endswith(
        "not UTF-8 text: an invalid byte at offset 20 (line 1); set data.invalid_utf8=replace or skip to read past it"
    )
    code, out, err = gptoss(
        "prepare", str(data), "--out", tmp_path / "ds", "-c", "tiny", *sets, "--set", "data.invalid_utf8=replace"
    )
    assert code == 0 and "2 bytes that are not UTF-8 were replaced by U+FFFD (data.invalid_utf8)" in err, err


def test_workers_give_the_same_shards_as_one_process(tmp_path):
    sources = find_sources([str(corpus_dir(tmp_path, 200))])
    one = prepare_dataset(sources, tmp_path / "one", SETTINGS, workers=1, show=False, chunk_bytes=300)
    two = prepare_dataset(sources, tmp_path / "two", SETTINGS, workers=2, show=False, chunk_bytes=300, shard_tokens=500)
    assert one.index["tokenizer_hash"] == two.index["tokenizer_hash"]
    assert len(two.index["train"]["shards"]) > 2  # several shards, closed as they filled
    for split in ("train", "val"):
        assert stream(tmp_path / "one", split) == stream(tmp_path / "two", split)


def test_killed_prepare_keeps_its_shards_and_continues(tmp_path, monkeypatch):
    sources = find_sources([str(corpus_dir(tmp_path, 200))])
    calls = []
    real = prep._encode

    def encode(*args, **kw):
        calls.append(1)
        if len(calls) == kill_at:
            raise KeyboardInterrupt  # as Ctrl-C or a kill in the middle of tokenizing
        return real(*args, **kw)

    monkeypatch.setattr(prep, "_encode", encode)
    kill_at = 0
    whole = prepare_dataset(
        sources, tmp_path / "whole", SETTINGS, workers=1, show=False, chunk_bytes=200, shard_tokens=300
    )
    total, kill_at = len(calls), len(calls) + 12
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(sources, out, SETTINGS, workers=1, show=False, chunk_bytes=200, shard_tokens=300)
    progress = json.loads((out / shards.PROGRESS).read_text())
    kept = [e["file"] for split in ("train", "val") for e in progress[split]["shards"]]
    assert kept and all((out / f).is_file() for f in kept) and not list(out.glob("*.tmp"))
    assert not (out / shards.INDEX).exists()
    with pytest.raises(GptossError, match="preparation did not finish"):
        shards.read_index(out)

    first = len(calls) - total
    monkeypatch.setattr(prep, "train_tokenizer", None)  # the tokenizer is not trained again
    done = prepare_dataset(sources, out, SETTINGS, workers=1, show=False, chunk_bytes=200, shard_tokens=300)
    again = len(calls) - total - first
    assert total - first < again < total  # the kept shards' documents were not tokenized again
    assert done.index["documents"] == whole.index["documents"] and not (out / shards.PROGRESS).exists()
    for split in ("train", "val"):
        assert stream(out, split) == stream(tmp_path / "whole", split)


def test_tokenizer_is_trained_once_per_data_and_settings(tmp_path, monkeypatch):
    sources = find_sources([str(corpus_dir(tmp_path))])
    first = prepare_dataset(sources, tmp_path / "a", SETTINGS, show=False)
    assert first.times["tokenizer_s"] > 0
    monkeypatch.setattr(prep, "train_tokenizer", None)  # any training now would fail
    again = prepare_dataset(sources, tmp_path / "b", SETTINGS, show=False)
    assert again.index["tokenizer_hash"] == first.index["tokenizer_hash"] and again.times["tokenizer_s"] == 0
    monkeypatch.undo()
    other = prepare_dataset(sources, tmp_path / "c", Settings(vocab_size=300, val_fraction=0.2, seed=5), show=False)
    assert other.index["tokenizer_hash"] != first.index["tokenizer_hash"]


def test_the_tokenizer_sample_is_capped(tmp_path, monkeypatch):
    seen = []
    real = prep.train_tokenizer
    monkeypatch.setattr(prep, "train_tokenizer", lambda texts, *a, **k: seen.append(texts) or real(texts, *a, **k))
    sources = find_sources([str(corpus_dir(tmp_path, 400))])
    settings = Settings(vocab_size=320, val_fraction=0.1, seed=5, tokenizer_sample_bytes=2000)
    prepare_dataset(sources, tmp_path / "ds", settings, show=False)
    total = sum(len(d) for d in load_documents([str(tmp_path / "corpus")]))
    sample = sum(len(d) for d in seen[0])
    assert 2000 <= sample < 2200 and total > 10 * sample


def test_large_vocabularies_use_uint32(tmp_path):
    tok = train_tokenizer(load_documents([]), 400)
    tok.add_tokens([f"<extra{i}>" for i in range(66000)])
    sources = find_sources([str(corpus_dir(tmp_path))])
    result = prepare_dataset(sources, tmp_path / "ds", Settings(vocab_size=70000), tokenizer=tok, show=False)
    assert result.index["dtype"] == "<u4"
    assert sorted(decode_split(tmp_path / "ds", "train") + decode_split(tmp_path / "ds", "val")) == sorted(
        load_documents([str(tmp_path / "corpus")])
    )


# ---- bad inputs -----------------------------------------------------------------------------------


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


@pytest.fixture
def dataset(tmp_path) -> Path:
    prepare_dataset(find_sources([str(corpus_dir(tmp_path))]), tmp_path / "ds", SETTINGS, show=False)
    return tmp_path / "ds"


def test_damaged_datasets(dataset):
    index = shards.read_index(dataset)
    first = dataset / index["train"]["shards"][0]["file"]
    data = bytearray(first.read_bytes())
    data[3] ^= 0xFF
    first.write_bytes(bytes(data))  # same size, other content
    with pytest.raises(GptossError) as info:
        shards.open_split(dataset, index, "train")
    assert one_line(info) == f"{first}: shard checksum mismatch (corrupted); prepare the data again"
    first.write_bytes(bytes(data[:-2]))
    with pytest.raises(GptossError, match="shard has .* bytes, the index says"):
        shards.open_split(dataset, index, "train")
    first.unlink()
    with pytest.raises(GptossError) as info:
        shards.open_split(dataset, index, "train")
    assert one_line(info) == f"{first}: shard missing; prepare the data again"

    newer = {**index, "format": shards.FORMAT + 1}
    (dataset / shards.INDEX).write_text(json.dumps(newer))
    with pytest.raises(GptossError) as info:
        shards.read_index(dataset)
    assert one_line(info).startswith(f"{dataset / shards.INDEX}: written by a newer gptoss (format 2")
    (dataset / shards.INDEX).write_text("{not json")
    with pytest.raises(GptossError, match="not a readable prepared-dataset index"):
        shards.read_index(dataset)
    with pytest.raises(GptossError, match="not a prepared dataset"):
        shards.read_index(dataset.parent)


def test_out_holding_something_else_is_left_alone(dataset, tmp_path):
    before = {p.name: p.read_bytes() for p in dataset.iterdir()}
    other = Settings(vocab_size=320, val_fraction=0.1, seed=5)
    with pytest.raises(GptossError) as info:
        prepare_dataset(find_sources([str(tmp_path / "corpus")]), dataset, other, show=False)
    assert one_line(info) == (
        f"{dataset}: already holds a prepared dataset of other data or settings; "
        "choose another --out (nothing was changed)"
    )
    assert {p.name: p.read_bytes() for p in dataset.iterdir()} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(GptossError, match="exists and is not a prepared dataset"):
        prepare_dataset(find_sources([str(tmp_path / "corpus")]), tmp_path / "mine", SETTINGS, show=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_empty_corpus_after_filtering(tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "   "}) + "\n" + json.dumps({"text": "\n\n"}) + "\n")
    with pytest.raises(GptossError) as info:
        prepare_dataset(find_sources([str(blank)]), tmp_path / "ds", SETTINGS, show=False)
    assert one_line(info) == f"data.paths: no text found in {blank}"
    tok = train_tokenizer(load_documents([]), 320)
    with pytest.raises(GptossError, match=f"no text found in {blank}"):
        prepare_dataset(find_sources([str(blank)]), tmp_path / "ds", SETTINGS, tokenizer=tok, show=False)
    assert not list((tmp_path / "ds").iterdir())  # no half-made dataset left behind


# ---- training from a prepared dataset -------------------------------------------------------------


def test_train_on_prepared_equals_train_on_paths(gptoss, small_overrides, tmp_path, torch_one_thread):
    data = corpus_dir(tmp_path, 120)
    sets = [a for o in small_overrides for a in ("--set", o)]
    code, _, err = gptoss("prepare", str(data), "--out", tmp_path / "ds", "-c", "tiny", *sets)
    assert code == 0, err
    code, out, err = gptoss(
        "train", "-c", "tiny", "-r", tmp_path / "a", *sets, "--set", f"data.prepared={tmp_path / 'ds'}", "--json"
    )
    assert code == 0, err
    summary = json.loads(out)
    assert set(summary["setup_s"]) == {"read_s", "tokenizer_s", "tokenize_s", "model_s"}
    assert summary["setup_s"]["tokenize_s"] == 0 and summary["data"] == str(tmp_path / "ds")
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["setup_s"] == summary["setup_s"]
    code, out, err = gptoss("train", "-c", "tiny", "-r", tmp_path / "b", *sets, "--set", f"data.paths={data}", "--json")
    assert code == 0, err
    paths_summary = json.loads(out)
    assert paths_summary["setup_s"]["tokenize_s"] > 0  # prepared into the cache first
    code, out, err = gptoss(
        "train", "-c", "tiny", "-r", tmp_path / "b2", *sets, "--set", f"data.paths={data}", "--json"
    )
    assert code == 0, err
    again = json.loads(out)["setup_s"]  # the same files and settings: the cache entry, nothing redone
    assert again["tokenize_s"] == again["tokenizer_s"] == again["read_s"] == 0

    def losses(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [x["loss"] for x in lines if x["kind"] == "train"]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 6
    # The run's tokenizer is the dataset's; another one is refused with one line.
    other = tmp_path / "other.json"
    train_tokenizer(["some other text entirely"] * 3, 300).save(str(other))
    code, _, err = gptoss(
        "train",
        "-c",
        "tiny",
        "-r",
        tmp_path / "c",
        *sets,
        "--set",
        f"data.prepared={tmp_path / 'ds'}",
        "--tokenizer",
        other,
    )
    assert code == 2 and err.startswith(f"error: data.prepared: {tmp_path / 'ds'} was tokenized with another")
    assert not (tmp_path / "c").exists()


def test_prepare_cli_bad_arguments(gptoss, tmp_path):
    missing = tmp_path / "nope.txt"
    code, out, err = gptoss("prepare", missing, "--out", tmp_path / "ds", "-c", "tiny")
    assert (code, out, err) == (2, "", f"error: data.paths: {missing} does not exist\n")
    data = corpus_dir(tmp_path)
    code, _, err = gptoss("prepare", data, "--out", tmp_path / "ds", "-c", "tiny", "--tokenizer", missing)
    assert code == 2 and err == f"error: --tokenizer: {missing} does not exist\n"
    code, _, err = gptoss("prepare", data, "--out", tmp_path / "ds", "-c", "tiny", "--set", "data.text_field=")
    assert code == 2 and err.strip().endswith("data.text_field: must not be empty")
    assert not (tmp_path / "ds").exists()
