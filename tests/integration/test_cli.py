"""The `gptoss` command line: the real Typer app (`gptoss_cli.cli.app`) through CliRunner for output, and
the real error boundary (`cli.main`, in-process and as `python -m gptoss_cli`) for bad input: exit code 2
and exactly one `error: ...` line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptoss_cli import __version__, cli
from gptoss_cli.config import load_config

runner = CliRunner()
STEP_LINE = re.compile(
    r"^Epoch (\d+), Step (\d+): "
    r"Loss=\d+\.\d{4}, PPL=\d+\.\d{2}, Acc=[01]\.\d{3}, LR=\d\.\d{2}e[-+]\d{2}$"
)


def set_args(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def invoke(*args: str):
    result = runner.invoke(cli.app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, small_overrides):
    """`gptoss train -c tiny --run DIR` with the small overrides and 3 steps -> (CliRunner result, DIR)."""
    root = tmp_path_factory.mktemp("cli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTOSS_CACHE", str(root / "cache"))
        run = root / "run"
        result = invoke(
            "train",
            "-c",
            "tiny",
            "--run",
            run,
            *set_args([*small_overrides, "train.max_steps=3", "train.save_every=2"]),
        )
    torch.set_num_threads(threads)
    return result, run


# ---- help, version, build, env --------------------------------------------------------------------


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"gptoss {__version__}"


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("env", "build", "train", "report"):
        assert re.search(rf"^\W*{command}\b", result.stdout, re.MULTILINE), command
    train_help = invoke("train", "--help")
    assert train_help.exit_code == 0
    for option in ("--config", "--set", "--run", "--resume", "--resume-from", "--tokenizer", "--json"):
        assert option in train_help.stdout


@pytest.mark.parametrize(
    ("config", "total"),
    [
        ("compact.yaml", 1_442_041_488),
        ("compact", 1_442_041_488),
        ("gpt-oss-20b", 20_914_757_184),
        ("gpt-oss-120b", 116_829_156_672),
    ],
)
def test_build_json_parameter_counts(config, total):
    result = invoke("build", "--config", config, "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert info["total_params"] == total
    assert isinstance(info["active_params"], int) and 0 < info["active_params"] < total


def test_build_reports_gpt_oss_20b_weights_packed_and_decoded():
    """The released layout by hand: each expert value is half a byte plus a scale byte per 32 values;
    everything else (and the expert biases) bf16."""
    result = invoke("build", "-c", "gpt-oss-20b", "--json", "--context", "8192")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    at = info["inference_at_context"]
    expert_values = 24 * 32 * (5760 * 2880 + 2880 * 2880)
    packed = expert_values // 2 + expert_values // 32
    assert at["context"] == 8192 and info["inference_dtype"] == "bf16"
    assert at["weights_decoded"] == 2 * info["total_params"]
    assert at["weights_mxfp4_experts"] == 2 * (info["total_params"] - expert_values) + packed
    assert 12.5 * 2**30 < at["weights_mxfp4_experts"] < 13 * 2**30  # the released files are about 12.8 GiB
    assert at["kv_cache"] == 12 * 2 * 512 * 2 * 8192 + 12 * 2 * 512 * 2 * 128  # full layers; sliding ones hold 128
    assert at["peak_mxfp4_experts"] == at["weights_mxfp4_experts"] + at["kv_cache"] + at["prefill_transients"]
    assert at["peak_mxfp4_experts"] < 16 * 2**30 < at["peak_decoded"]


def test_build_short_flag_and_overrides():
    result = invoke("build", "-c", "gpt-oss-20b", "--json", "--set", "model.num_hidden_layers=12")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["total_params"] < 20_914_757_184


def test_env_writes_its_report_to_stdout(gptoss):
    code, out, err = gptoss("env")
    assert code == 0, err
    assert "attention" in out and "MoE" in out and "torch" in out  # gptoss env > env.txt keeps the report
    assert ("CPU only" in out) is (not torch.cuda.is_available())


def test_env_json():
    result = invoke("env", "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert isinstance(info["verdict"], str) and info["verdict"]
    assert info["mxfp4_experts"]["works"] is True and info["mxfp4_experts"]["path"].startswith("torch")
    assert info["cuda_available"] is torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert info["cuda_available"] is False and info["gpu_count"] == 0 and info["ready"] is False


# ---- the error boundary ---------------------------------------------------------------------------

BAD_YAML = "model:\n  hidden_size: 64\n  num_experts: 4: 8\n"  # line 3: a second colon


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build", "-c", "tiny", "--set", "model.hidden_sizee=3"], "tiny.yaml: model.hidden_sizee: unknown key"),
        (["build", "-c", "tiny", "--set", "train.lr=abc"], "tiny.yaml: train.lr: expected a number, got 'abc'"),
        (
            ["build", "-c", "tiny", "--set", "model.num_attention_heads=5"],
            "tiny.yaml: model.num_attention_heads: 5 is not a multiple of num_key_value_heads=2",
        ),
        (["build", "-c", "{tmp}/missing.yaml"], "config not found: {tmp}/missing.yaml"),
        (
            ["build", "-c", "{tmp}/bad.yaml"],
            "bad.yaml: YAML syntax error at line 3, column 17: mapping values are not allowed here",
        ),
        (["build", "-c", "tiny", "--set", "trainlr"], "--set 'trainlr': expected section.key=value"),
        (["build", "-c", "tiny", "--set", "optim.lr=1"], "--set 'optim.lr=1': unknown section 'optim'"),
        (["train", "-c", "{tmp}/unknown.yaml", "--run", "{tmp}/run"], "unknown.yaml: trian: unknown section"),
        (
            ["train", "-c", "tiny", "--run", "{tmp}/run", "--set", "data.paths={tmp}/nope.txt"],
            "data.paths: {tmp}/nope.txt does not exist",
        ),
        (["train", "-c", "tiny", "--run", "{tmp}/run", "--resume"], "no complete checkpoint under {tmp}/run"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(gptoss, tmp_path, isolated_cache, args, message):
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    (tmp_path / "unknown.yaml").write_text("trian:\n  lr: 1\n")
    code, out, err = gptoss(*(a.format(tmp=tmp_path) for a in args))
    assert code == 2
    assert err.endswith("\n") and len(err.splitlines()) == 1, err
    assert err.startswith("error: " + message.format(tmp=tmp_path))
    assert "Traceback" not in out + err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "args",
    [  # `build`: `train` imports torch.distributed first (~7 s per process)
        ["build", "-c", "tiny", "--set", "train.lr=abc"],
        ["build", "-c", "{tmp}/bad.yaml"],
    ],
)
def test_error_boundary_in_a_real_process(tmp_path, args):
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_DEBUG"} | {"GPTOSS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_cli", *(a.format(tmp=tmp_path) for a in args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_help_shows_no_type_for_flags_and_the_element_type_for_repeatable_options(gptoss, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # one line per option, so each option's row can be read
    for command in ("train", "infer", "chat", "eval", "serve", "export", "report", "bench", "prepare"):
        code, out, err = gptoss(command, "--help")
        rows = {m.group(1): line for line in out.splitlines() if (m := re.match(r"│\s*\*?\s*(--[\w-]+)", line))}
        assert code == 0 and rows, (command, out)
        assert not [row for row in rows.values() if "<bool>" in row or "list[" in row], (command, out)
        assert "<" not in rows["--help"], rows["--help"]
        if "--stop" in rows:
            assert "<str>" in rows["--stop"], rows["--stop"]
    code, out, err = gptoss("infer", "--help")
    assert "<" not in out.split("--compile", 1)[1].splitlines()[0]  # a flag pair: no value to show


def test_usage_errors_are_one_line_naming_the_help(gptoss):
    for args, problem, where in (
        (["build", "--no-such-option"], "No such option: --no-such-option", "gptoss build --help"),
        (["frobnicate"], "No such command 'frobnicate'", "gptoss --help"),
        (["build", "--set"], "Option '--set' requires an argument", "--help"),
        (["infer", "x", "--device", "gpu"], "'gpu' is not one of 'auto', 'cpu', 'cuda'", "gptoss infer --help"),
        (["export"], "Missing option '--out'", "gptoss export --help"),
    ):
        code, out, err = gptoss(*args)
        assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
        assert problem in err and where in err and err.rstrip().endswith("--help)"), err
        assert "Traceback" not in err and "GPTOSS_DEBUG" not in err, err  # a usage error, not our bug fallback
    code, out, err = gptoss()  # bare: the help text, as click shows it
    assert code == 2 and "Usage: gptoss" in out + err


# ---- training through the CLI ---------------------------------------------------------------------


def test_train_writes_the_run_and_prints_step_lines(cli_run, small_overrides):
    result, run = cli_run
    assert result.exit_code == 0, result.output
    steps = [STEP_LINE.match(line) for line in result.stderr.splitlines()]  # people read stderr
    assert [int(m.group(2)) for m in steps if m] == [1, 2, 3]
    assert all(m.group(1) == "0" for m in steps if m)
    assert "completed: 3 steps" in result.stderr and result.stdout == ""
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "memory.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert sorted(d.name for d in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    cfg = load_config(run / "config.yaml")
    assert cfg == load_config("tiny", [*small_overrides, "train.max_steps=3", "train.save_every=2"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3


def test_train_resume_uses_the_runs_config(cli_run, tmp_path, gptoss, isolated_cache, small_overrides):
    _, done = cli_run
    run = shutil.copytree(done, tmp_path / "run")
    # Without --config, --resume reads RUN/config.yaml; raising max_steps continues the run.
    code, out, err = gptoss("train", "--run", run, "--resume", "--set", "train.max_steps=4")
    assert code == 0, err
    assert [int(m.group(2)) for m in map(STEP_LINE.match, err.splitlines()) if m] == [4] and out == ""
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    code, _, err = gptoss("train", "-c", "tiny", "--run", run, *set_args(small_overrides))
    assert code == 2 and "already holds checkpoints" in err and len(err.splitlines()) == 1


def test_resuming_a_completed_run_says_so(cli_run, tmp_path, gptoss, isolated_cache):
    _, done = cli_run
    run = shutil.copytree(done, tmp_path / "run")
    summary = (run / "summary.json").read_text()
    code, _, err = gptoss("train", "--run", run, "--resume")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {run} already trained 3 of 3 steps") and "train.max_steps" in err
    assert (run / "summary.json").read_text() == summary  # the finished run is left as it was


@pytest.fixture
def restore_console():
    """`train --json` points the shared rich console at stderr; put it back for the tests that follow."""
    from gptoss_cli.output import console

    saved = console._file
    yield
    console._file = saved


def test_train_json_stdout_is_one_object(tmp_path, isolated_cache, torch_one_thread, small_overrides, restore_console):
    result = invoke(
        "train", "-c", "tiny", "--run", tmp_path / "run", "--json", *set_args([*small_overrides, "train.max_steps=2"])
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # progress and step lines went to stderr
    assert summary["steps"] == 2 and summary["status"] == "completed"
    assert summary["run_dir"] == str(tmp_path / "run")
    assert "Epoch 0, Step 2: Loss=" in result.stderr


def test_subprocess_python_is_this_venv():
    """The error-boundary subprocess tests run this interpreter, so they test this checkout."""
    out = subprocess.run(
        [sys.executable, "-c", "import gptoss_cli, sys; print(gptoss_cli.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert Path(out).resolve().parent == Path(cli.__file__).resolve().parent
