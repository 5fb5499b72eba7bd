"""Sizes people write in options: 5GB and 500MB (decimal, as transformers' max_shard_size), 2GiB (binary),
1000 (bytes)."""

from __future__ import annotations

import re

from .errors import GptossError

UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int, flag: str) -> int:
    """'5GB' -> 5e9 bytes, '512MiB' -> 512 * 2^20, '1000' -> 1000; anything else is an error naming `flag`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in UNITS or float(match.group(1)) <= 0:
        raise GptossError(f"{flag} {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])
