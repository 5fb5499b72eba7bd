"""`gptoss prepare`: tokenize a corpus once into token shards that `train` memory-maps (data.prepared)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import ConfigOpt, JsonOpt, SetOpt


def command(
    data: Annotated[
        list[str],
        typer.Argument(
            help="Files, directories or globs (.txt .md .jsonl .json .parquet, and .gz / .zst of the text ones).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="The prepared dataset's directory (new, or an unfinished one to continue)."),
    ],
    config: ConfigOpt = "compact",
    set_: SetOpt = None,
    tokenizer: Annotated[
        Path | None, typer.Option("--tokenizer", help="Encode with this tokenizer.json instead of training one.")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", "-w", min=0, help="Tokenizer processes (0 = all cores).")] = 0,
    json: JsonOpt = False,
) -> None:
    """Read documents, train the tokenizer once on a sample, and write token shards plus an index.

    The config gives model.vocab_size, data.text_field, data.val_fraction, data.tokenizer_sample_bytes and
    train.seed. A killed prepare, run again with the same arguments, keeps its finished shards (each checked)
    and continues; a dataset with a damaged shard is prepared again from that shard.

    Example: gptoss prepare docs/ books.jsonl.zst --out data/books -c tiny;  then
    gptoss train -c tiny --set data.prepared=data/books
    """
    from ..config import load_config
    from ..data.dataset import prepare_paths
    from ..output import console, print_json, warn

    cfg = load_config(config, set_)
    cfg.data.paths = list(data)  # the arguments, not YAML: any file name works
    summary = prepare_paths(cfg, out, tokenizer, workers=workers, show=not json)
    if json:
        print_json(summary)
        return
    if summary["redone"]:
        redone = summary["redone"]
        warn(
            f"{out}: {len(redone)} damaged shard(s) ({', '.join(redone[:3])}{', ...' if len(redone) > 3 else ''}): "
            "prepared again from the first of them"
        )
    if summary["cached"]:
        console.print(f"{out}: already prepared (nothing to do)", highlight=False)
    else:
        t = summary["times_s"]
        mb = summary["source_bytes"] / 1e6
        console.print(
            f"prepared {mb:,.1f} MB from {summary['sources']} file(s): sample {t['read_s']:.1f} s, "
            f"tokenizer {t['tokenizer_s']:.1f} s, tokenizing {t['tokenize_s']:.1f} s "
            f"({mb / max(t['tokenize_s'], 1e-9):,.2f} MB/s)",
            highlight=False,
        )
    invalid = summary["invalid_utf8"]
    if invalid["bytes"]:
        done = "replaced by U+FFFD" if invalid["policy"] == "replace" else "skipped"
        console.print(f"{invalid['bytes']:,} bytes that are not UTF-8 were {done} (data.invalid_utf8)", highlight=False)
    console.print(
        f"{summary['train_tokens']:,} training and {summary['val_tokens']:,} validation tokens "
        f"({summary['documents']['train']:,} + {summary['documents']['val']:,} documents) in "
        f"{summary['shards']} shard(s)",
        highlight=False,
    )
    console.print(f"train on it: {train_hint(config, set_, out)}", highlight=False, soft_wrap=True)


def train_hint(config: str, overrides: list[str] | None, out: Path) -> str:
    """The train command for this dataset, with the config and the model/train overrides it was prepared
    with (the tokenizer's vocabulary is the config's model.vocab_size; data.* settings stay behind: the
    prepared directory holds its text)."""
    import shlex

    sets = [o for o in overrides or [] if not o.strip().startswith("data.")] + [f"data.prepared={out}"]
    return " ".join(["gptoss train -c", shlex.quote(config), *(f"--set {shlex.quote(o)}" for o in sets)])
