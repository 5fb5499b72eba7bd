"""`gptoss report` on hand-made run directories: CUDA and CPU memory records, several ranks, a killed run.

The runs are synthesised here in the formats train/loop.py and memory.py write (see report/logs.py), with known
answers planted in them: which experts are dead, the peak memory, the last complete step. The PNGs are
checked as real images (signature, size, dimensions read back by PIL), not just as files.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from gptoss_cli.commands import report
from gptoss_cli.errors import GptossError
from gptoss_cli.report.logs import read_jsonl, read_run_logs
from gptoss_cli.report.summary import expert_load, summarize, summary_rows

GIB = 1024**3
LAYERS, EXPERTS, LOG_EVERY, STEPS = 4, 8, 10, 300
DEAD_LATE = (1, 5)  # routed tokens early on, then nothing over the last logs: dead
DEAD_ALWAYS = (3, 2)  # never routed a token: dead
REVIVED = (2, 6)  # nothing early, tokens in the last logs: alive
PNGS = ["loss.png", "throughput.png", "expert-load.png", "train-gpu-memory.png", "inference-gpu-memory.png"]

app = typer.Typer()
app.command()(report.command)
runner = CliRunner()


def expert_counts(step: int) -> list[list[int]]:
    counts = [[100 + 10 * layer + 7 * e + step % 13 for e in range(EXPERTS)] for layer in range(LAYERS)]
    late = step > STEPS - 3 * LOG_EVERY
    if late:
        counts[DEAD_LATE[0]][DEAD_LATE[1]] = 0
    else:
        counts[REVIVED[0]][REVIVED[1]] = 0
    counts[DEAD_ALWAYS[0]][DEAD_ALWAYS[1]] = 0
    return counts


def write_lines(path: Path, records: list[dict], cut_last: bool = False) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if cut_last:  # a killed writer: the last line stops mid-object, with no newline
        text += json.dumps({"kind": "train", "step": 99999, "loss": 1.0})[:25]
    path.write_text(text)


def memory_records(device: str, phase: str, ranks: int, n: int = 40) -> list[dict]:
    out = []
    for i in range(n):
        for rank in range(ranks):
            rec = {
                "time": 1.5 * i,
                "wall": 1.7e9 + 1.5 * i,
                "phase": phase,
                "rank": rank,
                "step": i * 8 if phase == "train" else None,
                "device": device,
                "rss_bytes": int((0.6 + 0.01 * i) * GIB),
            }
            if device == "cuda":
                alloc = (1.0 + 0.5 * rank + 0.02 * i) * GIB
                rec.update(
                    allocated_bytes=int(alloc),
                    reserved_bytes=int(alloc + 0.5 * GIB),
                    peak_bytes=int(alloc + 0.25 * GIB),
                    nvml_used_bytes=int(alloc + 1.0 * GIB),
                )
                rec["label"] = "GPU memory"
            else:
                rec["label"] = "CPU memory (process RSS)"
            if phase == "infer":
                rec["tokens"] = i
            out.append(rec)
    return out


def make_run(
    root: Path,
    name: str = "demo",
    device: str = "cuda",
    ranks: int = 1,
    infer: bool = True,
    finished: bool = True,
    cut_last: bool = False,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: tiny\ntrain:\n  precision: auto\n")
    metrics, elapsed = [], 0.0
    for step in range(LOG_EVERY, STEPS + 1, LOG_EVERY):
        elapsed += 0.5
        loss = 2.0 + 5.0 * math.exp(-step / 80)
        metrics.append(
            {
                "kind": "train",
                "step": step,
                "epoch": 0,
                "epochs": step / (2 * STEPS),  # half of the first epoch when the run ends
                "loss": loss,
                "aux_loss": 0.01,
                "z_loss": 0.0,
                "ppl": math.exp(loss),
                "accuracy": 0.3,
                "lr": 3e-3 * min(1.0, step / 30),
                "grad_norm": 1.0,
                "tokens_per_s": 20000.0 + 100 * (step % 7),
                "tokens": step * 1024,
                "elapsed_s": elapsed,
                "expert_counts": expert_counts(step),
            }
        )
        if step % 50 == 0:
            metrics.append(
                {
                    "kind": "eval",
                    "step": step,
                    "epoch": 0,
                    "val_loss": loss + 0.1,
                    "val_ppl": math.exp(loss + 0.1),
                    "val_accuracy": 0.28,
                    "elapsed_s": elapsed,
                }
            )
    write_lines(run / "metrics.jsonl", metrics, cut_last)
    write_lines(run / "memory.jsonl", memory_records(device, "train", ranks), cut_last)
    if infer:
        write_lines(run / "inference-memory.jsonl", memory_records(device, "infer", 1, n=20))
    if finished:
        (run / "summary.json").write_text(
            json.dumps(
                {
                    "steps": STEPS,
                    "epochs": 1,
                    "elapsed_s": elapsed,
                    "tokens": STEPS * 1024,
                    "tokens_per_s": 20480.0,
                    "final_loss": loss,
                    "best_val_loss": 2.2,
                    "final_val_loss": 2.2,
                    "peak_memory_bytes": 123,
                    "device": device,
                    "precision": "bf16-mixed",
                    "status": "finished",
                }
            )
        )
    return run


def assert_png(path: Path, min_bytes: int = 5000) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"
    with Image.open(path) as image:
        image.load()
        assert image.width >= 600 and image.height >= 300
        return image.size


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory) -> tuple[Path, object]:
    """A finished two-rank CUDA run with inference, reported once (rendering is the slow part)."""
    run = make_run(tmp_path_factory.mktemp("runs"), device="cuda", ranks=2)
    return run, runner.invoke(app, ["--run", str(run)])


def test_cuda_run_with_two_ranks_writes_every_png_and_summary(cuda_run):
    run, result = cuda_run
    assert result.exit_code == 0, result.output
    for name in PNGS:
        assert_png(run / "report" / name)
    md = (run / "report" / "report.md").read_text()
    assert all(f"]({name})" in md for name in PNGS)  # relative links: the folder can be shared as is
    assert "## Missing" not in md
    assert "Run summary" in result.output and "dead experts" in result.output and "peak memory" in result.output
    assert "warning" not in result.output


def test_summary_matches_the_planted_answers(cuda_run):
    run, _ = cuda_run
    summary = summarize(read_run_logs(run, "demo", warn=pytest.fail))
    # peak_bytes = allocated + 0.25 GiB, largest on rank 1 at the last sample (i = 39), not summary.json's 123
    assert summary["train_peak_memory_bytes"] == int((1.0 + 0.5 + 0.02 * 39) * GIB + 0.25 * GIB)
    assert "2 ranks" in summary["train_memory_measure"]
    assert summary["infer_peak_memory_bytes"] == int((1.0 + 0.02 * 19) * GIB + 0.25 * GIB)
    assert sorted(map(tuple, summary["dead_experts"])) == sorted([DEAD_LATE, DEAD_ALWAYS])
    assert summary["num_layers"] == LAYERS and summary["num_experts"] == EXPERTS
    final = 2.0 + 5.0 * math.exp(-STEPS / 80)
    assert summary["final_loss"] == pytest.approx(final)
    assert summary["final_ppl"] == pytest.approx(math.exp(final))
    assert summary["final_val_loss"] == pytest.approx(final + 0.1)
    assert summary["steps"] == STEPS and summary["tokens_per_s"] == 20480.0 and summary["status"] == "finished"
    assert summary["missing"] == []


def test_expert_shares_are_per_layer_fractions_over_the_run():
    train = [{"expert_counts": [[3, 1, 0, 0], [0, 0, 2, 2]]}, {"expert_counts": [[1, 3, 0, 4], [2, 2, 0, 0]]}]
    shares, dead = expert_load(train)
    assert shares.tolist() == [[4 / 12, 4 / 12, 0, 4 / 12], [2 / 8, 2 / 8, 2 / 8, 2 / 8]]
    assert dead == [(0, 2)]  # zero in both logs (DEAD_WINDOW >= 2); layer 1 expert 3 came back to 0 only once


def test_killed_cpu_run_without_inference_warns_and_still_plots(tmp_path, monkeypatch):
    # Killed mid-write (last lines cut off, no summary.json) and never used for inference.
    run = make_run(tmp_path / "runs", device="cpu", infer=False, finished=False, cut_last=True)
    stale = run / "report" / "inference-gpu-memory.png"
    stale.parent.mkdir()
    stale.write_bytes(b"from an older report")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [])  # no --run: the newest run under ./runs
    assert result.exit_code == 0, result.output
    assert result.stderr.count("cut off") == 2  # metrics.jsonl and memory.jsonl
    out = " ".join(result.stderr.split())  # rich wraps long lines
    assert "missing" in out and "inference-memory.jsonl" in out and "summary.json" in out
    for name in PNGS[:-1]:
        assert_png(run / "report" / name)
    assert not stale.exists()  # report.md and the folder agree
    md = (run / "report" / "report.md").read_text()
    assert "## Missing" in md and "## Warnings" in md and "inference-gpu-memory.png" not in md
    warnings: list[str] = []
    summary = summarize(read_run_logs(run, "demo", warnings.append))
    assert len(warnings) == 2
    assert summary["steps"] == STEPS  # the half-written step 99999 was skipped
    assert summary["epochs"] == 0.5  # the passes done, from the last train line; not its epoch index 0
    assert dict(summary_rows([summary]))["steps (epochs)"] == [f"{STEPS:,} (0.5 epochs)"]
    assert summary["train_memory_measure"].startswith("CPU")
    assert summary["train_peak_memory_bytes"] == int((0.6 + 0.01 * 39) * GIB)
    assert summary["infer_peak_memory_bytes"] is None and summary["status"].startswith("unfinished")


def test_comparing_runs_overlays_them_into_out(tmp_path, cuda_run):
    first, _ = cuda_run
    second = make_run(tmp_path, "cpu-run", device="cpu", infer=False)
    out = tmp_path / "compare"
    result = runner.invoke(app, ["--run", str(first), "--run", str(second), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["name"] for r in data["runs"]] == ["demo", "cpu-run"]
    assert data["files"] == [str(out / name) for name in PNGS] + [str(out / "report.md")]
    for name in PNGS:
        assert_png(out / name)
    single = assert_png(first / "report" / "expert-load.png")
    assert assert_png(out / "expert-load.png")[1] > 1.5 * single[1]  # one heatmap panel per run
    assert not (second / "report").exists()


def test_unreadable_and_joined_lines(tmp_path):
    path = tmp_path / "memory.jsonl"
    good = [json.dumps({"time": t, "rank": 0}) for t in range(4)]
    # line 2: garbage; line 4: a killed writer's half record, then the resumed run's first record on the same line
    path.write_text("\n".join([good[0], "{not json", good[1], good[2][:9] + good[3], '{"time": 9']) + "\n")
    warnings: list[str] = []
    records = read_jsonl(path, warnings.append)
    assert [r["time"] for r in records] == [0, 1, 3]
    assert len(warnings) == 3
    assert "last line (5), cut off" in warnings[0]
    assert "skipped 1 unreadable line(s): 2" in warnings[1]
    assert "line(s) 4 began with a record cut off" in warnings[2]


def test_no_run_is_one_line_error_with_exit_code_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [])
    assert isinstance(result.exception, GptossError)
    assert "\n" not in str(result.exception) and "gptoss train" in str(result.exception)
    # Through the real error boundary in cli.main, with this command as the app.
    from gptoss_cli import cli

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr(sys, "argv", ["gptoss"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run found") and err.count("\n") == 1


def test_run_without_any_data_says_what_to_run(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "config.yaml").write_text("name: tiny\n")
    result = runner.invoke(app, ["--run", str(run)])
    assert isinstance(result.exception, GptossError)
    assert "gptoss train" in str(result.exception) and "\n" not in str(result.exception)
    missing = runner.invoke(app, ["--run", str(tmp_path / "nope")])
    assert isinstance(missing.exception, GptossError) and "not found" in str(missing.exception)


def test_command_module_does_not_import_matplotlib():
    code = "import sys, gptoss_cli.commands.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
