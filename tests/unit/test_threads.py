"""Thread defaults (threads.py): the free physical cores, never fewer than one, never more than there are;
--threads and OMP_NUM_THREADS win; the choice is named for the summary lines."""

from __future__ import annotations

import os

import psutil
import pytest
import torch

from gptoss_cli import threads
from gptoss_cli.errors import GptossError


@pytest.fixture(autouse=True)
def keep_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_CHOICE", None)
    yield
    torch.set_num_threads(before)


def machine(monkeypatch, *, usable: int, physical: int, load: float) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(usable)), raising=False)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: physical if not logical else usable)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))


@pytest.mark.parametrize(
    ("usable", "physical", "load", "expected"),
    [
        (2, 2, 0.1, 2),  # idle: every physical core
        (2, 2, 1.2, 1),  # one core busy elsewhere: the other one
        (2, 2, 7.0, 1),  # overloaded: still one, never zero
        (16, 8, 0.0, 8),  # hyper-threads do not count: physical cores
        (4, 8, 0.0, 4),  # an affinity mask (taskset, cgroups) caps it
    ],
)
def test_the_default_is_the_free_physical_cores(monkeypatch, usable, physical, load, expected):
    machine(monkeypatch, usable=usable, physical=physical, load=load)
    n, why = threads.set_threads()
    assert n == expected and torch.get_num_threads() == expected
    assert why == f"{expected} free of {min(usable, physical)} physical cores, load {load:.1f}"
    assert threads.describe() == f"{expected} thread{'s' if expected != 1 else ''}: {why}"


def test_an_explicit_count_and_the_environment_win(monkeypatch):
    machine(monkeypatch, usable=2, physical=2, load=0.0)
    assert threads.set_threads(1) == (1, "--threads") and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.set_threads() == (1, "OMP_NUM_THREADS")
    with pytest.raises(GptossError, match="--threads must be >= 1"):
        threads.set_threads(0)


def test_every_computing_command_takes_threads(gptoss):
    from typer.testing import CliRunner

    from gptoss_cli.cli import app

    for command in ("train", "infer", "chat", "serve", "eval", "bench"):
        assert "--threads" in CliRunner().invoke(app, [command, "--help"]).stdout, command
    code, _, err = gptoss("bench", "--threads", "0")
    assert code == 2 and "--threads" in err and err.count("\n") == 1
