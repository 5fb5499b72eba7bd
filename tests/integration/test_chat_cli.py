"""`gptoss chat` on a very small model fine-tuned on conversations: piped stdin (one reply per line), a real
pseudo-terminal, /reset /system /exit, Ctrl-C during a reply, the context budget, and runs without a format."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptoss_cli.chat.open import open_chat
from gptoss_cli.chat.session import run_chat
from tests.conftest import HAS_COMPILER

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CHATS = [
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a token?"},
        {"role": "assistant", "content": "A piece of text."},
    ],
    [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome."},
    ],
]


def _train(tmp: Path, name: str, data: list[str], overrides: list[str], tokenizer: Path | None = None) -> Path:
    from gptoss_cli.config import load_config
    from gptoss_cli.train.loop import Trainer, setup_training

    cfg = load_config(
        "tiny",
        [
            *overrides,
            f"data.paths=[{','.join(data)}]",
            "train.seq_len=48",
            "train.batch_size=2",
            "train.max_steps=4",
            "train.eval_every=4",
            "train.save_every=4",
            "data.val_fraction=0",
            "infer.max_new_tokens=12",
            "infer.temperature=0",
        ],
    )
    Trainer(setup_training(cfg, tmp / name, tokenizer_path=tokenizer)).run()
    return tmp / name


def old_tokenizer(text: str, path: Path) -> Path:
    """A tokenizer as gptoss trained them before the conversation tokens: <|endoftext|> and <|pad|> only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    old = Tokenizer(models.BPE())
    old.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    old.decoder = decoders.ByteLevel()
    old.train_from_iterator(
        [text],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    old.save(str(path))
    return path


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, small_overrides) -> Path:
    tmp = tmp_path_factory.mktemp("chat")
    path = tmp / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 8), encoding="utf-8")
    return _train(tmp, "run", [str(path)], small_overrides)


def chat(run: Path, text: str, **kw) -> tuple[str, list[str]]:
    notices: list[str] = []
    out = io.StringIO()
    session = open_chat(run=run, device="cpu", **kw)
    assert run_chat(session, stdin=io.StringIO(text), stdout=out, say=notices.append) == 0
    return out.getvalue(), notices


def test_piped_stdin_gives_one_reply_per_line_through_the_cli(chat_run):
    env = {**os.environ, "GPTOSS_DEBUG": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "gptoss_cli", "chat", "--run", str(chat_run), "-n", "8"],
        input="Hello!\nWhat is a token?\n/reset\nThanks.\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3  # three messages, three replies; /reset prints nothing on stdout
    assert "conversation reset" in done.stderr


@pytest.mark.skipif(not HAS_COMPILER, reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_replies_equal_eager_ones_turn_after_turn(chat_run):
    """`chat --compile`: the growing conversation gives each reply a longer cache, and one compiled step
    serves them all with the replies of eager decoding (greedy)."""
    text = "Hello!\nWhat is a token?\nAnd a sliding window?\n"
    eager, _ = chat(chat_run, text, compile=False, temperature=0.0, max_new_tokens=24)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled, _ = chat(chat_run, text, compile=True, temperature=0.0, max_new_tokens=24)
    assert compiled == eager and len(compiled.splitlines()) == 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1


def test_history_commands_and_json(chat_run):
    out, notices = chat(
        chat_run, "Hello!\nThanks.\n/system Be brief.\nWhat is a token?\n/exit\nnot read\n", system="You are terse."
    )
    assert len(out.splitlines()) == 3
    assert any("system message set" in n for n in notices)
    out, notices = chat(chat_run, "/bogus\nHello!\n", max_new_tokens=5)
    assert len(out.splitlines()) == 1 and any("unknown command /bogus" in n for n in notices)
    session = open_chat(run=chat_run, device="cpu", max_new_tokens=5)
    buf = io.StringIO()
    run_chat(session, stdin=io.StringIO("Hello!\nThanks.\n"), stdout=buf, say=lambda _: None, as_json=True)
    replies = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [r["role"] for r in replies] == ["assistant", "assistant"]
    assert all(r["new_tokens"] <= 5 and r["stop_reason"] in ("end", "length") for r in replies)
    assert [m["role"] for m in session.messages()] == ["user", "assistant", "user", "assistant"]
    assert session.messages()[1]["content"] == replies[0]["content"]


def test_the_oldest_turns_are_dropped_when_the_context_fills(chat_run):
    # max_context_length 256 and 200 new tokens: the history must shrink after a few turns.
    session = open_chat(run=chat_run, device="cpu", max_new_tokens=200, stop=["."])
    notices: list[str] = []
    out = io.StringIO()
    run_chat(
        session,
        stdin=io.StringIO("Hello! How are you today, my friend? " * 3 + "\n" + "Count.\n" * 6),
        stdout=out,
        say=notices.append,
    )
    assert any("oldest" in n and "dropped" in n for n in notices)
    assert len(out.getvalue().splitlines()) == 7  # every message answered
    assert len(session.messages()) < 14  # but not every one is still in the history
    session.reset()
    notices.clear()
    run_chat(session, stdin=io.StringIO("word " * 400 + "\nHello!\n"), stdout=io.StringIO(), say=notices.append)
    assert any("shorter" in n for n in notices)  # one too-long message is refused, the next one answered
    assert len(session.messages()) == 2


def test_ctrl_c_stops_the_reply_not_the_session(chat_run):
    session = open_chat(run=chat_run, device="cpu", max_new_tokens=12, temperature=1.0, seed=0)
    calls = []

    def interrupt(chunk: str) -> None:
        calls.append(chunk)
        if len(calls) == 1:
            raise KeyboardInterrupt

    first = session.reply("Hello!", on_text=interrupt)
    assert first.stop_reason == "interrupted"
    second = session.reply("Thanks.", on_text=calls.append)
    assert second.stop_reason != "interrupted" and len(session.messages()) == 4


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_interactive_prompt_in_a_pseudo_terminal(chat_run):
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptoss_cli", "chat", "--run", str(chat_run), "-n", "6"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    os.write(master, b"\xff\xfe\nHello!\n/exit\n")  # a line that is not UTF-8 first: refused, the session goes on
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0
    text = seen.decode("utf-8", "replace")
    assert "you> " in text and "assistant> " in text and "/exit" in text
    assert "error: that line: not UTF-8 text (byte 0xff" in text and "bug in gptoss" not in text


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_bytes_that_are_not_utf8_fail_their_line_only(chat_run, locale):
    """Under a UTF-8 locale and the C locale (where Python's stdin hands such bytes on as surrogates): the
    bad line is a user error on stderr (and an empty line, or an error object, on stdout), the others are
    answered."""
    env = {**os.environ, "GPTOSS_DEBUG": "0", "LC_ALL": locale}
    env.pop("PYTHONIOENCODING", None)
    for json_flag in ([], ["--json"]):
        done = subprocess.run(
            [sys.executable, "-m", "gptoss_cli", "chat", "--run", str(chat_run), "-n", "4", *json_flag],
            input=b"Hello!\n\xff\xfe caf\xe9\nThanks.\n",
            capture_output=True,
            env=env,
            timeout=300,
        )
        err = done.stderr.decode()
        assert done.returncode == 0, err
        assert "error: input line 2: not UTF-8 text (byte 0xff at byte 1)" in err and "bug in gptoss" not in err
        lines = done.stdout.decode().splitlines()
        assert len(lines) == 3
        if json_flag:
            assert json.loads(lines[1]) == {"error": "input line 2: not UTF-8 text (byte 0xff at byte 1)"}
            assert [json.loads(line)["role"] for line in (lines[0], lines[2])] == ["assistant", "assistant"]
        else:
            assert lines[1] == ""


def test_text_that_is_not_unicode_is_refused_in_process_and_as_a_system_message(chat_run, gptoss):
    out, notices = chat(chat_run, "Hello!\n\udcff bad\n/system \udcfe\nThanks.\n", max_new_tokens=4)
    assert len(out.splitlines()) == 4
    assert "error: input line 2: not UTF-8 text (byte 0xff at character 1)" in notices
    assert "error: input line 3: not UTF-8 text (byte 0xfe at character 9)" in notices
    code, out, err = gptoss("chat", "--run", chat_run, "--system", "caf\udce9")
    assert (code, out) == (2, "") and err == "error: --system: not UTF-8 text (byte 0xe9 at character 4)\n"


def test_a_run_without_a_conversation_format_says_so(small_corpus, small_overrides, isolated_cache, tmp_path, gptoss):
    old_tokenizer(small_corpus.read_text(), tmp_path / "old.json")
    run = _train(tmp_path, "old", [str(small_corpus)], small_overrides, tokenizer=tmp_path / "old.json")
    code, out, err = gptoss("chat", "--run", run)
    assert code == 2 and out == ""
    assert "has no conversation format" in err and "gptoss infer" in err and "--init-from" in err
    assert len(err.strip().splitlines()) == 1


def test_fine_tuning_an_old_run_adds_the_conversation_tokens(
    small_corpus, small_overrides, isolated_cache, tmp_path, capsys
):
    from gptoss_cli.config import load_config
    from gptoss_cli.data.tokenizer import load_tokenizer
    from gptoss_cli.train.loop import Trainer, setup_training

    old_tokenizer(small_corpus.read_text(), tmp_path / "old.json")
    base = _train(tmp_path, "old", [str(small_corpus)], small_overrides, tokenizer=tmp_path / "old.json")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 8), encoding="utf-8")
    cfg = load_config(str(base / "config.yaml"), [f"data.paths=[{chats}]", "train.max_steps=2"])
    capsys.readouterr()  # the base run's output
    Trainer(setup_training(cfg, tmp_path / "sft", init_from=base)).run()
    err = capsys.readouterr().err
    assert "added 5" in err
    assert "untrained" not in err and "(data None)" not in err  # a fine-tune starts trained; no prepared data
    assert load_tokenizer(tmp_path / "sft" / "tokenizer.json").token_to_id("<|return|>") is not None
    out, _ = chat(tmp_path / "sft", "Hello!\n", max_new_tokens=4)
    assert len(out.splitlines()) == 1


def test_a_run_trained_on_text_only_chats_with_a_warning(
    small_corpus, small_overrides, isolated_cache, tmp_path, chat_run, capsys
):
    run = _train(tmp_path, "text", [str(small_corpus)], small_overrides)
    chat(run, "Hello!\n", max_new_tokens=3)
    assert "trained on text, not on conversations" in capsys.readouterr().err
    chat(chat_run, "Hello!\n", max_new_tokens=3)
    assert "trained on text" not in capsys.readouterr().err
