"""Open a run for chatting: its weights, its conversation format, and the sampling settings, checked first."""

from __future__ import annotations

from pathlib import Path

from ..errors import GptossError


def open_chat(
    run: Path | None = None,
    checkpoint: Path | None = None,
    system: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    **overrides,
):
    """-> a ChatSession. A run whose tokenizer has no conversation format is refused with the way out."""
    from ..config import InferConfig
    from ..data.chat_format import ChatFormat, chat_format
    from ..data.tokenizer import check_text
    from ..infer.sampling import option_label
    from ..output import warn
    from ..run.open import load_run
    from .session import ChatSession

    InferConfig().with_overrides(option_label, **overrides)  # bad options fail before the weights load
    if system is not None:
        check_text(system, "--system")
    loaded = load_run(run, checkpoint, device, dtype)
    fmt = chat_format(loaded.tokenizer, loaded.run.chat_template)
    if fmt is None:
        raise GptossError(
            f"{loaded.run} has no conversation format (its tokenizer predates it): continue text with "
            f"`gptoss infer --run {loaded.run}`, or fine-tune it on conversations first: gptoss train "
            f"--init-from {loaded.run} --set data.paths=[CHATS.jsonl] (see docs/chat.md)"
        )
    params = loaded.config.infer.with_overrides(option_label, **overrides)
    if (
        type(fmt) is ChatFormat
        and not _trained_on_conversations(loaded.config.data.paths)
        and loaded.state.imported_from is None
    ):
        warn(
            f"{loaded.run} was trained on text, not on conversations: expect replies that ignore the format "
            f"until it is fine-tuned (gptoss train --init-from {loaded.run} --set data.paths=[CHATS.jsonl])"
        )
    return ChatSession(loaded, fmt, params, system)


def _trained_on_conversations(paths: list[str]) -> bool:
    """Whether the run config's data.paths name conversation files; paths that no longer resolve (moved, or
    relative to another directory) give the benefit of the doubt."""
    from ..data.conversations import is_conversation_file
    from ..data.corpus import expand_paths

    try:
        return any(is_conversation_file(f) for spec in paths for f in expand_paths(spec))
    except GptossError:
        return True
