"""The document readers (data/corpus.py): what a document is (.txt paragraphs, .jsonl `text`), directories
and globs, bad paths, the built-in corpus, and the deterministic train/validation split.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptoss_cli.data.corpus import load_documents, split_documents
from gptoss_cli.errors import GptossError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---- documents ------------------------------------------------------------------------------------


def test_txt_documents_are_split_at_blank_lines(tmp_path):
    path = write(tmp_path / "a.txt", "first line\nsame doc\n\n\n  second, indented\n   \n\t\nthird\tdoc\n")
    assert load_documents([str(path)]) == ["first line\nsame doc", "  second, indented", "third\tdoc"]
    one = write(tmp_path / "one.txt", "no blank lines\nat all")
    assert load_documents([str(one)]) == ["no blank lines\nat all"]


def test_jsonl_text_field(tmp_path):
    path = write(
        tmp_path / "d.jsonl",
        json.dumps({"text": "one", "id": 1})
        + "\n\n"
        + json.dumps({"text": "two\n\nstill two"})
        + "\n"
        + json.dumps({"text": "   "})
        + "\n",
    )
    assert load_documents([str(path)]) == ["one", "two\n\nstill two"]  # no paragraph split, blank text skipped


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ({"body": "no text field"}, "expected an object with a string 'text' field"),
        ({"text": 3}, "expected an object with a string 'text' field"),
        ("[1, 2]", "expected a JSON object"),
        ("{not json", "invalid JSON"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, problem):
    bad = line if isinstance(line, str) else json.dumps(line)
    path = write(tmp_path / "d.jsonl", json.dumps({"text": "fine"}) + "\n\n" + bad + "\n")
    with pytest.raises(GptossError) as info:
        load_documents([str(path)])
    assert str(info.value).startswith(f"{path}:3: {problem}")


def test_directories_and_globs_are_sorted_and_recursive(tmp_path):
    root = tmp_path / "data"
    write(root / "b.txt", "b1\n\nb2")
    write(root / "a.jsonl", json.dumps({"text": "a1"}) + "\n")
    write(root / "sub" / "c.txt", "c1")
    write(root / "sub" / "deeper" / "d.jsonl", json.dumps({"text": "d1"}) + "\n")
    write(root / "notes.md", "m1")
    write(root / "image.png", "not text")
    assert load_documents([str(root)]) == ["a1", "b1", "b2", "m1", "c1", "d1"]
    assert load_documents([str(root / "**" / "*.txt")]) == ["b1", "b2", "c1"]
    assert load_documents([str(root / "*.jsonl")]) == ["a1"]
    # Several specs: in the order given.
    assert load_documents([str(root / "sub"), str(root / "b.txt")]) == ["c1", "d1", "b1", "b2"]


def test_bad_paths(tmp_path):
    write(tmp_path / "only" / "image.png", "x")
    cases = {
        str(tmp_path / "missing.txt"): "does not exist",
        str(tmp_path / "only"): "holds no readable files (.txt, .md, .jsonl",
        str(tmp_path / "only" / "image.png"): "is not a readable kind of file",
        str(tmp_path / "*.none"): "matches no readable files",
    }
    for spec, problem in cases.items():
        with pytest.raises(GptossError, match="data.paths: ") as info:
            load_documents([spec])
        assert problem in str(info.value) and spec in str(info.value)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(GptossError, match="not UTF-8 text"):
        load_documents([str(latin1)])


def test_builtin_corpus():
    docs = load_documents([])
    assert len(docs) >= 100 and all(d.strip() for d in docs)
    assert load_documents([]) == docs


def test_split_is_deterministic_disjoint_and_complete():
    docs = [f"document number {i}" for i in range(40)]
    train, val = split_documents(docs, 0.2, seed=1)
    assert (train, val) == split_documents(docs, 0.2, seed=1)
    assert len(val) == 8 and len(train) == 32
    assert not set(train) & set(val) and set(train) | set(val) == set(docs)
    assert train == [d for d in docs if d in set(train)]  # each side keeps the corpus order
    assert split_documents(docs, 0.2, seed=2)[1] != val
    assert split_documents(docs[:2], 0.01, seed=1)[1] != []  # at least one validation document
    assert split_documents(docs, 0.0, seed=1) == (docs, [])
