"""README's quick-start transcript stays true: every line kind it shows is printed by `gptoss train` in
exactly that format (the numbers are one CPU's and are documented as such), and its follow-up commands run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
NUM = r"[0-9][0-9,]*(?:\.[0-9]+)?"
LINE_KINDS = {
    "model": r"^building the model for \S+ on \w+$",
    "setup": rf"^setup: read {NUM} s, tokenizer {NUM} s, tokenize {NUM} s, model {NUM} s( \(data .+\))?$",
    "header": rf"^run \S+: {NUM} steps; global batch {NUM} x {NUM} accumulation x {NUM} process(es)? = {NUM} "
    rf"sequences of {NUM} tokens; \w+ \([\w-]+(; {NUM} threads?: .+)?\)$",
    "untrained": rf"^Step 0 \(untrained\): validation loss {NUM}, ppl {NUM}; ln\(vocab_size\) = {NUM}$",
    "step": rf"^Epoch {NUM}, Step {NUM}: Loss={NUM}, PPL={NUM}, Acc={NUM}, LR={NUM}e[-+][0-9]+$",
    "epoch": rf"^Epoch {NUM} completed\. Average Loss: {NUM}$",
    "validation": rf"^  validation: loss {NUM}, ppl {NUM}$",
    "done": rf"^completed: {NUM} steps, {NUM} tokens in {NUM} s \({NUM} tokens/s\)$",
    "final": rf"^final loss {NUM}, best validation loss {NUM}$",
    "run": r"^run: \S+$",
    "checkpoint": r"^checkpoint: \S+/checkpoints/step-[0-9]{8}$",
}


def kinds(lines: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in lines:
        for kind, pattern in LINE_KINDS.items():
            if re.match(pattern, line):
                found.setdefault(kind, []).append(line)
    return found


def readme_transcript() -> list[str]:
    text = README.read_text(encoding="utf-8")
    block = text.split("The first prints", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.strip() and line.strip() != "..."]


def test_every_readme_transcript_line_has_a_known_format():
    lines = readme_transcript()
    found = kinds(lines)
    unknown = [line for line in lines if not any(line in v for v in found.values())]
    assert not unknown, unknown
    assert set(found) == set(LINE_KINDS)


@pytest.mark.usefixtures("torch_one_thread", "isolated_cache")
def test_gptoss_train_prints_every_line_kind_of_the_readme(gptoss, small_overrides, small_corpus, tmp_path):
    # small_corpus holds 6 batches: the 8 steps cross an epoch boundary, as the README's run does
    sets = [
        a
        for o in [*small_overrides, "train.log_every=3", "train.max_steps=8", f"data.paths={small_corpus}"]
        for a in ("--set", o)
    ]
    code, out, err = gptoss("train", "--config", "tiny", *sets, "--run", tmp_path / "demo")
    assert code == 0, err
    printed = kinds(err.splitlines())
    assert set(printed) == set(LINE_KINDS), err
    assert printed["step"][0].startswith("Epoch 0, Step 3: Loss=")
