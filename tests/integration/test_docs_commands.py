"""The commands the README and docs/ show run as written, in order, on a CPU.

Every ```bash block of README.md, then of the docs pages in DOC_ORDER (then the rest), runs line by line
in one working directory, as a reader following the pages in turn would: `uv run X` runs X from this
environment, and the folders the pages name (src/, docs/, configs/, benchmarks/) are the checkout's own.
A block's fence may carry tags after `bash` that say why it is not run here:

    gpu       needs a CUDA GPU          long      minutes of benchmarking
    example   placeholders, your own data, other machines or programs
    readme    the README's commands, repeated on a page for a reader who starts there
    extra     needs an optional extra (wandb)

and `server`: each line starts a server, which must come up (its start-up line) and stop on SIGTERM with
exit 0. A line running the project's own checks (uv sync, pytest, ruff) is left to CI; a `tensorboard
--logdir DIR` line is checked by DIR holding event files. Command listings outside ```bash fences are
refused, so a new command cannot dodge this test.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC_ORDER = ["training", "chat", "inference", "serve", "eval", "report", "interop", "configs", "guarantees"]
SKIP_TAGS = {"gpu", "long", "example", "readme", "extra"}
PROJECT_CHECKS = re.compile(r"^(uv sync|uv run (pytest|ruff)|bash \.ci/run)\b")
FENCE = re.compile(r"^\s*```(.*)$")  # also indented, inside a list item
COMMAND = re.compile(r"^(uv run |gptoss |printf |srun |for .*\bgptoss )")
UV_SHIM = """#!/bin/sh
# `uv run [--extra X] CMD ARGS`: CMD from this environment (the checkout is installed there already)
[ "$1" = run ] || { echo "uv $1: not run by the docs test" >&2; exit 97; }
shift
while [ "${1#--}" != "$1" ]; do case "$1" in --extra|--with) shift 2 ;; *) shift ;; esac; done
exec "$@"
"""


def pages() -> list[Path]:
    docs = sorted((ROOT / "docs").glob("*.md"))
    ordered = [ROOT / "docs" / f"{name}.md" for name in DOC_ORDER if (ROOT / "docs" / f"{name}.md").is_file()]
    return [ROOT / "README.md", *ordered, *(p for p in docs if p not in ordered)]


def blocks(page: Path) -> list[tuple[int, list[str], list[str]]]:
    """(line, fence tags, lines) of every fenced block; continuation lines are joined."""
    found, current, tags, start = [], None, [], 0
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if match and current is None:
            current, tags, start = [], match.group(1).split(), n
        elif match:
            found.append((start, tags, current))
            current = None
        elif current is not None:
            if current and current[-1].endswith("\\"):
                current[-1] = current[-1][:-1] + " " + line.strip()
            else:
                current.append(line.strip())
    return found


def commands() -> list[tuple[str, str, list[str]]]:
    """(where, command, tags) of every line of every bash block, in reading order."""
    out = []
    for page in pages():
        for start, tags, lines in blocks(page):
            if tags[:1] != ["bash"]:
                continue
            for line in lines:
                if line.strip() and not line.lstrip().startswith("#"):
                    out.append((f"{page.relative_to(ROOT)}:{start}", line.strip(), tags[1:]))
    return out


def test_every_command_listing_is_a_bash_block():
    """Commands shown in another fence would never run here: they must be ```bash (tagged if need be)."""
    loose = [
        f"{page.relative_to(ROOT)}:{start}: {line}"
        for page in pages()
        for start, tags, lines in blocks(page)
        if tags[:1] != ["bash"]
        for line in lines
        if COMMAND.match(line)
    ]
    assert not loose, "command listings outside ```bash fences:\n" + "\n".join(loose)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("reader")
    for name in ("src", "docs", "configs", "benchmarks", "README.md"):
        (work / name).symlink_to(ROOT / name)
    shim = tmp_path_factory.mktemp("bin")
    (shim / "uv").write_text(UV_SHIM, encoding="utf-8")
    (shim / "uv").chmod(0o755)
    env = dict(os.environ)
    env.pop("GPTOSS_DEBUG", None)
    env.update(
        PATH=os.pathsep.join([str(shim), str(Path(sys.executable).parent), env.get("PATH", "")]),
        GPTOSS_CACHE=str(work / ".cache"),
        GPTOSS_PROGRESS_SECONDS="600",
        KEY="docs-test-key",
        OMP_NUM_THREADS="1",
    )
    return work, env


def run_server(command: str, work: Path, env: dict) -> None:
    """A server line: on a free port, up (its start-up line on stderr), then SIGTERM and exit 0."""
    args = shlex.split(re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), command), comments=True)  # as bash
    if "--port" in args:
        args[args.index("--port") + 1] = "0"
    else:
        args += ["--port", "0"]
    log = work / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            args, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            deadline = time.monotonic() + 180
            while "serving " not in log.read_text(errors="replace"):
                assert proc.poll() is None, log.read_text(errors="replace")
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text(errors="replace")
        finally:
            if proc.poll() is None:
                proc.kill()


def run_line(command: str, tags: list[str], work: Path, env: dict) -> str | None:
    """Runs one documented command; returns why it was not run, or None."""
    if SKIP_TAGS & set(tags):
        return f"tagged {', '.join(sorted(SKIP_TAGS & set(tags)))}"
    if PROJECT_CHECKS.match(command):
        return "the project's own checks (CI runs them)"
    if command.startswith("uv run tensorboard"):
        words = shlex.split(command, comments=True)
        logdir = work / words[words.index("--logdir") + 1]
        assert any(logdir.rglob("events.out.tfevents.*")), f"{logdir} holds no TensorBoard events"
        return None
    if "server" in tags:
        run_server(command.replace("uv run ", "", 1), work, env)
        return None
    proc = subprocess.run(
        ["bash", "-c", command],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-3000:]}"
    return None


def test_the_documented_commands_run_in_order(workdir):
    work, env = workdir
    ran = []
    for where, command, tags in commands():
        try:
            skipped = run_line(command, tags, work, env)
        except AssertionError as err:
            raise AssertionError(f"{where}: `{command}` failed: {err}") from None
        if skipped is None:
            ran.append(command)
    assert len(ran) >= 20, ran  # the quick start, training, chat, inference, serve, eval and report pages
