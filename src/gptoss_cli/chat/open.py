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
    compile: bool | None = None,
    **overrides,
):
    """-> a ChatSession (compile: --compile, --no-compile or None, infer/compiled.py's compile_choice). A run
    whose tokenizer has no conversation format is refused with the way out."""
    from ..config import InferConfig
    from ..data.chat_format import chat_format
    from ..data.conversations import UNTUNED, chat_status
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
    if chat_status(fmt, loaded) == UNTUNED:
        warn(
            f"{loaded.run} was trained on text, not on conversations: expect replies that ignore the format "
            f"until it is fine-tuned (gptoss train --init-from {loaded.run} --set data.paths=[CHATS.jsonl])"
        )
    return ChatSession(loaded, fmt, params, system, compile)
