"""Open a run for chatting: its weights, its conversation format, and the sampling settings, checked first."""

from __future__ import annotations

from pathlib import Path

from ..errors import GptossError


def open_chat(run: Path | None = None, checkpoint: Path | None = None, system: str | None = None,
              device: str = "auto", dtype: str = "auto", **overrides):
    """-> a ChatSession. A run whose tokenizer has no conversation format is refused with the way out."""
    from ..config import InferConfig
    from ..infer.generate import load_run
    from ..infer.sampling import SamplingParams
    from .format import chat_format
    from .session import ChatSession

    SamplingParams.from_config(InferConfig(), **overrides)  # bad options fail before the weights load
    loaded = load_run(run, checkpoint, device, dtype)
    fmt = chat_format(loaded.tokenizer, loaded.run_dir)
    if fmt is None:
        raise GptossError(
            f"{loaded.run_dir} has no conversation format (its tokenizer predates it): continue text with "
            f"`gptoss infer --run {loaded.run_dir}`, or fine-tune it on conversations first: gptoss train "
            f"--init-from {loaded.run_dir} --set data.paths=[CHATS.jsonl] (see docs/chat.md)")
    params = SamplingParams.from_config(loaded.config.infer, **overrides)
    return ChatSession(loaded, fmt, params, system)
