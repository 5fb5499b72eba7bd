"""The conversation format: rendering, the training mask, reply parsing, and agreement with transformers'
apply_chat_template for our exported template and for a harmony-style template with channels."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptoss_cli.data.chat_format import (
    CHAT_TEMPLATE,
    ChatFormat,
    MessageError,
    TemplateFormat,
    chat_format,
    save_template,
)
from gptoss_cli.data.tokenizer import EOS, PAD, train_tokenizer

TEXT = [
    "Hello there, how are you today? I am a small model and I answer questions about the weather.",
    "user assistant system developer: the quick brown fox jumps over the lazy dog. Sunny, rainy, windy.",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi, how are you?"},
    {"role": "assistant", "content": "Fine, thanks."},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "Sunny today."},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(TEXT * 4, 300)


def text_of(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def test_render_is_the_harmony_shape_tokenized_whole(tok):
    fmt = chat_format(tok)
    ids = fmt.render(CHAT[:2])
    want = (
        "<|start|>system<|message|>You are terse.<|end|><|start|>user<|message|>Hi, how are you?<|end|>"
        "<|start|>assistant<|message|>"
    )
    assert ids == tok.encode(want).ids  # the tokenizer on the whole string is the reference
    assert text_of(tok, ids) == want
    full = fmt.render(CHAT, add_generation_prompt=False)
    assert text_of(tok, full).endswith("<|start|>assistant<|message|>Sunny today.<|return|>")
    assert text_of(tok, fmt.render(CHAT)).endswith("Sunny today.<|end|><|start|>assistant<|message|>")
    assert fmt.stop_ids == {tok.token_to_id("<|return|>"), tok.token_to_id("<|end|>")}


def test_training_mask_covers_assistant_content_and_its_closing_token(tok):
    ids, trained = ChatFormat(tok).render_with_mask(CHAT)
    assert len(ids) == len(trained)
    runs, current = [], []  # maximal runs of trained ids, decoded
    for i, t in zip(ids, trained, strict=True):
        if t:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs.append(current)
    assert [text_of(tok, r) for r in runs] == ["Fine, thanks.<|end|>", "Sunny today.<|return|>"]


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "list of messages"),
        ([], "list of messages"),
        (["hi"], r"messages\[0\]"),
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
        ([{"role": "user", "content": ""}], "non-empty string"),
        ([{"role": "user", "content": 3}], "non-empty string"),
        ([{"role": "user"}], "non-empty string"),
    ],
)
def test_bad_messages_are_refused(tok, messages, match):
    with pytest.raises(MessageError, match=match):
        ChatFormat(tok).render(messages)


def test_parse_reply_cuts_at_the_end_of_the_turn(tok):
    fmt = ChatFormat(tok)
    reply = tok.encode("Fine, thanks.<|return|>junk").ids
    assert fmt.parse_reply(reply) == {"role": "assistant", "content": "Fine, thanks."}
    runaway = tok.encode("Sunny.<|start|>user<|message|>more").ids  # the model wrote the user's turn
    assert fmt.parse_reply(runaway)["content"] == "Sunny."
    assert fmt.parse_reply(tok.encode("unfinished").ids)["content"] == "unfinished"


def test_a_tokenizer_without_the_conversation_tokens_has_no_format():
    old = Tokenizer(models.BPE())
    old.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    old.decoder = decoders.ByteLevel()
    old.train_from_iterator(
        TEXT,
        trainers.BpeTrainer(
            vocab_size=280, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    assert chat_format(old) is None


def hf_tokenizer(tok: Tokenizer, tmp_path, template: str, **special):
    transformers = pytest.importorskip("transformers")
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **special}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return transformers.AutoTokenizer.from_pretrained(str(tmp_path))


def hf_ids(hf, messages, add_generation_prompt):
    return list(hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("gen", [True, False])
def test_exported_template_renders_the_same_ids_in_transformers(tok, tmp_path, n, gen):
    hf = hf_tokenizer(tok, tmp_path, CHAT_TEMPLATE, eos_token=EOS)
    assert hf_ids(hf, CHAT[:n], gen) == ChatFormat(tok).render(CHAT[:n], add_generation_prompt=gen)


# A harmony-style template of the kind openai/gpt-oss-20b ships (written here, much shorter): a system
# preamble with a date from strftime_now, reasoning effort, tojson, channels, the analysis of earlier
# assistant turns dropped, raise_exception for a bad role.
HARMONY = """{#- harmony-style test template -#}
{%- set effort = reasoning_effort | default("medium") -%}
<|start|>system<|message|>You are a test model.
Knowledge cutoff: 2024-06
Current date: {{ strftime_now("%Y-%m-%d") }}

Reasoning: {{ effort }}
{{ {"valid channels": ["analysis", "final"]} | tojson }}<|end|>
{%- for message in messages -%}
    {%- if message.role == "system" or message.role == "developer" -%}
<|start|>developer<|message|># Instructions

{{ message.content }}<|end|>
    {%- elif message.role == "user" -%}
<|start|>user<|message|>{{ message.content }}<|end|>
    {%- elif message.role == "assistant" -%}
        {%- if loop.last and not add_generation_prompt and message.thinking is defined -%}
<|start|>assistant<|channel|>analysis<|message|>{{ message.thinking }}<|end|>
        {%- endif -%}
<|start|>assistant<|channel|>final<|message|>{{ message.content }}
        {%- if loop.last and not add_generation_prompt %}<|return|>{% else %}<|end|>{% endif %}
    {%- else -%}
        {{- raise_exception("Unexpected role " ~ message.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|start|>assistant
{%- endif -%}
"""


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("gen", [True, False])
def test_a_foreign_template_renders_as_transformers_renders_it(tok, tmp_path, n, gen):
    hf = hf_tokenizer(tok, tmp_path, HARMONY, eos_token="<|return|>", bos_token=EOS)
    save_template(
        tmp_path / "chat_template.json", HARMONY, {"eos_token": "<|return|>", "bos_token": EOS}, ["<|return|>"]
    )
    fmt = chat_format(tok, tmp_path / "chat_template.json")
    assert isinstance(fmt, TemplateFormat)
    assert fmt.render(CHAT[:n], add_generation_prompt=gen) == hf_ids(hf, CHAT[:n], gen)
    assert fmt.stop_ids == {tok.token_to_id("<|return|>")}


def test_a_foreign_template_reply_keeps_the_final_channel(tok, tmp_path):
    save_template(tmp_path / "chat_template.json", HARMONY, {}, ["<|return|>"])
    fmt = chat_format(tok, tmp_path / "chat_template.json")
    reply = tok.encode(
        "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>Sunny today.<|return|>"
    ).ids
    assert fmt.parse_reply(reply) == {"role": "assistant", "content": "Sunny today."}
    ids, trained = fmt.render_with_mask(CHAT)
    assert text_of(tok, [i for i, t in zip(ids, trained, strict=True) if t]).count("<|message|>") == 2


def test_a_template_is_sandboxed(tok, tmp_path):
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    save_template(tmp_path / "chat_template.json", evil, {}, ["<|return|>"])
    with pytest.raises(MessageError, match="unsafe|access"):
        chat_format(tok, tmp_path / "chat_template.json").render(CHAT[:1])
