"""`gptoss infer` for a first-time user: --prompts-file - reads stdin, the summary line names the checkpoint
(and so the run) it chose, --compile says it is compiling (the summary: compiled or not, and why),
and NaN weights end in one error line, exit 2.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.integration.test_infer_cli import make_run


@pytest.fixture
def demo(tmp_path) -> Path:
    return make_run(tmp_path / "demo")


def test_prompts_file_dash_reads_stdin(gptoss, demo, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("first prompt\n\nsecond prompt\n"))
    code, out, err = gptoss("infer", "--prompts-file", "-", "--run", demo, "-n", "3", "--temperature", "0", "--json")
    assert code == 0, err
    assert [line.split('"prompt": ')[1].split('",')[0] for line in out.splitlines()] == [
        '"first prompt',
        '"second prompt',
    ]
    assert f"{demo / 'checkpoints' / 'step-00000010'} on cpu" in err  # the run it chose, in full


def test_compile_says_so_before_it_waits(gptoss, demo, monkeypatch):
    """--compile says so before the wait; without it a short generation runs eagerly; the summary line says
    which ran and why. torch.compile is the identity here: the message, not a minute of inductor."""
    import torch

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    code, out, err = gptoss("infer", "hello", "--run", demo, "-n", "2", "--compile")
    assert code == 0 and err.startswith("compiling the decode step (torch.compile, --compile)"), err
    assert " compiled (--compile) | " in err, err
    code, out, err = gptoss("infer", "hello", "--run", demo, "-n", "2")
    assert code == 0 and "compiling" not in err
    assert "tokens/s eager (auto: 2 steps < 2048, --compile to compile)" in err, err
    code, out, err = gptoss("infer", "hello", "--run", demo, "-n", "2", "--no-compile")
    assert code == 0 and "eager (--no-compile)" in err, err


def test_the_automatic_choice_compiles_long_generations():
    from gptoss_cli.infer.compiled import AUTO_COMPILE_STEPS, compile_choice

    n = AUTO_COMPILE_STEPS
    assert compile_choice(None, n) == (True, f"auto: {n} steps >= {n}")
    assert compile_choice(None, AUTO_COMPILE_STEPS - 1)[0] is False
    assert compile_choice(True, 1) == (True, "--compile") and compile_choice(False, 10**6) == (False, "--no-compile")
    from gptoss_cli.commands.infer import CompileOpt

    assert f"generations of {n} steps or more" in CompileOpt.__metadata__[0].help  # --help says the same number


def test_greedy_on_nan_weights_is_one_error_line(gptoss, demo):
    path = demo / "checkpoints" / "step-00000010" / "model.safetensors"
    weights = load_file(str(path))
    weights = {k: torch.full_like(v, float("nan")) if k == "norm.scale" else v for k, v in weights.items()}
    save_file(weights, str(path))
    code, out, err = gptoss("infer", "hello", "--run", demo, "-n", "5", "--temperature", "0")
    assert code == 2 and out == ""
    assert err == (
        "error: the model produced non-finite logits (NaN or inf): the checkpoint's weights are diverged or damaged\n"
    )


def test_a_seed_torch_cannot_take_is_one_error_line(gptoss, demo):
    """A seed beyond 64 bits is refused with the option's name before the run loads; the widest seeds torch
    takes work, and a negative one is the same as its value modulo 2^64."""
    for seed in (2**64, -(2**63) - 1):
        code, out, err = gptoss("infer", "hello", "--run", demo, "-n", "3", "--seed", seed)
        assert (code, out) == (2, "")
        assert err == f"error: --seed: must be a 64-bit seed (from -2^63 to 2^64-1), got {seed}\n"
    texts = []
    for seed in (2**64 - 1, -1):
        code, out, err = gptoss("infer", "hello", "--run", demo, "-n", "6", "--seed", seed, "--json")
        assert code == 0, err
        texts.append(json.loads(out)["completion"])
    assert texts[0] == texts[1]


def test_prompts_that_are_not_utf8_are_one_error_line(gptoss, demo, tmp_path, monkeypatch):
    """A prompt argument (Python hands its bad bytes on as surrogates), a prompts file and stdin."""
    code, out, err = gptoss("infer", "caf\udce9", "--run", demo, "-n", "2")
    assert (code, out, err) == (2, "", "error: prompt: not UTF-8 text (byte 0xe9 at character 4)\n")
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"first prompt\nsecond \xff prompt\n")
    code, out, err = gptoss("infer", "--prompts-file", bad, "--run", demo, "-n", "2")
    assert (code, out) == (2, "") and err == f"error: --prompts-file {bad}: line 2 is not UTF-8 text (byte 0xff)\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\xfe\n")))
    code, out, err = gptoss("infer", "--prompts-file", "-", "--run", demo, "-n", "2")
    assert (code, out, err) == (2, "", "error: --prompts-file -: line 2 is not UTF-8 text (byte 0xfe)\n")
