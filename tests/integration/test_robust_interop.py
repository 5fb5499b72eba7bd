"""export and import against careless or hostile paths: an export never deletes what it reads, however --out
points at the run; import reads only the source directory's own files (no link out of it, no shard named
`../x`), each text file up to a bound, and still imports a Hugging Face hub cache snapshot, whose files are
links into the repository's blobs/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gptoss_cli.config import RunConfig
from gptoss_cli.data.tokenizer import train_tokenizer
from gptoss_cli.interop import source
from gptoss_cli.model import Transformer
from tests.conftest import randomise, save_run, tiny_model_config

TEXTS = ["GPT models are trained on text.", "The quick brown fox jumps over the lazy dog."] * 8


@pytest.fixture
def run(tmp_path) -> Path:
    model = Transformer(tiny_model_config("compact", vocab_size=320, max_context_length=256)).eval()
    randomise(model)
    path = save_run(
        tmp_path / "runs" / "demo",
        RunConfig(model=model.config, name="demo"),
        train_tokenizer(TEXTS, 300),
        model,
        step=7,
    )
    (path / "metrics.jsonl").write_text('{"kind": "train", "step": 7, "loss": 2.0}\n')
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_never_deletes_its_source(gptoss, run, tmp_path):
    """--out the run itself, inside it, its checkpoint, a directory holding it, a link to it, or (GGUF) one of
    its files: with --force too, one line and exit 2, and every file of the run as it was."""
    before = snapshot(run)
    link = tmp_path / "link"
    link.symlink_to(run)
    ckpt = run / "checkpoints" / "step-00000007"
    for out in (run, run / "hf", ckpt, run / "checkpoints", run.parent, tmp_path, link):
        code, stdout, err = gptoss("export", "--run", run, "--out", out, "--force")
        assert (code, stdout) == (2, ""), (out, err)
        assert err.startswith(f"error: --out {out} overlaps ") and "which this export reads" in err
        assert len(err.strip().splitlines()) == 1
    code, _, err = gptoss("export", "--checkpoint", ckpt, "--out", run, "--force")
    assert code == 2 and "overlaps" in err
    code, _, err = gptoss("export", "--run", run, "--out", run)  # without --force: not a hint to add it
    assert code == 2 and "overlaps" in err and "--force" not in err
    for out in (run / "metrics.jsonl", ckpt / "model.safetensors", run / "tokenizer.json", run / "demo.gguf"):
        code, _, err = gptoss("export", "--run", run, "--format", "gguf", "--out", out, "--force")
        assert code == 2 and err.startswith(f"error: --out {out} overlaps "), (out, err)
    assert snapshot(run) == before
    code, _, err = gptoss("export", "--run", run, "--out", tmp_path / "hf", "--dtype", "fp32")
    assert code == 0, err  # beside the run: fine


@pytest.fixture
def hf(gptoss, run, tmp_path) -> Path:
    code, _, err = gptoss("export", "--run", run, "--out", tmp_path / "hf", "--dtype", "fp32")
    assert code == 0, err
    return tmp_path / "hf"


def refused(gptoss, hf: Path, target: Path, *needles: str) -> None:
    code, out, err = gptoss("import", hf, "--run", target)
    assert (code, out) == (2, ""), err
    assert len(err.strip().splitlines()) == 1 and all(n in err for n in needles), err
    assert not target.exists()


def test_import_refuses_links_out_of_the_source(gptoss, hf, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("{{ 'a system file' }}")
    (hf / "chat_template.jinja").symlink_to(secret)
    refused(gptoss, hf, tmp_path / "r1", f"{hf / 'chat_template.jinja'}: leads outside {hf}")
    (hf / "chat_template.jinja").unlink()

    outside = tmp_path / "tokenizer-elsewhere.json"
    os.replace(hf / "tokenizer.json", outside)
    (hf / "tokenizer.json").symlink_to(outside)
    refused(gptoss, hf, tmp_path / "r2", "tokenizer.json: leads outside")
    (hf / "tokenizer.json").unlink()
    os.replace(outside, hf / "tokenizer.json")

    os.replace(hf / "config.json", hf / "real-config.json")
    (hf / "config.json").symlink_to("/dev/zero")
    refused(gptoss, hf, tmp_path / "r3", "config.json: leads outside")
    (hf / "config.json").unlink()
    (hf / "config.json").symlink_to("real-config.json")  # a link that stays inside is fine
    code, _, err = gptoss("import", hf, "--run", tmp_path / "ok")
    assert code == 0, err


def test_import_refuses_an_index_naming_files_outside(gptoss, hf, tmp_path):
    os.replace(hf / "model.safetensors", tmp_path / "model.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../model.safetensors"}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(gptoss, hf, tmp_path / "r", "model.safetensors: leads outside")


def test_import_bounds_what_it_reads(gptoss, hf, tmp_path, monkeypatch):
    """Text files are read up to a bound (64 MiB; lowered here so the test writes kilobytes)."""
    monkeypatch.setattr(source, "MAX_TEXT_BYTES", 4096)
    assert (hf / "tokenizer.json").stat().st_size > 4096
    refused(gptoss, hf, tmp_path / "r", f"{hf / 'tokenizer.json'}: larger than", "too large for a tokenizer.json")
    monkeypatch.undo()
    (hf / "generation_config.json").write_bytes(b"\xff\xfe not text")
    refused(gptoss, hf, tmp_path / "r", "generation_config.json: not UTF-8 text")


def test_import_follows_a_hub_cache_snapshot_into_its_blobs(gptoss, hf, tmp_path):
    """huggingface_hub's cache: snapshots/REV/NAME are links to ../../blobs/HASH, outside the snapshot."""
    repo = tmp_path / "hub" / "models--me--demo"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(hf.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        os.replace(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    code, _, err = gptoss("import", snap, "--run", tmp_path / "from-cache")
    assert code == 0, err
    assert (tmp_path / "from-cache" / "tokenizer.json").is_file()
    assert not (tmp_path / "from-cache" / "tokenizer.json").is_symlink()
