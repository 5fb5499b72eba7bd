"""Training text: find the files named by data.paths and stream their documents, byte-exact.

What one document is:
- `.txt` and `.md` files: documents are separated by one or more blank lines (a line break is `\\n` or
  `\\r\\n`; a blank line holds nothing but spaces and tabs). The text between separators is kept exactly:
  form feeds, U+2028, `\\r\\n` inside a document are not touched;
- `.jsonl` files: each line is a JSON object and its `data.text_field` (default `text`) is one document;
- `.json` files: one array of such objects;
- `.parquet` files: the `data.text_field` string column, read one row group at a time;
- `.gz` and `.zst` of the text formats above (`a.jsonl.gz`, `b.txt.zst`), decompressed as they stream (a
  file cut short is an error, never a silent fraction: data/compressed.py);
- a directory means every such file below it (sorted; other files are named in one warning); a glob means
  every match (sorted); no paths at all means the built-in sample corpus shipped with the package.

Nothing here holds a whole file: readers are generators, so memory stays bounded whatever the corpus size.
`iter_records` is the seam for record-shaped datasets (one dict per JSON line / array item / parquet row);
`iter_pieces` turns records and text files into documents, a document longer than PIECE_CHARS in pieces
(a text file's huge paragraph is cut as it streams, never held whole; a JSON or parquet record is whole
in memory once, as its reader decodes it), and `iter_documents` joins the pieces (for small corpora).
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import GptossError
from .compressed import decompressing
from .utf8 import Decoder, decode_line

TEXT_KINDS = (".txt", ".md")
RECORD_KINDS = (".jsonl", ".json")
COMPRESSIONS = (".gz", ".zst")
BLOCK = 1 << 22  # 4 MiB read size: large enough for throughput, small enough for bounded memory
PIECE_CHARS = 1 << 20  # a longer document is read, sampled and tokenized in pieces of at most this many characters
_CUT = re.compile(r"(?s:.*)\S(?= )")  # up to the last non-space character followed by a space

# One or more blank lines between two documents: the line break ending the last line of a document,
# then lines of spaces/tabs only. Only \n and \r\n end a line, unlike str.splitlines(). The pattern
# starts at the \n (a literal the regex engine scans for, 3x faster than a leading `\r?`); the \r of a
# \r\n that ends a document is cut from the piece before it.
_SEPARATOR = re.compile(r"\n(?:[ \t]*\r?\n)+")
_LEADING_BLANK = re.compile(r"(?:[ \t]*\r?\n)+")
_TRAILING_BREAK = re.compile(r"(?:\r?\n[ \t]*)+\Z")


@dataclass(frozen=True)
class Source:
    """One input file: its path, its size on disk and its kind (`.txt`, `.jsonl`, `.parquet`, ...)."""

    path: Path
    size: int
    kind: str
    compression: str = ""  # "", ".gz" or ".zst"


class Meter:
    """Bytes of source files consumed so far (on disk, so compressed files count compressed bytes)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.invalid_bytes = 0  # bytes that were not UTF-8, replaced or skipped (data.invalid_utf8)


def builtin_corpus_path() -> Path:
    return Path(str(resources.files("gptoss_cli").joinpath("assets/sample_corpus.txt")))


def classify(path: Path) -> tuple[str, str] | None:
    """(kind, compression) for a readable file name, None for anything else."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else ""
    kind = suffixes[-1] if suffixes else ""
    if kind in TEXT_KINDS + RECORD_KINDS or (kind == ".parquet" and not compression):
        return kind, compression
    return None


def _source(path: Path) -> Source:
    kind, compression = classify(path)
    return Source(path, path.stat().st_size, kind, compression)


KNOWN = ".txt, .md, .jsonl, .json, .parquet (and .gz / .zst of the text ones)"


def find_sources(paths: list[str], warn=None) -> list[Source]:
    """The files named by data.paths, in a stable order; [] paths = the built-in corpus.
    Files of other kinds inside a directory are named in one warning through `warn`."""
    if not paths:
        return [_source(builtin_corpus_path())]
    sources, skipped = [], []
    for spec in paths:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            found = [p for p in files if classify(p)]
            skipped += [p for p in files if not classify(p)]
            if not found:
                raise GptossError(f"data.paths: directory {spec} holds no readable files ({KNOWN})")
        elif path.is_file():
            if not classify(path):
                raise GptossError(f"data.paths: {spec} is not a readable kind of file ({KNOWN})")
            found = [path]
        elif any(ch in spec for ch in "*?["):
            found = sorted(
                Path(p)
                for p in glob.glob(os.path.expanduser(spec), recursive=True)
                if Path(p).is_file() and classify(Path(p))
            )
            if not found:
                raise GptossError(f"data.paths: pattern {spec} matches no readable files ({KNOWN})")
        else:
            raise GptossError(f"data.paths: {spec} does not exist")
        sources += [_source(p) for p in found]
    if skipped and warn is not None:
        shown = ", ".join(str(p) for p in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warn(f"data.paths: skipping {len(skipped)} file{'s' if len(skipped) > 1 else ''} of other kinds: {shown}")
    return sources


class _Counting(io.RawIOBase):
    """A file read through this adds the bytes it reads to a Meter (progress bars in MB/s)."""

    def __init__(self, f, meter: Meter):
        self.f, self.meter = f, meter

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        self.meter.bytes += n or 0
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _open_binary(src: Source, meter: Meter):
    raw = io.BufferedReader(_Counting(open(src.path, "rb"), meter), BLOCK)  # noqa: SIM115 - closed by caller
    return decompressing(raw, src.compression, BLOCK)


def _blocks(src: Source, meter: Meter, invalid_utf8: str = "error") -> Iterator[str]:
    """The file's text in blocks, decoded as UTF-8 without changing a line break; then one ""."""
    decoder = Decoder(src.path, invalid_utf8, meter)
    with _open_binary(src, meter) as f:
        while True:
            data = f.read(BLOCK)
            text = decoder.decode(data, final=not data)
            if text or not data:  # "" only at the end: a block inside one UTF-8 character decodes to ""
                yield text
            if not data:
                return


def _clean(piece: str) -> str:
    """A piece between separators -> the document: blank lines at a file's start and line breaks at its
    end are not part of it; a piece of whitespace only is no document."""
    lead = _LEADING_BLANK.match(piece)
    if lead:
        piece = piece[lead.end() :]
    piece = _TRAILING_BREAK.sub("", piece)
    return piece if piece.strip() else ""


def cut_point(text: str, start: int, limit: int) -> int:
    """Where a piece of a long document that begins at `start` ends: before the last space that follows a
    non-space character in the second half of the next `limit` characters (a byte-level BPE pre-tokenizer
    always splits there, so the pieces tokenize exactly as the whole document does), else after `limit`."""
    m = _CUT.match(text, start + limit // 2, start + limit + 1)
    return m.end() if m else start + limit


def _partial_separator(carry: str) -> int:
    """Where a separator that the next block may complete could begin in `carry` (len(carry) if nowhere)."""
    last = carry.rfind("\n")
    if last >= 0 and not carry[last + 1 :].strip(" \t\r"):
        return last
    return len(carry)


def _paragraphs(src: Source, meter: Meter, invalid_utf8: str = "error") -> Iterator[tuple[str, bool]]:
    """(piece, last) for the documents of a text file: a document longer than PIECE_CHARS comes in pieces (its
    last one marked), cut as it streams, so memory stays bounded for a file that is one huge line."""
    carry, begun = "", False  # begun: pieces of the document at the start of `carry` were yielded already
    for block in _blocks(src, meter, invalid_utf8):
        carry += block
        if not block:
            break
        pieces = _SEPARATOR.split(carry)
        # The last piece may continue in the next block (and so may a separator touching the end).
        carry = pieces.pop()
        if pieces and begun:  # the rest of a document yielded in pieces
            rest = pieces.pop(0)
            yield rest[:-1] if rest.endswith("\r") else rest, True
            begun = False
        elif pieces:
            # The separator is greedy and the leftmost match wins, so a piece between two separators of one
            # split neither starts with a blank line nor ends with a line break: only the first piece (the
            # file's start, or text after a separator that straddled the block boundary) needs trimming, and
            # _clean's trailing regex (a scan of the whole piece) runs once per file instead of per document.
            pieces[0] = pieces[0][m.end() :] if (m := _LEADING_BLANK.match(pieces[0])) else pieces[0]
        for piece in pieces:
            if piece.endswith("\r"):
                piece = piece[:-1]
            if piece and not piece.isspace():  # isspace: strip()'s test without copying the document
                yield piece, True
        safe = _partial_separator(carry)
        while len(carry) > PIECE_CHARS and safe > PIECE_CHARS:  # cut nothing a separator may still claim
            cut = cut_point(carry, 0, PIECE_CHARS)
            head = carry[:cut]
            if not begun and (m := _LEADING_BLANK.match(head)):
                head = head[m.end() :]
            yield head, False
            carry, safe, begun = carry[cut:], safe - cut, True
    if begun:
        yield _TRAILING_BREAK.sub("", carry), True
    elif doc := _clean(carry):
        yield doc, True


def _pieces(text: str) -> Iterator[tuple[str, bool]]:
    """(piece, last) of one document held whole (a JSON or parquet record)."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = cut_point(text, start, PIECE_CHARS)
        yield text[start:cut], False
        start = cut
    yield text[start:] if start else text, True


def _json_lines(src: Source, meter: Meter, invalid_utf8: str = "error") -> Iterator[tuple[int, object]]:
    with _open_binary(src, meter) as f:
        for n, raw in enumerate(f, 1):
            line = decode_line(raw, src.path, n, invalid_utf8, meter)
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as err:
                raise GptossError(f"{src.path}:{n}: invalid JSON ({err.msg})") from None


def _json_array(src: Source, meter: Meter, invalid_utf8: str = "error") -> Iterator[tuple[int, object]]:
    """Items of one top-level JSON array, decoded one at a time from a sliding text buffer."""
    decoder = json.JSONDecoder()
    blocks = _blocks(src, meter, invalid_utf8)
    buf, pos, item, started = "", 0, 0, False
    ws = re.compile(r"[ \t\r\n]*")
    while True:
        pos = ws.match(buf, pos).end()
        if pos >= len(buf) - 1 and (block := next(blocks, "")):  # keep one look-ahead character
            buf, pos = buf[pos:] + block, 0
            continue
        if not started:
            if buf[pos : pos + 1] != "[":
                raise GptossError(f"{src.path}: expected a JSON array of objects")
            started, pos = True, pos + 1
            continue
        if buf[pos : pos + 1] == "]":
            return
        if item and buf[pos : pos + 1] == ",":
            pos += 1
            continue
        if pos >= len(buf):
            raise GptossError(f"{src.path}: invalid JSON (the array is not closed)")
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as err:
            block = next(blocks, "")
            if not block:
                raise GptossError(f"{src.path}: invalid JSON in item {item + 1} ({err.msg})") from None
            buf, pos = buf[pos:] + block, 0  # the item continues in the next block
            continue
        if end == len(buf) and (block := next(blocks, "")):  # a number may continue in the next block
            buf, pos = buf[pos:] + block, 0
            continue
        item += 1
        yield item, obj
        pos = end  # the buffer is cut only when it is refilled: no copy per item


def _parquet_texts(src: Source, meter: Meter, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
    except (pa.ArrowException, OSError) as err:
        raise GptossError(f"{src.path}: not a readable parquet file ({err})") from None
    schema = pf.schema_arrow
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if not strings:
        raise GptossError(f"{src.path}: no string column to read text from")
    if field not in strings:
        raise GptossError(
            f"{src.path}: no string column {field!r} (string columns: {', '.join(strings)}); set data.text_field"
        )
    groups = pf.num_row_groups
    for g in range(groups):
        for text in pf.read_row_group(g, columns=[field]).column(0).to_pylist():
            if text and text.strip():
                yield text
        meter.bytes += src.size // groups + (src.size % groups if g == groups - 1 else 0)


def iter_records(src: Source, meter: Meter, invalid_utf8: str = "error") -> Iterator[tuple[str, dict]]:
    """One dict per JSON line or array item, with where it came from (`file:line` / `file item N`)."""
    lines = src.kind == ".jsonl"
    for n, obj in (_json_lines if lines else _json_array)(src, meter, invalid_utf8):
        where = f"{src.path}:{n}" if lines else f"{src.path} item {n}"
        if not isinstance(obj, dict):
            raise GptossError(f"{where}: expected a JSON object")
        yield where, obj


def iter_pieces(
    sources: list[Source], text_field: str = "text", meter: Meter | None = None, invalid_utf8: str = "error"
) -> Iterator[tuple[str, bool]]:
    """(piece, last) for every document of every source, in order: a document of at most PIECE_CHARS
    characters is one piece, a longer one several (their concatenation is the document); `last` marks the
    end of a document. `meter` counts the bytes read (for progress)."""
    meter = meter or Meter()
    for src in sources:
        start = meter.bytes
        try:
            if src.kind in TEXT_KINDS:
                yield from _paragraphs(src, meter, invalid_utf8)
            elif src.kind == ".parquet":
                for text in _parquet_texts(src, meter, text_field):
                    yield from _pieces(text)
            else:
                for where, obj in iter_records(src, meter, invalid_utf8):
                    text = obj.get(text_field)
                    if not isinstance(text, str):
                        raise GptossError(f"{where}: expected an object with a string {text_field!r} field")
                    if text.strip():
                        yield from _pieces(text)
        except UnicodeDecodeError:  # a reader that decodes by itself (parquet strings are UTF-8 by definition)
            raise GptossError(f"{src.path}: not UTF-8 text") from None
        except (OSError, EOFError) as err:  # EOFError: a truncated .gz
            raise GptossError(f"{src.path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
        except Exception as err:
            if type(err).__module__.startswith("zstandard"):  # zstandard.ZstdError: a damaged .zst
                raise GptossError(f"{src.path}: cannot decompress ({err})") from None
            raise
        meter.bytes = start + src.size  # exact once a file is done, whatever its readers counted


def iter_documents(
    sources: list[Source], text_field: str = "text", meter: Meter | None = None, invalid_utf8: str = "error"
) -> Iterator[str]:
    """Every document of every source, whole, in order (prepare reads pieces: a document may be huge)."""
    parts: list[str] = []
    for piece, last in iter_pieces(sources, text_field, meter, invalid_utf8):
        parts.append(piece)
        if last:
            yield parts[0] if len(parts) == 1 else "".join(parts)
            parts = []


def load_documents(paths: list[str], text_field: str = "text") -> list[str]:
    """All documents named by data.paths as one list (small corpora and tests; training streams instead)."""
    docs = list(iter_documents(find_sources(paths), text_field))
    if not docs:
        raise GptossError(f"data.paths: no text found in {', '.join(paths) or 'the built-in corpus'}")
    return docs


def split_documents(docs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split of an in-memory list (conversations for fine-tuning; text goes through
    data/prepare.py's streamed split): a seeded shuffle of indices; at least one validation item whenever
    val_fraction > 0 and there are two or more."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = round(len(docs) * val_fraction)
    if val_fraction > 0 and len(docs) >= 2:
        n_val = max(1, min(n_val, len(docs) - 1))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


def expand_paths(spec: str) -> list[Path]:
    """One data.paths entry -> its files (data/conversations.py reads the same paths)."""
    return [src.path for src in find_sources([spec])]
