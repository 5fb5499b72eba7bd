"""open_run(): a run directory or checkpoint -> its config, checkpoint state and tokenizer, verified together.

Every stage that reads a trained run (infer, chat, serve, eval, export, resume, --init-from) comes through
here, so "which checkpoint", "which config" and "is this the tokenizer the weights were trained with" are
answered once, with one set of error messages.

    --checkpoint C     that step directory (or the newest under C); its run is C's RUN/ (or C itself)
    --run R            R's newest complete checkpoint
    neither            the newest run under ./runs that holds checkpoints
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ..config import RunConfig, config_from_dict
from ..data.tokenizer import check_vocab, load_tokenizer, tokenizer_hash
from ..errors import GptossError
from .checkpoint import CheckpointState, read_state, resolve_checkpoint
from .layout import CHECKPOINTS, MODEL, STATE, TOKENIZER, RunDir


@dataclass
class OpenRun:
    run: RunDir
    checkpoint: Path  # the step directory
    state: CheckpointState
    config: RunConfig  # config.yaml's infer/train sections; the model shapes the weights were saved with
    tokenizer: Tokenizer | None  # None only when opened with need_tokenizer=False and the run has none
    tokenizer_path: Path | None

    @property
    def weights(self) -> Path:
        return self.checkpoint / MODEL

    @property
    def step(self) -> int:
        return self.state.step


def locate(run: Path | None, checkpoint: Path | None) -> tuple[RunDir, Path]:
    """(run directory, checkpoint directory) from --run and/or --checkpoint (default: the newest run)."""
    if checkpoint is not None:
        if not Path(checkpoint).exists():
            raise GptossError(f"checkpoint {checkpoint} does not exist")
        ckpt = resolve_checkpoint(checkpoint)
        return (RunDir(run) if run is not None else RunDir.of_checkpoint(ckpt)), ckpt
    if run is None:
        found = RunDir.newest(need=CHECKPOINTS)
    elif not Path(run).is_dir():
        raise GptossError(
            f"run directory {run} does not exist; train one first: gptoss train --config tiny --run {run}"
        )
    else:
        found = RunDir(run)
    return found, resolve_checkpoint(found.path)


def run_config(run: RunDir, ckpt: Path, state: CheckpointState) -> RunConfig:
    """RUN/config.yaml (its infer section gives the defaults); the model shapes come from the checkpoint,
    whatever config.yaml says now."""
    saved = config_from_dict(state.config, str(ckpt / STATE)) if state.config is not None else None
    if run.config.is_file():
        cfg = run.read_config()
        if saved is not None:
            cfg.model = saved.model
        return cfg
    if saved is None:
        raise GptossError(f"{run}: no config.yaml, and {ckpt / STATE} holds no config")
    return saved


def find_tokenizer(run: RunDir, ckpt: Path) -> Path | None:
    """RUN/tokenizer.json, else one inside the step directory (a copied lone checkpoint)."""
    return next((p for p in (run.tokenizer, ckpt / TOKENIZER) if p.is_file()), None)


def check_tokenizer(tok: Tokenizer, path: Path, state: CheckpointState, ckpt: Path) -> None:
    """The tokenizer must be the one the checkpoint was trained with (when the checkpoint recorded it)."""
    actual = tokenizer_hash(tok)
    if state.tokenizer_hash and state.tokenizer_hash != actual:
        raise GptossError(
            f"{path} (hash {actual}) is not the tokenizer checkpoint {ckpt.name} was trained "
            f"with (hash {state.tokenizer_hash}); use the run directory the checkpoint came from"
        )


def open_run(run: Path | None = None, checkpoint: Path | None = None, *, need_tokenizer: bool = True) -> OpenRun:
    """Find a run and its checkpoint, read its config and state, load and verify its tokenizer."""
    run_dir, ckpt = locate(run, checkpoint)
    state = read_state(ckpt)
    cfg = run_config(run_dir, ckpt, state)
    tok_path = find_tokenizer(run_dir, ckpt)
    tok = None
    if tok_path is None:
        if need_tokenizer:
            raise GptossError(f"{run_dir}: no tokenizer.json (the run directory that train wrote holds one)")
    else:
        tok = load_tokenizer(tok_path)
        check_tokenizer(tok, tok_path, state, ckpt)
        check_vocab(tok, cfg.model.vocab_size, str(tok_path))
    return OpenRun(run_dir, ckpt, state, cfg, tok, tok_path)
