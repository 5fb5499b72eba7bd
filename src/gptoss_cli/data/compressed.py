"""Decompressing corpus files as they stream, so that a file cut short is an error, never a silent fraction.

`.gz`: the standard library's gzip raises EOFError at a member cut short. `.zst`: python-zstandard's
stream reader returns what it decoded and stops, so this reader drives a decompression object instead and
checks its `eof` (the frame is complete) when the file ends; frames follow one another (as `zstd` and
`pzstd` write them), and anything after the last frame that is not a frame is an error too.
"""

from __future__ import annotations

import io

FEED = 1 << 12  # compressed bytes per decompression call: a zstd block expands at most ~32,000-fold,
# so one call yields at most ~128 MiB even for a pathological file (and a few times FEED for text)


class TruncatedError(EOFError):
    """The compressed stream ended inside a frame."""


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file of one or more frames; TruncatedError if the last is cut short."""

    def __init__(self, raw):
        import zstandard

        self.raw, self._zstd = raw, zstandard
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._started = False  # the current frame has been fed bytes
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame.eof:  # the frame ended: what follows is the next frame
                self._frame = self._zstd.ZstdDecompressor().decompressobj()
            out.append(self._frame.decompress(data))
            self._started = True
            data = self._frame.unused_data if self._frame.eof else b""
        return b"".join(out)

    def readinto(self, buffer) -> int:
        while self._pos >= len(self._out):
            data = self.raw.read(FEED)
            if not data:
                if self._started and not self._frame.eof:
                    raise TruncatedError("the compressed data ends inside a zstd frame (the file is cut short)")
                return 0
            self._out, self._pos = self._feed(data), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def decompressing(raw, compression: str, block: int):
    """`raw` (a binary file) read through its compression ("" = none), buffered in `block`-byte reads."""
    if compression == ".gz":
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == ".zst":
        return io.BufferedReader(ZstdReader(raw), block)
    return raw
