"""Supervised fine-tuning on conversations: reading .jsonl conversation files, packing rows whose
conversations never attend to one another, the loss on assistant tokens only (against a hand-computed
reference), truncation, and a fine-tune through the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptoss_cli.config import load_config
from gptoss_cli.data.chat_format import ChatFormat
from gptoss_cli.data.conversations import (
    pack_conversations,
    read_conversation_paths,
    read_conversations,
)
from gptoss_cli.data.tokenizer import PAD, train_tokenizer
from gptoss_cli.errors import GptossError
from gptoss_cli.model import Transformer
from gptoss_cli.model.cross_entropy import IGNORE_INDEX
from gptoss_cli.train.loss import objective

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CHATS = [
    [{"role": "user", "content": "What is a token?"}, {"role": "assistant", "content": "A piece of text."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye now."},
    ],
    [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}],
]


@pytest.fixture(scope="module")
def tok():
    text = [m["content"] for c in CHATS for m in c] + ["user assistant system the model answers questions"]
    return train_tokenizer(text * 8, 300)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", r"chats.jsonl:2: invalid JSON"),
        ({"text": "a document"}, r"chats.jsonl:2: expected an object with a 'messages' list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"chats.jsonl:2: messages\[0\]: unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": ""}]}, r"chats.jsonl:2: messages\[0\]: content must be"),
        ({"messages": "hello"}, r"chats.jsonl:2: messages: expected a non-empty list"),
    ],
)
def test_a_bad_line_names_the_file_and_line(tmp_path, line, match):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHATS[0]}, line])
    with pytest.raises(GptossError, match=match):
        read_conversations(path)


def test_conversation_files_are_told_apart_from_text(tmp_path):
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS])
    text = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a document"}])
    assert read_conversation_paths([str(chats)]) == CHATS
    assert read_conversation_paths([str(text)]) is None
    with pytest.raises(GptossError, match="mixes conversations"):
        read_conversation_paths([str(chats), str(text)])


def assistant_targets(tok, ids: list[int]) -> list[bool]:
    """The hand-made reference: position t is counted iff token t+1 lies in an assistant reply, found by
    reading the decoded tokens (after `<|start|>assistant<|message|>`, through the closing token)."""
    pieces = [tok.id_to_token(i) for i in ids]
    inside, counted = False, [False] * len(ids)
    for t, piece in enumerate(pieces):
        if inside:
            counted[t] = True
            inside = piece not in ("<|end|>", "<|return|>")
        if piece == "<|message|>" and tok.decode(ids[:t], skip_special_tokens=False).endswith("<|start|>assistant"):
            inside = True
    return counted[1:]  # counted[t] now refers to the target of input t


def test_loss_counts_only_assistant_tokens_and_packed_conversations_stay_apart(small_cfg, tok):
    cfg = small_cfg("model.attention_backend=eager")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights(torch.Generator().manual_seed(0))
    fmt = ChatFormat(tok)
    width = sum(len(fmt.render(c, add_generation_prompt=False)) - 1 for c in CHATS) + 3  # three pads at the end
    data = pack_conversations(CHATS, fmt, width, 1, 0, tok.token_to_id(PAD))
    assert data.num_samples == 1  # all three share one row
    inputs, targets, positions, segments = data.batch(0, 0)

    # Reference: each conversation alone, cross-entropy summed over its assistant targets only.
    total, count = 0.0, 0
    for messages in CHATS:
        ids = fmt.render(messages, add_generation_prompt=False)
        counted = torch.tensor(assistant_targets(tok, ids))
        logits = model(torch.tensor([ids[:-1]])).logits[0]  # (n-1, V)
        losses = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        total += losses[counted].sum().item()
        count += int(counted.sum())
    reference = total / count
    assert count == int((targets != IGNORE_INDEX).sum())

    for fused in (True, False):
        t = cfg.train
        t.fused_loss = fused
        got = objective(model, inputs, targets, t, positions=positions, segments=segments).lm.item()
        assert got == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_packed_rows_attend_block_diagonally(small_cfg, backend):
    # T=40 >= 3W on the sliding layers (W=8): the sdpa backend takes its banded path too.
    cfg = small_cfg(f"model.attention_backend={backend}")
    model = Transformer(cfg.model)
    model.init_weights(torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 320, (1, 23), generator=g), torch.randint(0, 320, (1, 17), generator=g)
    row = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(23), torch.arange(17)])[None]
    segments = torch.cat([torch.zeros(23, dtype=torch.long), torch.ones(17, dtype=torch.long)])[None]
    packed = model(row, positions, segments=segments).logits[0]
    alone = torch.cat([model(a).logits[0], model(b).logits[0]])
    scale = alone.abs().max()
    assert (packed - alone).abs().max() <= 1e-5 * scale
    leaky = model(row, positions).logits[0]  # without segments, b's queries see a's keys
    assert (leaky[23:] - alone[23:]).abs().max() > 1e-3 * scale


def test_long_conversations_are_truncated_with_one_warning(tok, capsys):
    fmt = ChatFormat(tok)
    width = len(fmt.render(CHATS[0], add_generation_prompt=False)) + 2
    long = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! " * 30}]
    data = pack_conversations([long, long, CHATS[0]], fmt, width, 1, 0, 0)
    err = capsys.readouterr().err.replace("\n", " ")
    assert f"2 of 3 conversations are longer than train.seq_len={width}" in err
    assert data.inputs.shape == (3, width) and "no assistant tokens" not in err
    assert (data.targets[:2] != IGNORE_INDEX).all(dim=1).logical_not().all()  # the user turn is still masked
    lost = [{"role": "user", "content": "Hi " * 40}, {"role": "assistant", "content": "Hello!"}]
    pack_conversations([lost, CHATS[0]], fmt, width, 1, 0, 0)
    assert "1 conversation(s) have no assistant tokens" in capsys.readouterr().err.replace("\n", " ")


def test_fine_tune_on_conversations(small_cfg, small_corpus, tmp_path):
    from gptoss_cli.train.loop import Trainer, setup_training

    base = small_cfg(f"data.paths=[{small_corpus}]", "train.max_steps=2")
    Trainer(setup_training(base, tmp_path / "base")).run()
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS * 6])
    cfg = load_config(
        str(tmp_path / "base" / "config.yaml"),
        [
            f"data.paths=[{chats}]",
            "train.seq_len=48",
            "train.batch_size=2",
            "train.max_steps=3",
            "train.eval_every=3",
            "train.save_every=3",
        ],
    )
    p = setup_training(cfg, tmp_path / "sft", init_from=tmp_path / "base")
    masked = p.train_data.targets == IGNORE_INDEX
    assert masked.any() and not masked.all()  # user turns and headers masked, assistant replies counted
    summary = Trainer(p).run()
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert (tmp_path / "sft" / "tokenizer.json").read_text() == (tmp_path / "base" / "tokenizer.json").read_text()
