"""Every input format delivers its documents byte-exact: .txt / .md paragraphs, .jsonl, .json arrays,
.parquet columns, and .gz / .zst of the text formats, read in tiny blocks too (so that separators, JSON
items and UTF-8 characters straddle block boundaries). Bad inputs are one line naming the file.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gptoss_cli.data import corpus
from gptoss_cli.data.corpus import find_sources, iter_documents, load_documents
from gptoss_cli.errors import GptossError

# Characters str.splitlines() would treat as line breaks (form feed, U+2028, NEL, vertical tab, \r alone),
# \r\n inside a document, trailing spaces, tabs and text outside the BMP must all arrive unchanged.
DOCS = [
    "Form\x0cfeed and line\u2028separator and NEL\x85 and vertical\x0btab",
    "Windows\r\nline breaks\r\ninside one document   ",
    "\tindented first line\nand a lone\rcarriage return",
    "caf\u00e9 \u65e5\u672c\u8a9e \U0001f600 \u0645\u0631\u062d\u0628\u0627",
    "x" * 50 + " a longer line " + "y" * 50,
]


@pytest.fixture(params=[7, corpus.BLOCK], ids=["7-byte-blocks", "default-blocks"])
def block(request, monkeypatch):
    monkeypatch.setattr(corpus, "BLOCK", request.param)
    return request.param


def compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(data)
    if suffix == ".zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["a.txt", "a.md", "a.txt.gz", "a.md.zst", "A.TXT"])
@pytest.mark.parametrize("separator", ["\n\n", "\r\n\r\n", "\n \t\n\n", "\r\n\t\r\n\n"])
def test_text_files(tmp_path, block, name, separator):
    text = separator.join(DOCS) + "\n"
    path = write_bytes(tmp_path / name, compress(text.encode("utf-8"), Path(name).suffix))
    assert load_documents([str(path)]) == DOCS


def test_text_file_edges(tmp_path, block):
    path = write_bytes(tmp_path / "a.txt", ("\n\n  \n" + "\n\n\n".join(DOCS) + "\r\n\r\n \n").encode())
    assert load_documents([str(path)]) == DOCS  # blank lines before the first and after the last
    one = write_bytes(tmp_path / "one.txt", b"no blank line\nat all")
    assert load_documents([str(one)]) == ["no blank line\nat all"]


def trimmed(piece: str) -> str:
    """The documented rule on one piece of the whole text: no blank lines before, no line breaks after,
    nothing of whitespace only."""
    piece = re.sub(r"\A(?:[ \t]*\r?\n)+", "", piece)
    piece = re.sub(r"(?:\r?\n[ \t]*)+\Z", "", piece)
    return "" if piece.isspace() else piece


def test_streamed_paragraphs_equal_one_split_of_the_whole_file(tmp_path, monkeypatch):
    """Random texts of separator-like characters, read in blocks of 1 to 64 bytes (a block can end
    inside a UTF-8 character or a separator): the documents are those of one split of the whole text."""
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\t", "\n", "\r", "\r\n", "\x0c", "\u00e9", "\U0001f600"]
    path = tmp_path / "a.txt"
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        path.write_bytes(text.encode("utf-8"))
        whole = [doc for piece in re.split(r"\r?\n(?:[ \t]*\r?\n)+", text) if (doc := trimmed(piece))]
        for size in (1, 2, 3, 5, 64):
            monkeypatch.setattr(corpus, "BLOCK", size)
            assert list(iter_documents(find_sources([str(path)]))) == whole, (text, size)


def test_long_documents_come_in_bounded_pieces_that_join_to_them(tmp_path, monkeypatch):
    """With pieces of at most 12 characters and blocks of 1 to 64 bytes, random texts (long runs of words,
    spaces and separator-like characters) give pieces that join to exactly the documents of one split of the
    whole text, each at most a piece plus a block long, the last of each document marked."""
    rng = random.Random(1)
    alphabet = ["ab", "cde", " ", "  ", "\t", "\n", "\r\n", "\x0c", "\u00e9", "\U0001f600", "word word word"]
    path = tmp_path / "a.txt"
    monkeypatch.setattr(corpus, "PIECE_CHARS", 12)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        path.write_bytes(text.encode("utf-8"))
        whole = [doc for piece in re.split(r"\r?\n(?:[ \t]*\r?\n)+", text) if (doc := trimmed(piece))]
        for size in (1, 5, 64):
            monkeypatch.setattr(corpus, "BLOCK", size)
            pieces = list(corpus.iter_pieces(find_sources([str(path)])))
            assert all(len(p) <= 12 + size for p, _ in pieces), (text, size)
            docs, parts = [], []
            for piece, last in pieces:
                parts.append(piece)
                if last:
                    docs.append("".join(parts))
                    parts = []
            assert docs == whole and not parts, (text, size)


def test_pieces_tokenize_as_the_whole_document():
    """A long document is cut before a space that follows a non-space character, where the byte-level
    pre-tokenizer splits anyway: its pieces' tokens are the whole document's."""
    from gptoss_cli.data.tokenizer import train_tokenizer

    rng = random.Random(2)
    words = ["the", "expert's", "route", "1234", "!!", "café", "\U0001f600", "a.b", "  ", "\n", "x,y"]
    texts = [" ".join(rng.choice(words) for _ in range(400)) for _ in range(20)]
    tok = train_tokenizer(texts, 400)
    for text in texts:
        ids, start = [], 0
        while len(text) - start > 50:
            cut = corpus.cut_point(text, start, 50)
            assert start < cut <= start + 50
            ids += tok.encode(text[start:cut]).ids
            start = cut
        assert ids + tok.encode(text[start:]).ids == tok.encode(text).ids


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst"])
def test_jsonl(tmp_path, block, name):
    lines = [json.dumps({"body": d, "n": i}, ensure_ascii=i % 2 == 0) for i, d in enumerate(DOCS)]
    text = "\n".join(lines[:2]) + "\n\n" + "\r\n".join(lines[2:]) + "\n"
    path = write_bytes(tmp_path / name, compress(text.encode("utf-8"), Path(name).suffix))
    assert load_documents([str(path)], text_field="body") == DOCS


@pytest.mark.parametrize("name", ["a.json", "a.json.gz", "a.json.zst"])
@pytest.mark.parametrize("indent", [None, 2])
def test_json_array(tmp_path, block, name, indent):
    items = [{"text": d, "id": 10**i, "tags": ["x", {"y": [1.5e3, None]}]} for i, d in enumerate(DOCS)]
    data = json.dumps(items, indent=indent, ensure_ascii=False).encode("utf-8")
    path = write_bytes(tmp_path / name, compress(data, Path(name).suffix))
    assert load_documents([str(path)]) == DOCS
    empty = write_bytes(tmp_path / "empty.json", b" [ ] ")
    assert list(iter_documents(find_sources([str(empty)]))) == []


def test_parquet_row_groups(tmp_path, block):
    table = pa.table({"id": list(range(len(DOCS))), "content": DOCS})
    path = tmp_path / "a.parquet"
    pq.write_table(table, path, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 3
    assert load_documents([str(path)], text_field="content") == DOCS


def test_directory_reads_every_format_and_warns_once_about_the_rest(tmp_path):
    root = tmp_path / "data"
    write_bytes(root / "a.txt", b"t1\n\nt2")
    write_bytes(root / "b.jsonl.gz", gzip.compress(json.dumps({"text": "j1"}).encode()))
    write_bytes(root / "c.json", json.dumps([{"text": "a1"}]).encode())
    pq.write_table(pa.table({"text": ["p1"]}), root / "d.parquet")
    write_bytes(root / "e.png", b"\x89PNG")
    write_bytes(root / "sub" / "f.csv", b"a,b")
    warnings = []
    sources = find_sources([str(root)], warnings.append)
    assert [s.path.name for s in sources] == ["a.txt", "b.jsonl.gz", "c.json", "d.parquet"]
    assert len(warnings) == 1 and "skipping 2 files" in warnings[0]
    assert "e.png" in warnings[0] and "f.csv" in warnings[0]
    assert list(iter_documents(sources)) == ["t1", "t2", "j1", "a1", "p1"]


# ---- bad inputs: one line that names the file -----------------------------------------------------


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


def error_of(path: Path, text_field: str = "text") -> str:
    with pytest.raises(GptossError) as info:
        load_documents([str(path)], text_field)
    message = one_line(info)
    assert str(path) in message
    return message


def test_absent_text_field(tmp_path):
    jl = write_bytes(tmp_path / "a.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n')
    assert error_of(jl).endswith("a.jsonl:2: expected an object with a string 'text' field")
    js = write_bytes(tmp_path / "a.json", b'[{"text": "ok"}, {"text": 3}]')
    assert error_of(js).endswith("a.json item 2: expected an object with a string 'text' field")
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), tmp_path / "a.parquet")
    message = error_of(tmp_path / "a.parquet")
    assert "no string column 'text' (string columns: body); set data.text_field" in message


def test_parquet_without_a_string_column(tmp_path):
    pq.write_table(pa.table({"n": [1, 2], "x": [0.5, 1.5]}), tmp_path / "n.parquet")
    assert error_of(tmp_path / "n.parquet").endswith("n.parquet: no string column to read text from")
    write_bytes(tmp_path / "fake.parquet", b"not parquet at all")
    assert "not a readable parquet file" in error_of(tmp_path / "fake.parquet")


def test_damaged_files(tmp_path):
    good = gzip.compress(b"some text\n\nmore text\n" * 100)
    assert "cannot read" in error_of(write_bytes(tmp_path / "cut.txt.gz", good[: len(good) // 2]))
    good = zstandard.ZstdCompressor().compress(b"some text\n\nmore text\n" * 100)
    assert "cut short" in error_of(write_bytes(tmp_path / "cut.txt.zst", good[: len(good) // 2]))
    assert "cut short" in error_of(write_bytes(tmp_path / "cut.jsonl.zst", good[:-1]))
    table = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"text": ["x" * 100] * 50}), table)
    assert "not a readable parquet file" in error_of(write_bytes(table, table.read_bytes()[:-10]))
    assert "cannot read" in error_of(write_bytes(tmp_path / "bad.txt.gz", b"not gzip data"))
    assert "cannot decompress" in error_of(write_bytes(tmp_path / "bad.txt.zst", b"not zstd data"))
    assert "not UTF-8 text" in error_of(write_bytes(tmp_path / "latin.md", "caf\u00e9".encode("latin-1")))
    assert "expected a JSON array" in error_of(write_bytes(tmp_path / "obj.json", b'{"text": "x"}'))
    assert "not closed" in error_of(write_bytes(tmp_path / "open.json", b'[{"text": "x"}, '))
    assert "invalid JSON in item 2" in error_of(write_bytes(tmp_path / "junk.json", b'[{"text": "x"}, {oops}]'))
    assert ":2: invalid JSON" in error_of(write_bytes(tmp_path / "junk.jsonl", b'{"text": "x"}\n{oops\n'))


# ---- bytes that are not UTF-8 ---------------------------------------------------------------------

BAD = "first paragraph\n\nsecond \u00e9 line\nthird".encode()
# Two invalid sequences: a lone continuation byte and a truncated 3-byte lead before ASCII.
BROKEN = BAD[:30] + b"\x80" + BAD[30:40] + b"\xe2\x82" + BAD[40:]


def documents_of(path: Path, policy: str) -> tuple[list[str], int]:
    meter = corpus.Meter()
    docs = list(iter_documents(find_sources([str(path)]), meter=meter, invalid_utf8=policy))
    return docs, meter.invalid_bytes


@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz", "a.md.zst"])
def test_an_invalid_byte_is_named_by_offset_and_line(tmp_path, block, name):
    path = write_bytes(tmp_path / name, compress(BROKEN, Path(name).suffix))
    message = error_of(path)
    line = BROKEN[:30].count(b"\n") + 1
    assert message.endswith(
        f"not UTF-8 text: an invalid byte at offset 30 (line {line}); set data.invalid_utf8=replace or skip to read "
        "past it"
    )


@pytest.mark.parametrize("name", ["a.txt", "a.md.zst"])
def test_invalid_bytes_are_replaced_or_skipped_and_counted(tmp_path, block, name):
    path = write_bytes(tmp_path / name, compress(BROKEN, Path(name).suffix))
    replaced, count = documents_of(path, "replace")
    assert count == 3  # 1 + the 2 bytes of the cut sequence
    assert replaced == BROKEN.decode("utf-8", errors="replace").split("\n\n")  # Python's own rule, as reference
    skipped, count = documents_of(path, "skip")
    assert count == 3 and skipped == BROKEN.decode("utf-8", errors="ignore").split("\n\n")


def test_jsonl_lines_name_their_line_and_can_be_replaced(tmp_path):
    path = write_bytes(tmp_path / "a.jsonl", b'{"text": "ok"}\n{"text": "bad \xff here"}\n')
    assert error_of(path).endswith(
        "a.jsonl:2: not UTF-8 text: an invalid byte at column 14 of the line; set data.invalid_utf8=replace or "
        "skip to read past it"
    )
    docs, count = documents_of(path, "replace")
    assert docs == ["ok", "bad \ufffd here"] and count == 1
