"""JSONL telemetry held by column, so `gptoss report` reads a million lines in tens of megabytes.

A flat record is stored as its scalar fields: numbers in float64 arrays (NaN where a record lacks the field),
other scalars (strings, booleans, null) in lists; list and object fields are not kept (logs.py sums the
expert counts as it reads them). A row reads back as a read-only mapping (`row.get(key)`, `row[key]`), with
integers as integers. A NaN in the file reads back as absent, which is how every reader treated it anyway.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

_ABSENT = object()


class Table:
    def __init__(self) -> None:
        self.n = 0
        self._numbers: dict[str, array] = {}
        self._floats: set[str] = set()  # number columns that hold a non-integer
        self._other: dict[str, list] = {}

    def append(self, record: dict) -> None:
        n, numbers, other = self.n, self._numbers, self._other
        filled = 0
        for key, value in record.items():
            kind = type(value)
            if kind is list or kind is dict:
                continue
            if kind is float or kind is int:  # not bool, whose type is bool
                col = numbers.get(key)
                if col is None:
                    col = numbers[key] = array("d", [math.nan]) * n
                try:
                    col.append(value)
                except OverflowError:  # an integer beyond float range: kept as it is, below
                    pass
                else:
                    if kind is float:
                        self._floats.add(key)
                    filled += 1
                    continue
            col = other.get(key)
            if col is None:
                col = other[key] = [_ABSENT] * n
            col.append(sys.intern(value) if kind is str and len(value) < 64 else value)
            filled += 1
        self.n = n + 1
        if filled < len(numbers) + len(other):  # some fields are not in this record
            for col in numbers.values():
                if len(col) == n:
                    col.append(math.nan)
            for col in other.values():
                if len(col) == n:
                    col.append(_ABSENT)

    def column(self, key: str) -> np.ndarray:
        """The numbers of `key`, NaN where absent: (n,) float64 (a view of the stored array)."""
        col = self._numbers.get(key)
        return np.frombuffer(col, dtype=np.float64) if col is not None and len(col) else np.full(self.n, np.nan)

    def get(self, i: int, key: str, default: Any = None) -> Any:
        col = self._numbers.get(key)
        if col is not None:
            value = col[i]
            if value == value:  # not NaN
                return int(value) if key not in self._floats and value.is_integer() else value
        other = self._other.get(key)
        if other is not None and other[i] is not _ABSENT:
            return other[i]
        return default

    def keys(self, i: int) -> list[str]:
        return [k for k, c in self._numbers.items() if c[i] == c[i]] + [
            k for k, c in self._other.items() if c[i] is not _ABSENT
        ]

    def rows(self, index: np.ndarray | None = None) -> Rows:
        return Rows(self, np.arange(self.n) if index is None else index)


class Row(Mapping):
    """Record i of a Table, read-only."""

    __slots__ = ("_table", "_i")

    def __init__(self, table: Table, i: int):
        self._table, self._i = table, i

    def get(self, key: str, default: Any = None) -> Any:
        return self._table.get(self._i, key, default)

    def __getitem__(self, key: str) -> Any:
        value = self._table.get(self._i, key, _ABSENT)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._table.keys(self._i))

    def __len__(self) -> int:
        return len(self._table.keys(self._i))


class Rows(Sequence):
    """Some rows of a Table, in the order of `index`; each read as a Row."""

    def __init__(self, table: Table, index: np.ndarray):
        self.table, self.index = table, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Rows(self.table, self.index[i])
        return Row(self.table, int(self.index[i]))

    def column(self, key: str) -> np.ndarray:
        """The numbers of `key` for these rows, NaN where absent."""
        return self.table.column(key)[self.index]
