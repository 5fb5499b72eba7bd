"""The conversation format: a list of messages <-> token ids. The only module that knows how a chat is laid out.

Runs trained here use a harmony-shaped format (openai/harmony, docs/format.md; openai/gpt-oss's chat template):

    <|start|>{role}<|message|>{content}<|end|>      one per message; roles system, developer, user, assistant
    <|start|>assistant<|message|>                   the generation prompt: the model writes the reply after it
    ...{reply}<|return|>                            the model ends its final reply with <|return|>

A conversation rendered for training ends its last assistant turn with `<|return|>` (what the model must
learn to emit); a history rendered for generation closes every turn with `<|end|>`. Both end a reply.

A run imported from a Hugging Face directory keeps that directory's own Jinja chat template (RUN/chat_template.json,
written by `gptoss import`); it is rendered in jinja2's ImmutableSandboxedEnvironment with the globals
transformers gives it (transformers' chat_template_utils.py), then tokenized as transformers does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import GptossError

ROLES = ("system", "developer", "user", "assistant")
START, MESSAGE, END, RETURN, CHANNEL = "<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|channel|>"
# Tokens that end a reply under a foreign template, when present in its tokenizer (gpt-oss: <|return|>, <|call|>).
FOREIGN_STOPS = (RETURN, "<|call|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")

# Our format as a Jinja chat template, for exported tokenizers: transformers' apply_chat_template renders it to
# exactly the ids ChatFormat.render gives (a test checks this through transformers).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'developer', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' ~ message['role'] ~ ': expected system, developer, user or assistant') -}}"
    "{%- endif -%}"
    "{%- if message['content'] is not string or message['content'] == '' -%}"
    "{{- raise_exception('message content must be a non-empty string') -}}"
    "{%- endif -%}"
    "<|start|>{{ message['role'] }}<|message|>{{ message['content'] }}"
    "{%- if loop.last and message['role'] == 'assistant' and not add_generation_prompt -%}<|return|>"
    "{%- else -%}<|end|>{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant<|message|>{%- endif -%}"
)


class MessageError(GptossError):
    """Messages that are not a list of {"role": one of ROLES, "content": non-empty string}."""


def check_messages(messages: object, where: str = "messages") -> list[dict]:
    """The messages as given, or MessageError naming what is wrong (`where` prefixes the message)."""
    if not isinstance(messages, list) or not messages:
        raise MessageError(f"{where}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise MessageError(f"{where}[{i}]: a message is an object with role and content")
        if m.get("role") not in ROLES:
            raise MessageError(f"{where}[{i}]: unknown role {m.get('role')!r} (expected {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str) or not m["content"]:
            raise MessageError(f"{where}[{i}]: content must be a non-empty string")
    return messages


class ChatFormat:
    """gptoss's own format, rendered token by token (so training knows which ids are the assistant's)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in (START, MESSAGE, END, RETURN)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise GptossError(f"the tokenizer has no {', '.join(missing)} token: it has no conversation format")
        self.start, self.message, self.end, self.ret = ids[START], ids[MESSAGE], ids[END], ids[RETURN]
        self.stop_ids: frozenset[int] = frozenset({self.ret, self.end})
        self.reply_ends = self.stop_ids | {self.start}  # a model that goes on to write the next turn is cut
        self.streams = True  # the reply is plain text from its first token: it can be shown as it is decoded
        self.template = CHAT_TEMPLATE

    def _encode(self, text: str) -> list[int]:
        # Text between special tokens is encoded on its own, as the tokenizer does for a whole rendered string
        # (added tokens split the input before BPE), so these pieces concatenate to encode(rendered text).
        # encode_batch gives encode's ids and, unlike encode, releases the GIL: the server renders
        # conversations on a thread pool while its event loop goes on.
        return self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def render_with_mask(
        self, messages: list[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """(ids, trained) where trained[i] marks an assistant token the model must learn to produce: the
        content and the closing <|end|>/<|return|> of assistant turns, not their `<|start|>assistant<|message|>`."""
        check_messages(messages)
        ids: list[int] = []
        trained: list[bool] = []
        for k, m in enumerate(messages):
            last = k == len(messages) - 1
            close = self.ret if last and m["role"] == "assistant" and not add_generation_prompt else self.end
            head = [self.start, *self._encode(m["role"]), self.message]
            body = [*self._encode(m["content"]), close]
            ids += head + body
            trained += [False] * len(head) + [m["role"] == "assistant"] * len(body)
        if add_generation_prompt:
            head = [self.start, *self._encode("assistant"), self.message]
            ids += head
            trained += [False] * len(head)
        return ids, trained

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation; with the generation prompt, ready for the model to write the reply."""
        return self.render_with_mask(messages, add_generation_prompt)[0]

    def parse_reply(self, ids: list[int]) -> dict:
        """Generated ids (after the generation prompt) -> the assistant message: cut at the first token that ends
        or starts a turn (a model that goes on writing the user's next turn is cut there)."""
        ids = list(ids)
        ends = self.stop_ids | {self.start}
        cut = next((i for i, t in enumerate(ids) if t in ends), len(ids))
        return {"role": "assistant", "content": self.tokenizer.decode(ids[:cut], skip_special_tokens=True)}


class TemplateFormat(ChatFormat):
    """A Jinja chat template from a Hugging Face directory, rendered sandboxed and tokenized like transformers."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str,
        special: dict | None = None,
        stop_tokens: list[str] | None = None,
        source: str = "chat template",
    ):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.tokenizer, self.source = tokenizer, source
        self.special = {k: v for k, v in (special or {}).items() if isinstance(v, str)}
        names = stop_tokens or [t for t in (*FOREIGN_STOPS, self.special.get("eos_token")) if t]
        self.stop_ids = frozenset(i for i in map(tokenizer.token_to_id, names) if i is not None)
        if not self.stop_ids:
            raise GptossError(f"{source}: none of the tokens {', '.join(names)} that end a reply is in the tokenizer")
        self.start = tokenizer.token_to_id(START)
        self.reply_ends = self.stop_ids
        self.streams = CHANNEL not in template  # harmony channels: only the final one is the answer

        def raise_exception(message: str):
            raise TemplateError(message)

        # The same environment and globals as transformers' _compile_jinja_template.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.compiled = env.from_string(template)
        except TemplateError as err:
            raise GptossError(f"{source}: not a valid Jinja template ({err})") from None
        self.template = template

    def render_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        check_messages(messages)
        try:
            return self.compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)
        except TemplateError as err:
            raise MessageError(f"{self.source}: {err}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # apply_chat_template tokenizes the rendered text with add_special_tokens=False.
        return self._encode(self.render_text(messages, add_generation_prompt))

    def render_with_mask(
        self, messages: list[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Assistant tokens found by rendering prefixes: turn k's reply is what lies between messages[:k] with the
        generation prompt and messages[:k+1] (its closing token as the whole conversation renders it).
        Refused for a template that rewrites earlier turns."""
        check_messages(messages)
        ids = self.render(messages, add_generation_prompt)
        trained = [False] * len(ids)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:k], True) if k else []
            upto = ids if k == len(messages) - 1 else self.render(messages[: k + 1], False)
            # the closing token may differ: harmony ends a last reply with <|return|>, a reply in history with <|end|>
            if ids[: len(before)] != before or ids[: len(upto) - 1] != upto[:-1] or len(upto) <= len(before):
                raise GptossError(
                    f"{self.source}: the template renders earlier turns differently once later ones "
                    "follow, so the assistant tokens of a conversation cannot be found for training"
                )
            trained[len(before) : len(upto)] = [True] * (len(upto) - len(before))
        return ids, trained

    def parse_reply(self, ids: list[int]) -> dict:
        """Cut at the first stop token; harmony channels (analysis/final) keep only the final message's text."""
        ids = list(ids)
        cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        text = self.tokenizer.decode(ids[:cut], skip_special_tokens=False)
        if CHANNEL in text and MESSAGE in text:  # "<|channel|>analysis<|message|>...<|end|><|start|>assistant..."
            final = text.rsplit(f"{CHANNEL}final{MESSAGE}", 1)
            text = final[1] if len(final) == 2 else text.rsplit(MESSAGE, 1)[1]
        for token in self.tokenizer.get_added_tokens_decoder().values():
            if token.special:
                text = text.replace(token.content, "")
        return {"role": "assistant", "content": text}


def save_template(path: Path, template: str, special: dict, stop_tokens: list[str]) -> Path:
    """Keep an imported directory's chat template with the run, at `path` (RUN/chat_template.json, read back by
    chat_format)."""
    path.write_text(
        json.dumps(
            {"chat_template": template, "special_tokens": special, "stop_tokens": stop_tokens},
            indent=2,
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    return path


def chat_format(tokenizer: Tokenizer, template: Path | None = None) -> ChatFormat | None:
    """The run's conversation format: its own template (`template`, the run's chat_template.json) if it was
    imported with one, else gptoss's format when the tokenizer reserves its tokens; None when the run has none
    (a tokenizer trained before chat existed)."""
    path = template
    if path is not None and path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            template = raw["chat_template"]
            if not isinstance(template, str):
                raise TypeError("chat_template is not a string")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise GptossError(f"{path}: not a chat template file ({err})") from None
        return TemplateFormat(tokenizer, template, raw.get("special_tokens") or {}, raw.get("stop_tokens"), str(path))
    if all(tokenizer.token_to_id(t) is not None for t in (START, MESSAGE, END, RETURN)):
        return ChatFormat(tokenizer)
    return None
