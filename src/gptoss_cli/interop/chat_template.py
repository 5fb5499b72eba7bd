"""Chat templates across the Hugging Face boundary, for export.py and import_.py.

Export: the run's conversation format as the `chat_template` of tokenizer_config.json (transformers'
apply_chat_template renders it to the ids data/chat_format.py renders) and the tokens that end a reply added to
generation_config.json's eos_token_id, so generate() and pipeline() stop at the end of the turn.
Import: a directory's template (tokenizer_config.json's `chat_template`, or chat_template.jinja as
transformers >= 4.43 saves it) is kept with the run, with the special tokens it refers to.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from ..data.chat_format import CHAT_TEMPLATE, TemplateFormat, chat_format, save_template
from ..errors import GptossError
from ..output import warn
from .source import SourceDir

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def export_chat(tok: Tokenizer, template: Path) -> dict | None:
    """{"template", "special", "stop_ids"} for the run's format (`template`: its chat_template.json); None when
    it has none."""
    fmt = chat_format(tok, template)
    if fmt is None:
        return None
    special = fmt.special if isinstance(fmt, TemplateFormat) else {}
    return {"template": fmt.template, "special": special, "stop_ids": sorted(fmt.stop_ids)}


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_hf_template(src: SourceDir, root: Path, tok: Tokenizer) -> dict | None:
    """The chat template in `root` (a directory of `src`) with its special tokens and reply-ending tokens;
    None without one."""
    config_path = root / "tokenizer_config.json"
    config = {}
    text = src.text(config_path, "tokenizer_config.json")
    if text is not None:
        try:
            config = json.loads(text)
        except ValueError as err:
            warn(f"{config_path}: not valid JSON ({err}); importing without a chat template")
            return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    jinja = src.text(root / "chat_template.jinja", "chat template")
    if jinja is not None:
        template = jinja
    if not isinstance(template, str) or not template.strip():
        return None
    special = {k: v for k in SPECIAL_KEYS if (v := _token_text(config.get(k))) is not None}
    stop_tokens = None
    gen = src.text(root / "generation_config.json", "generation_config.json")
    if gen is not None:
        try:
            eos = json.loads(gen).get("eos_token_id")
        except (ValueError, AttributeError):
            eos = None
        ids = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        stop_tokens = [t for t in map(tok.id_to_token, [i for i in ids if isinstance(i, int)]) if t] or None
    return {"template": template, "special": special, "stop_tokens": stop_tokens}


def keep_hf_template(found: dict, tok: Tokenizer, path: Path, source: str) -> bool:
    """Write `path`, the run's chat_template.json (unless it is gptoss's own format, which the tokenizer
    already implies); a template that cannot be compiled is refused here, before the run exists."""
    if found["template"] == CHAT_TEMPLATE and chat_format(tok) is not None:
        return False
    try:
        TemplateFormat(tok, found["template"], found["special"], found["stop_tokens"], source)
    except GptossError as err:
        raise GptossError(f"{err} (the chat template of {source})") from None
    save_template(path, found["template"], found["special"], found["stop_tokens"] or [])
    return True
