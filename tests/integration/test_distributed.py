"""torchrun on CPU (gloo): DDP and FSDP2 training equal a single process on the same global batch, and a
2-process checkpoint resumes in 1 process. These start real process groups, so they take ~1 minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gptoss_cli.config import load_config
from gptoss_cli.errors import GptossError
from gptoss_cli.train.setup import accumulation
from tests.conftest import rtol_for

# The runs differ only in the order the 8 sequences' gradients are summed (fp32, eps sqrt(8)); a step of
# AdamW and the next forward carry that into the logged loss (~log 512): a few chained stages.
LOSS_RTOL = rtol_for(torch.float32, 8, 4)

# Warmup covers every step here, so the learning rate does not depend on train.max_steps. The MoE balance
# loss is computed per process (as Switch/GShard do per device), so it is off for the equality check.
COMMON = [
    "train.log_every=1",
    "train.eval_every=100",
    "train.save_every=100",
    "train.aux_loss_coef=0",
    "train.warmup_steps=10",
    "model.num_hidden_layers=2",
    "model.vocab_size=512",
    "train.seq_len=32",
]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _env(tmp_path):
    return {**os.environ, "OMP_NUM_THREADS": "1", "GPTOSS_CACHE": str(tmp_path / "cache")}


def _single(tmp_path, run, *extra):
    cmd = [sys.executable, "-m", "gptoss_cli", "train", "-c", "tiny", "-r", str(run), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def _torchrun(tmp_path, *args, nproc=2):
    # `--run-dir DIR` or `-r DIR`, not `--run DIR`: torchrun reads `--run` as an abbreviation of `--run-path`.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=300)


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {rec["step"]: rec["loss"] for rec in lines if rec["kind"] == "train"}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    _single(tmp, tmp / "run", *_sets(COMMON + ["train.batch_size=8", "train.max_steps=6"]))
    return _losses(tmp / "run")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, single_run, parallel):
    run = tmp_path / "run"
    out = _torchrun(
        tmp_path,
        "-m",
        "gptoss_cli",
        "train",
        "-c",
        "tiny",
        "--run-dir",
        str(run),
        *_sets(COMMON + ["train.batch_size=4", "train.max_steps=6", f"train.parallel={parallel}"]),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "global batch 4 x 1 accumulation x 2 processes = 8 sequences" in out.stderr
    assert out.stderr.count("Step 1:") == 1  # rank 0 alone prints
    losses = _losses(run)
    assert sorted(losses) == sorted(single_run)
    for step, loss in single_run.items():
        assert losses[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    ranks = {json.loads(line)["rank"] for line in (run / "memory.jsonl").read_text().splitlines()}
    assert ranks == {0, 1}  # memory is sampled on every rank, tagged with it
    assert (run / "checkpoints" / "step-00000006" / "model.safetensors").is_file()


def test_two_process_checkpoint_resumes_in_one(tmp_path, single_run):
    run = tmp_path / "run"
    out = _torchrun(
        tmp_path,
        "-m",
        "gptoss_cli",
        "train",
        "-c",
        "tiny",
        "-r",
        str(run),
        *_sets(COMMON + ["train.batch_size=4", "train.max_steps=3", "train.parallel=fsdp"]),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    _single(tmp_path, run, "--resume", *_sets(COMMON + ["train.batch_size=8", "train.max_steps=6"]))
    losses = _losses(run)
    for step in (4, 5, 6):
        assert losses[step] == pytest.approx(single_run[step], rel=LOSS_RTOL), step


def test_mismatched_configs_across_ranks_fail_clearly(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(
        textwrap.dedent("""
        import os, sys
        from gptoss_cli.train import distributed as distributed
        from gptoss_cli.errors import GptossError
        info = distributed.init("cpu", "ddp")
        try:
            distributed.check_same_config({"seed": 1 if info.rank == 0 else 2}, info)
        except GptossError as err:
            print(f"rank {info.rank}: {err}")
            sys.exit(2)
        finally:
            distributed.shutdown()
    """)
    )
    out = _torchrun(tmp_path, str(script))
    assert out.returncode != 0
    assert "rank 1 has a different config from rank 0" in out.stdout


def test_global_batch_must_divide_by_world_size():
    cfg = load_config("tiny", ["train.batch_size=8", "train.global_batch_size=24"])
    assert accumulation(cfg, 1) == 3
    with pytest.raises(GptossError, match="not a multiple of batch_size x world size = 8 x 2"):
        accumulation(cfg, 2)
    assert accumulation(load_config("tiny", ["train.batch_size=4", "train.global_batch_size=16"]), 2) == 2


def test_two_processes_on_a_prepared_dataset_match_one(tmp_path):
    """Both ranks memory-map one prepared dataset and draw only their own rows of each global batch."""
    data = tmp_path / "ds"
    cmd = [
        sys.executable,
        "-m",
        "gptoss_cli",
        "prepare",
        "--out",
        str(data),
        "-c",
        "tiny",
        "--workers",
        "1",
        *_sets(COMMON),
        str(Path(__file__).resolve().parents[2] / "README.md"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    common = COMMON + [f"data.prepared={data}", "train.max_steps=4", "train.seq_len=16"]
    _single(tmp_path, tmp_path / "one", *_sets(common + ["train.batch_size=8"]))
    out = _torchrun(
        tmp_path,
        "-m",
        "gptoss_cli",
        "train",
        "-c",
        "tiny",
        "-r",
        str(tmp_path / "two"),
        *_sets(common + ["train.batch_size=4"]),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "waiting for rank 0" not in out.stderr  # nothing to prepare: no rank waits
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step, loss in one.items():
        assert abs(two[step] - loss) <= 1e-5, (step, two[step], loss)
    assert not (tmp_path / "cache" / "datasets").exists()  # neither run tokenized anything


def test_lora_in_two_processes_matches_one(tmp_path):
    """DDP over a frozen base: only the adapters' gradients are averaged, and the run equals one process on
    the same global batch; its checkpoint holds the adapters alone."""
    base = tmp_path / "base"
    _single(tmp_path, base, *_sets(COMMON + ["train.batch_size=8", "train.max_steps=1"]))
    lora = ["lora.rank=4", "train.lr=1e-2", "train.max_steps=4"]
    _single(tmp_path, tmp_path / "one", "--init-from", str(base), *_sets(COMMON + lora + ["train.batch_size=8"]))
    out = _torchrun(
        tmp_path,
        "-m",
        "gptoss_cli",
        "train",
        "-c",
        "tiny",
        "--run-dir",
        str(tmp_path / "two"),
        "--init-from",
        str(base),
        *_sets(COMMON + lora + ["train.batch_size=4"]),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert saved and all(name.endswith((".lora_A", ".lora_B")) for name in saved)
