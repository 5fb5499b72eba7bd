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
    from ..output import console, print_json

    cfg = load_config(config, set_)
    cfg.data.paths = list(data)  # the arguments, not YAML: any file name works
    from ..data.corpus import find_sources
    from ..data.dataset import settings_of
    from ..data.prepare import prepare_dataset
    from ..data.tokenizer import check_vocab, load_tokenizer
    from ..output import warn

    given = None
    if tokenizer is not None or cfg.data.tokenizer:
        source = tokenizer or Path(cfg.data.tokenizer)
        if not source.is_file():
            from ..errors import GptossError

            raise GptossError(f"--tokenizer: {source} does not exist")
        given = load_tokenizer(source)
        check_vocab(given, cfg.model.vocab_size, str(source))
    sources = find_sources(cfg.data.paths, warn)
    result = prepare_dataset(sources, out, settings_of(cfg), given, workers=workers, show=not json)
    index = result.index
    summary = {
        "out": str(result.root),
        "cached": result.cached,
        "redone": result.redone,
        "sources": len(index["sources"]),
        "source_bytes": sum(s["size"] for s in index["sources"]),
        "documents": index["documents"],
        "train_tokens": index["train"]["tokens"],
        "val_tokens": index["val"]["tokens"],
        "shards": len(index["train"]["shards"]) + len(index["val"]["shards"]),
        "dtype": index["dtype"],
        "tokenizer_hash": index["tokenizer_hash"],
        "vocab_size": index["vocab_size"],
        "times_s": result.times,
    }
    if json:
        print_json(summary)
        return
    if result.redone:
        warn(
            f"{out}: {len(result.redone)} damaged shard(s) ({', '.join(result.redone[:3])}"
            f"{', ...' if len(result.redone) > 3 else ''}): prepared again from the first of them"
        )
    if result.cached:
        console.print(f"{out}: already prepared (nothing to do)", highlight=False)
    else:
        t = result.times
        mb = summary["source_bytes"] / 1e6
        console.print(
            f"prepared {mb:,.1f} MB from {summary['sources']} file(s): sample {t['read_s']:.1f} s, "
            f"tokenizer {t['tokenizer_s']:.1f} s, tokenizing {t['tokenize_s']:.1f} s "
            f"({mb / max(t['tokenize_s'], 1e-9):,.2f} MB/s)",
            highlight=False,
        )
    console.print(
        f"{summary['train_tokens']:,} training and {summary['val_tokens']:,} validation tokens "
        f"({summary['documents']['train']:,} + {summary['documents']['val']:,} documents) in "
        f"{summary['shards']} shard(s)",
        highlight=False,
    )
    console.print(f"train on it: gptoss train --set data.prepared={out}", highlight=False, soft_wrap=True)
