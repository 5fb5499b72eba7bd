"""docs/configs.md against the config dataclasses: every field of every section is documented, with the
default the code has, and the page documents no field that does not exist."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from gptoss_cli.config import SECTIONS

DOC = Path(__file__).resolve().parents[2] / "docs" / "configs.md"


def documented() -> dict[str, dict[str, str]]:
    """{section: {key: default as written}} from the `| key | type | default | meaning |` tables."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        heading = re.fullmatch(r"## `(\w+)`", line.strip())
        if heading:
            section = heading.group(1)
            tables[section] = {}
            continue
        row = line.strip().strip("|")
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)] if line.startswith("|") else []
        if section and len(cells) >= 4 and cells[0].startswith("`"):
            keys = re.findall(r"`(\w+)`", cells[0])
            defaults = [d.strip() for d in cells[2].split(",")] if len(keys) > 1 else [cells[2]]
            for key, default in zip(keys, defaults, strict=True):
                tables[section][key] = default
    return tables


def code_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_field_is_documented_with_its_default_and_none_is_invented(section):
    docs = documented().get(section)
    assert docs is not None, f"docs/configs.md has no `{section}` table"
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    assert set(fields) - set(docs) == set(), f"{section}: fields missing from docs/configs.md"
    assert set(docs) - set(fields) == set(), f"{section}: docs/configs.md documents fields that do not exist"
    for key, f in fields.items():
        written = yaml.safe_load(docs[key].replace("\\|", "|"))
        expected = code_default(f)
        if isinstance(expected, float) or isinstance(written, float):
            assert float(written) == pytest.approx(float(expected)), f"{section}.{key}: default {docs[key]}"
        else:
            assert written == expected, f"{section}.{key}: docs say {docs[key]!r}, the code has {expected!r}"
