"""Bytes to text for the corpus readers, with `data.invalid_utf8` deciding what happens to bytes that are not
UTF-8 (real corpora hold a few):

    error     (the default) stop with the file, the byte offset and the line of the first bad byte
    replace   each invalid sequence becomes U+FFFD, and is counted
    skip      each invalid sequence is dropped, and counted

The count reaches `gptoss prepare`'s summary (and the dataset's index) through the readers' Meter. Offsets
are into the decompressed text, so they point into what `zcat` or `zstdcat` shows.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from ..errors import GptossError

POLICIES = ("error", "replace", "skip")


class Decoder:
    """An incremental UTF-8 decoder of one file that knows where it is (bytes, lines) for its error."""

    def __init__(self, path: Path, policy: str, meter):
        if policy not in POLICIES:
            raise GptossError(f"data.invalid_utf8: expected one of {', '.join(POLICIES)}, got {policy!r}")
        self.path, self.policy, self.meter = path, policy, meter
        self._inner = codecs.getincrementaldecoder("utf-8")("strict")
        self._offset = 0  # bytes handed to the inner decoder and decoded (its buffer excluded)
        self._lines = 1

    def decode(self, data: bytes, final: bool = False) -> str:
        out = []
        while True:
            pending = len(self._inner.getstate()[0])  # bytes of an unfinished character from the last call
            try:
                text = self._inner.decode(data, final)
            except UnicodeDecodeError as err:
                buf = bytes(err.object)  # the held-back bytes, then `data`
                good = buf[: err.start].decode("utf-8")
                line = self._lines + good.count("\n")
                if self.policy == "error":
                    raise GptossError(
                        f"{self.path}: not UTF-8 text: an invalid byte at offset {self._offset + err.start:,} "
                        f"(line {line}); set data.invalid_utf8=replace or skip to read past it"
                    ) from None
                out.append(good + ("\ufffd" if self.policy == "replace" else ""))
                self.meter.invalid_bytes += err.end - err.start
                self._offset, self._lines = self._offset + err.end, line
                self._inner.reset()
                data = buf[err.end :]
                continue
            self._offset += pending + len(data) - len(self._inner.getstate()[0])
            self._lines += text.count("\n")
            out.append(text)
            return "".join(out)


def decode_line(raw: bytes, path: Path, line: int, policy: str, meter) -> str:
    """One line of a JSON Lines file (line numbers are known there)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if policy == "error":
            raise GptossError(
                f"{path}:{line}: not UTF-8 text: an invalid byte at column {err.start + 1} of the line; set "
                "data.invalid_utf8=replace or skip to read past it"
            ) from None
    decoder = Decoder(path, policy, meter)
    return decoder.decode(raw, final=True)
