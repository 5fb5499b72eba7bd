"""Chat across the Hugging Face boundary, checked with transformers itself: an export's chat_template renders
the ids gptoss renders, pipeline("text-generation") chats with it, greedy replies agree token for token,
and an imported directory keeps its own (harmony-style) template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from gptoss_cli.cli import app  # noqa: E402
from gptoss_cli.config import (  # noqa: E402
    InferConfig,  # noqa: E402
    RunConfig,
)
from gptoss_cli.data.chat_format import ChatFormat, TemplateFormat, chat_format  # noqa: E402
from gptoss_cli.data.tokenizer import PAD, load_tokenizer, train_tokenizer  # noqa: E402
from gptoss_cli.infer.generate import generate_tokens  # noqa: E402
from gptoss_cli.model import ModelConfig, Transformer  # noqa: E402
from tests.conftest import save_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = ["Hello! How can I help you today?", "A token is a small piece of text.", "user assistant system"] * 8
CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a token?"},
        {"role": "assistant", "content": "A piece of text."},
        {"role": "user", "content": "Thanks."},
    ],
    [
        {"role": "developer", "content": "Answer in one line."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ],
]
# A harmony-style template of the kind gpt-oss ships (written for this test): channels, a dated system
# preamble, developer instructions, the final reply closed with <|return|>.
HARMONY = (
    "<|start|>system<|message|>Knowledge cutoff: 2024-06\nCurrent date: {{ strftime_now('%Y-%m-%d') }}\n\n"
    "Reasoning: medium<|end|>"
    "{%- for m in messages -%}"
    "{%- if m.role in ['system', 'developer'] -%}<|start|>developer<|message|># Instructions\n\n{{ m.content }}<|end|>"
    "{%- elif m.role == 'user' -%}<|start|>user<|message|>{{ m.content }}<|end|>"
    "{%- else -%}<|start|>assistant<|channel|>final<|message|>{{ m.content }}"
    "{%- if loop.last and not add_generation_prompt -%}<|return|>{%- else -%}<|end|>{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)


def invoke(*args) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run as `gptoss train` writes one, with random weights and a tokenizer that has the chat tokens."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_hidden_layers=2,
        num_experts=4,
        experts_per_token=2,
        vocab_size=320,
        hidden_size=64,
        intermediate_size=32,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        attention_backend="eager",
        moe_backend="loop",
        max_context_length=256,
    )
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.embedding.weight.mul_(20)  # logits far apart: greedy picks are not near-ties
    tok = train_tokenizer(TEXTS, 300)
    run_cfg = RunConfig(model=cfg, name="chat")
    return save_run(tmp_path / "run", run_cfg, tok, model, step=1)


def test_export_chats_in_transformers(run, tmp_path):
    out = tmp_path / "hf"
    invoke("export", "--run", run, "--out", out, "--dtype", "fp32")
    tok = load_tokenizer(run / "tokenizer.json")
    fmt = ChatFormat(tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for messages in CHATS:
        for gen in (True, False):
            assert list(
                hf_tok.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False)
            ) == fmt.render(messages, add_generation_prompt=gen)
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert set(stops) >= set(fmt.stop_ids)

    # Greedy decoding from the same prompt: transformers' generate and ours give the same tokens.
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = fmt.render(CHATS[1])
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :].tolist()
    model = Transformer(hf_config_model(run)).eval()
    from gptoss_cli.run.checkpoint import load_weights, resolve_checkpoint

    load_weights(model, resolve_checkpoint(run) / "model.safetensors")
    ours, _, _ = generate_tokens(
        model, [prompt], InferConfig(max_new_tokens=10, temperature=0), pad_id=tok.token_to_id(PAD), eos_id=None
    )
    cut = next((i + 1 for i, t in enumerate(ours[0]) if t in stops), len(ours[0]))
    assert theirs[:cut] == ours[0][:cut]

    # pipeline() given messages renders them with the template and answers as the assistant.
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    reply = pipe(CHATS[1], max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert reply[:-1] == CHATS[1] and reply[-1]["role"] == "assistant"
    assert reply[-1]["content"] == fmt.parse_reply(theirs)["content"]


def hf_config_model(run: Path) -> ModelConfig:
    from gptoss_cli.config import config_from_dict, read_yaml

    return config_from_dict(read_yaml(run / "config.yaml"), "config.yaml").model


def test_import_keeps_a_harmony_template_and_exports_it_again(run, tmp_path):
    hf_dir = tmp_path / "hf"
    invoke("export", "--run", run, "--out", hf_dir, "--dtype", "fp32")
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = HARMONY
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(hf_dir / "tokenizer.json")
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    gen["eos_token_id"] = [tok.token_to_id("<|return|>")]  # as gpt-oss: a reply ends with <|return|> only
    (hf_dir / "generation_config.json").write_text(json.dumps(gen))

    imported = tmp_path / "imported"
    invoke("import", hf_dir, "--run", imported)
    assert (imported / "chat_template.json").is_file()
    fmt = chat_format(load_tokenizer(imported / "tokenizer.json"), imported / "chat_template.json")
    assert isinstance(fmt, TemplateFormat) and fmt.stop_ids == {tok.token_to_id("<|return|>")}
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for messages in CHATS:
        for gen_prompt in (True, False):
            assert fmt.render(messages, add_generation_prompt=gen_prompt) == list(
                hf_tok.apply_chat_template(messages, add_generation_prompt=gen_prompt, return_dict=False)
            )

    again = tmp_path / "again"
    invoke("export", "--run", imported, "--out", again)
    assert json.loads((again / "tokenizer_config.json").read_text())["chat_template"] == HARMONY


def test_import_of_an_export_uses_the_gptoss_format(run, tmp_path):
    invoke("export", "--run", run, "--out", tmp_path / "hf")
    invoke("import", tmp_path / "hf", "--run", tmp_path / "back")
    assert not (tmp_path / "back" / "chat_template.json").exists()
    assert (
        type(
            chat_format(load_tokenizer(tmp_path / "back" / "tokenizer.json"), tmp_path / "back" / "chat_template.json")
        )
        is ChatFormat
    )


def test_a_broken_template_fails_the_import_in_one_line(run, tmp_path, gptoss):
    invoke("export", "--run", run, "--out", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": "{% for %}"}))
    code, _, err = gptoss("import", tmp_path / "hf", "--run", tmp_path / "bad")
    assert code == 2 and "not a valid Jinja template" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
