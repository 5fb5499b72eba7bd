"""`gptoss chat`: a multi-turn conversation with a run, streamed as the reply is decoded.

    ChatSession   the history (an optional system message, then user/assistant turns), the context budget
                  (the oldest turns are dropped, with a notice, when the next reply would not fit), one reply
    run_chat      the read-reply loop: /reset, /system TEXT, /exit; Ctrl-C stops the reply, not the session;
                  from a terminal an interactive prompt, from a pipe one message per line, one reply per line

Rendering and parsing belong to data/chat_format.py; generation is infer/generate.py's generate (the decode
core of infer/decode.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from ..data.chat_format import ChatFormat
from ..data.tokenizer import check_text
from ..errors import GptossError

HELP = "/reset forgets the conversation, /system TEXT sets the system message, /exit (or Ctrl-D) leaves"


@dataclass
class Reply:
    content: str
    new_tokens: int
    stop_reason: str  # end (the model ended its turn) | length | context | interrupted
    dropped_turns: int  # oldest turns dropped so this reply fits in the context


class ChatSession:
    def __init__(self, loaded, fmt: ChatFormat, params, system: str | None = None, compile: bool | None = None):
        self.loaded, self.fmt, self.params = loaded, fmt, params
        self.system = system or None
        self.turns: list[dict] = []  # user and assistant messages, oldest first
        self.max_context = loaded.config.model.max_context_length
        # --compile / --no-compile / None: compiled when a reply may take AUTO_COMPILE_STEPS tokens (infer/compiled.py).
        # One graph serves every turn's length, so only the first compiled reply waits for the compile.
        self.compile, self._compiled_once = compile, False

    def messages(self, user: str | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + ([{"role": "user", "content": user}] if user else [])

    def reset(self) -> None:
        self.turns = []

    def _prompt(self, user: str) -> tuple[list[int], int]:
        """The rendered prompt, dropping the oldest exchanges until max_new_tokens fit after it (or only the
        new message is left). Returns (ids, turns dropped)."""
        dropped = 0
        ids = self.fmt.render(self.messages(user))
        while len(ids) + self.params.max_new_tokens > self.max_context and self.turns:
            cut = 2 if len(self.turns) >= 2 else 1  # a user message and its reply go together
            self.turns = self.turns[cut:]
            dropped += cut
            ids = self.fmt.render(self.messages(user))
        if len(ids) >= self.max_context:
            raise GptossError(
                f"this message needs {len(ids)} tokens with the system message; the model's context "
                f"is {self.max_context} tokens: write a shorter one"
            )
        return ids, dropped

    def reply(self, user: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Generate the assistant's answer to `user`; both join the history. Ctrl-C keeps what was written."""
        from ..infer.compiled import compile_choice
        from ..infer.generate import batch_states, generate
        from ..output import console

        ids, dropped = self._prompt(user)
        tok = self.loaded.tokenizer
        # The reply ends at the format's end-of-turn ids (EOS itself is no turn end in a conversation).
        (state,) = batch_states(
            self.loaded.model, [ids], self.params, eos_id=None, tokenizer=tok, stop_ids=frozenset(self.fmt.reply_ends)
        )
        streaming = on_text is not None and self.fmt.streams
        pad = tok.token_to_id("<|pad|>")
        compiled, why = compile_choice(self.compile, state.budget)
        if compiled and not self._compiled_once:
            self._compiled_once = True
            console.print(f"(compiling the decode step, {why}: seconds when inductor has it cached)", highlight=False)
        try:
            generate(
                self.loaded.model,
                [ids],
                [state],
                pad_id=pad if pad is not None else 0,
                on_text=(lambda _row, text: on_text(text)) if streaming else None,
                compile_decode=compiled,
            )
            reason = "end" if state.reason in ("eos", "stop") else state.reason
        except KeyboardInterrupt:
            reason = "interrupted"
        if state.reason == "stop" or reason == "interrupted":
            content = state.text  # cut before a --stop string, or what was written before Ctrl-C
        else:
            content = self.fmt.parse_reply(state.out)["content"]
            if on_text is not None and not streaming:  # a format with channels: only the final message is shown
                on_text(content)
        content = content.strip() or "..."  # an empty message is not valid in the history
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": content}]
        generated = len(state.out) + (state.reason == "eos")  # the end-of-turn token was generated too
        return Reply(content, generated, reason, dropped)


def _command(line: str, session: ChatSession, say: Callable[[str], None]) -> bool | None:
    """A /command: True = leave, False = handled, None = not a command (an ordinary message)."""
    word, _, rest = line.strip().partition(" ")
    if word in ("/exit", "/quit"):
        return True
    if word == "/reset":
        session.reset()
        say("(conversation reset)")
        return False
    if word == "/system":
        session.system = rest.strip() or None
        session.reset()
        say(f"(system message {'set' if session.system else 'cleared'}; conversation reset)")
        return False
    if word in ("/help", "/?"):
        say(HELP)
        return False
    if word.startswith("/") and len(word) > 1 and " " not in word and word[1:].isalpha():
        say(f"unknown command {word}: {HELP}")
        return False
    return None


def _read_line(stdin: TextIO, interactive: bool, number: int) -> str:
    """The next message; EOFError at the end of input, GptossError for a line that is not UTF-8 text (read as
    bytes from a pipe, so the lines after it are intact)."""
    if interactive:
        try:
            line = input("you> ")
        except UnicodeDecodeError as err:
            raise GptossError(f"that line: not UTF-8 text (byte 0x{err.object[err.start]:02x})") from None
        return check_text(line, "that line")
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # a text stream (tests, a wrapper): check what it decoded
        line = stdin.readline()
        if not line:
            raise EOFError
        return check_text(line.rstrip("\n"), f"input line {number}")
    data = raw.readline()
    if not data:
        raise EOFError
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise GptossError(
            f"input line {number}: not UTF-8 text (byte 0x{data[err.start]:02x} at byte {err.start + 1})"
        ) from None


def run_chat(
    session: ChatSession,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    say: Callable[[str], None] | None = None,
    as_json: bool = False,
) -> int:
    """The conversation loop until /exit or end of input. Returns the exit code (0)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    interactive = stdin.isatty() and stdout.isatty() and not as_json
    if interactive:
        say(f"chatting with {session.loaded.run} ({session.loaded.checkpoint.name}). {HELP}; Ctrl-C stops a reply")

    def write(chunk: str) -> None:
        stdout.write(chunk if interactive else chunk.replace("\r", " ").replace("\n", " "))
        stdout.flush()

    def refuse(err: GptossError) -> None:  # a message that cannot be answered: the session goes on
        say(f"error: {err}")
        if as_json:
            stdout.write(json.dumps({"error": str(err)}) + "\n")
        elif not interactive:
            stdout.write("\n")  # one line per message, also for this one
        stdout.flush()

    number = 0
    while True:
        number += 1
        try:
            line = _read_line(stdin, interactive, number)
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: a fresh line, the session goes on
            say("\n(Ctrl-D or /exit leaves)")
            continue
        except GptossError as err:  # bytes that are not UTF-8
            refuse(err)
            continue
        if not line.strip():
            continue
        handled = _command(line, session, say)
        if handled:
            break
        if handled is False:
            continue
        if interactive:
            stdout.write("assistant> ")
        try:
            reply = session.reply(line, on_text=None if as_json else write)
        except GptossError as err:  # one message too long: the session goes on
            refuse(err)
            continue
        if as_json:
            stdout.write(
                json.dumps(
                    {
                        "role": "assistant",
                        "content": reply.content,
                        "new_tokens": reply.new_tokens,
                        "stop_reason": reply.stop_reason,
                        "dropped_turns": reply.dropped_turns,
                    }
                )
                + "\n"
            )
        else:
            stdout.write("\n")
        stdout.flush()
        if reply.dropped_turns:
            say(
                f"(the conversation outgrew the context of {session.max_context} tokens: "
                f"the oldest {reply.dropped_turns} message(s) were dropped)"
            )
        if reply.stop_reason == "interrupted":
            say("(reply stopped)")
        elif reply.stop_reason in ("length", "context"):
            say(f"(reply cut at {reply.new_tokens} tokens: -n/--max-new-tokens raises the limit)")
    return 0
