"""`gptoss eval --tasks` against lm-evaluation-harness' own models on the same weights: per item, the
log-likelihoods, the greedy flags, the generated text and the metrics equal

- lm-eval's `hf` model on `gptoss export` of the run (transformers' GptOssForCausalLM), and
- lm-eval's `local-completions` model against `gptoss serve` of the run (a real server on a loopback port,
  spoken to over HTTP by lm-eval with token-id prompts, echo and logprobs).

The tasks are shipped in tests/lm_eval_tasks/ (a 4-choice task with one solved example before each question,
rolling log-likelihood of short documents, greedy generation to a stop string), with their data in local
JSON files: nothing is downloaded (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and a private datasets cache). The
command runs as a user runs it, in a subprocess whose stderr is not a terminal, so its progress is plain lines.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_close, rtol_for
from tests.integration.test_serve import Server, make_run

pytest.importorskip("lm_eval")

TASKS_DIR = Path(__file__).resolve().parents[1] / "lm_eval_tasks"
TASKS = ["gptoss_tiny_choice", "gptoss_tiny_rolling", "gptoss_tiny_generate"]
CONTEXT = 160  # make_run's max_context_length
# Sums of up to ~60 fp32 log-probabilities, each a chain of a few reductions over the hidden size, computed
# by two implementations (ours and transformers', or ours through the server's cached, chunked prefill).
RTOL = rtol_for(torch.float32, 64, 16)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Hugging Face libraries offline, a datasets cache of our own, the tasks' folder as working directory
    (their data_files are relative to it), for this process and the commands it starts."""
    cache = tmp_path_factory.mktemp("datasets-cache")
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache)}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        import datasets

        # datasets reads these once, at import: patch what it uses at run time as well
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.chdir(TASKS_DIR)
        yield env


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("tasks") / "demo")


@pytest.fixture(scope="module")
def export(run, tmp_path_factory) -> Path:
    from gptoss_cli.interop.export import export_run

    out = tmp_path_factory.mktemp("hf") / "demo"
    export_run(run, out, dtype="fp32")
    return out


@pytest.fixture(scope="module")
def ours(run, offline) -> dict:
    """`gptoss eval --tasks` as a user runs it: results on stdout (--json), samples saved into the run."""
    cmd = [sys.executable, "-c", "from gptoss_cli.cli import main; main()", "eval", "--run", str(run)]
    cmd += ["--tasks", ",".join(TASKS), "--include-path", str(TASKS_DIR), "--log-samples", "--batch-size", "3"]
    cmd += ["--device", "cpu", "--json"]
    env = {**os.environ, **offline, "OMP_NUM_THREADS": "1", "GPTOSS_DEBUG": "0"}
    done = subprocess.run(cmd, cwd=TASKS_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    folder = Path(result["gptoss"]["saved"]).parent
    samples = {t: _by_doc(json.loads(line) for line in (folder / f"samples_{t}.jsonl").open()) for t in TASKS}
    return {"result": result, "samples": samples, "stderr": done.stderr, "folder": folder}


def lm_eval_reference(offline, model: str, model_args: dict) -> dict:
    """lm-eval's own evaluation of the tasks with one of its models, samples logged."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(1)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    out = simple_evaluate(
        model=model, model_args=model_args, tasks=TASKS, task_manager=manager, batch_size=4, log_samples=True
    )
    from lm_eval.utils import handle_non_serializable

    samples = json.loads(json.dumps(out.pop("samples"), default=handle_non_serializable))  # as saved: JSON
    return {"result": out, "samples": {t: _by_doc(samples[t]) for t in TASKS}}


def _by_doc(samples) -> list[dict]:
    return sorted(samples, key=lambda s: s["doc_id"])


def assert_same_evaluation(ours: dict, ref: dict) -> None:
    """Per item: the same log-likelihoods (within float rounding), greedy flags, generations; the same
    accuracy; the rolling task's metrics from equal log-likelihoods."""
    choice_ours, choice_ref = ours["samples"]["gptoss_tiny_choice"], ref["samples"]["gptoss_tiny_choice"]
    assert len(choice_ours) == len(choice_ref) == 10
    for a, b in zip(choice_ours, choice_ref, strict=True):
        assert (a["doc"], a["arguments"]) == (b["doc"], b["arguments"])  # the same prompts, few-shot example too
        lls_a, lls_b = [r[0][0] for r in a["resps"]], [r[0][0] for r in b["resps"]]
        assert_close(torch.tensor(lls_a), torch.tensor(lls_b), RTOL, what=f"doc {a['doc_id']}")
        assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]
        assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])
    for metric in ("acc,none", "acc_norm,none"):
        assert (
            ours["result"]["results"]["gptoss_tiny_choice"][metric]
            == ref["result"]["results"]["gptoss_tiny_choice"][metric]
        )

    rolling_ours, rolling_ref = ours["samples"]["gptoss_tiny_rolling"], ref["samples"]["gptoss_tiny_rolling"]
    got = torch.tensor([s["resps"][0][0] for s in rolling_ours])
    assert_close(got, torch.tensor([s["resps"][0][0] for s in rolling_ref]), RTOL, what="rolling")
    a, b = ours["result"]["results"]["gptoss_tiny_rolling"], ref["result"]["results"]["gptoss_tiny_rolling"]
    assert_close(torch.tensor(a["bits_per_byte,none"]), torch.tensor(b["bits_per_byte,none"]), RTOL)
    assert_close(
        torch.tensor(math.log(a["word_perplexity,none"])), torch.tensor(math.log(b["word_perplexity,none"])), RTOL
    )

    gen_ours, gen_ref = ours["samples"]["gptoss_tiny_generate"], ref["samples"]["gptoss_tiny_generate"]
    assert [s["resps"][0][0] for s in gen_ours] == [s["resps"][0][0] for s in gen_ref]
    assert all(s["resps"][0][0] for s in gen_ours)  # something was generated


def test_tasks_equal_lm_evals_hf_model_on_the_export(ours, export, offline):
    ref = lm_eval_reference(offline, "hf", {"pretrained": str(export), "dtype": "float32", "device": "cpu"})
    assert_same_evaluation(ours, ref)


def test_tasks_equal_lm_evals_local_completions_against_gptoss_serve(ours, run, export, offline):
    server = Server(run, "--drain-timeout", "0")
    try:
        server.wait_ready()
        ref = lm_eval_reference(
            offline,
            "local-completions",
            {
                "model": "demo",
                "base_url": server.url + "/v1/completions",
                "tokenizer_backend": "huggingface",
                "tokenizer": str(export),  # the export's tokenizer.json is the run's
                "tokenized_requests": True,  # token-id prompts: the server scores exactly lm-eval's tokens
                "max_length": CONTEXT,
                "max_retries": 1,
            },
        )
    finally:
        code = server.stop()
    assert code == 0, server.stderr()
    assert_same_evaluation(ours, ref)


def test_results_are_lm_evals_json_in_the_run_and_the_report_shows_them(ours, run, gptoss):
    result = ours["result"]
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"):
        assert key in result, key
    assert result["n-shot"]["gptoss_tiny_choice"] == 1
    assert result["gptoss"]["step"] == 10 and result["gptoss"]["tasks"] == TASKS
    saved = json.loads((ours["folder"] / "results.json").read_text())
    assert saved["results"] == result["results"] and "samples" not in saved
    assert not [p for p in ours["folder"].parent.iterdir() if p.name.startswith(".")]  # written whole

    code, out, err = gptoss("report", "--run", run, "--json")
    assert code == 0, err
    rows = json.loads(out)["runs"][0]["task_results"]
    acc = next(r for r in rows if r["task"] == "gptoss_tiny_choice" and r["metric"] == "acc")
    assert acc["value"] == result["results"]["gptoss_tiny_choice"]["acc,none"] and acc["samples"] == 10
    report = (run / "report" / "report.md").read_text()
    assert "## Standard tasks" in report and "| gptoss_tiny_rolling |" in report


def test_progress_is_plain_lines_off_a_terminal(ours):
    lines = ours["stderr"].splitlines()
    for kind, count in (("loglikelihood", 40), ("generate_until", 6), ("rolling loglikelihood", 4)):
        assert f"scoring demo/step-00000010 {kind}: started" in lines
        done = f"scoring demo/step-00000010 {kind}: done, {count}/{count} requests (100%); "
        assert any(line.startswith(done) for line in lines), (kind, lines)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "gptoss_tiny_choice", "--data", "x.txt"], "--data applies only to scoring a text"),
        (["--data", "x.txt", "--limit", "3"], "--limit applies only with --tasks"),
        (["--tasks", "gptoss_tiny_choice", "--limit", "0"], "--limit must be > 0"),
        (["--tasks", "gptoss_tiny_choice", "--include-path", "no-such-dir"], "is not a directory"),
        (["--tasks", "gptoss_tiny_choice,"], "an empty name"),
        (["--tasks", "gptoss_missing_data"], "its data could not be loaded"),
        (["--tasks", "gptoss_no_such_task"], "unknown lm-eval task gptoss_no_such_task"),
    ],
)
def test_bad_task_options_are_one_line_errors(gptoss, run, offline, tmp_path, args, message):
    (tmp_path / "missing.yaml").write_text(
        (TASKS_DIR / "tiny_choice.yaml")
        .read_text()
        .replace("gptoss_tiny_choice", "gptoss_missing_data")
        .replace("test: tiny_choice.jsonl", "test: no_such_file.jsonl"),
        encoding="utf-8",
    )
    if "gptoss_missing_data" in args[1]:
        args += ["--include-path", str(tmp_path)]
    code, out, err = gptoss("eval", "--run", run, *args, "--device", "cpu")
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_without_lm_eval_the_error_says_how_to_install_it(gptoss, run, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails
    code, out, err = gptoss("eval", "--run", run, "--tasks", "hellaswag")
    assert code == 2 and "uv sync --extra eval" in err and len(err.strip().splitlines()) == 1, err


def test_a_packed_mxfp4_run_scores_as_its_decoded_weights(run, offline, gptoss, tmp_path):
    """The run's loader applies the checkpoint's transforms, so a run whose experts stay packed in MXFP4
    (exported with --quantize mxfp4, imported packed) scores the tasks as the same weights decoded."""
    from gptoss_cli.evaluate.evaluator import Target
    from gptoss_cli.evaluate.harness import run_tasks
    from gptoss_cli.model.mxfp4 import PackedExperts
    from gptoss_cli.run.open import load_run

    hf, packed, decoded = tmp_path / "hf", tmp_path / "packed", tmp_path / "decoded"
    for args in (
        ["export", "--run", run, "--out", hf, "--quantize", "mxfp4", "--dtype", "fp32"],
        ["import", hf, "--run", packed],
        ["import", hf, "--run", decoded, "--dequantize"],
    ):
        code, _, err = gptoss(*args)
        assert code == 0, err
    assert isinstance(load_run(packed, device="cpu").model.block[0].mlp.mlp1_weight, PackedExperts)
    got = {}
    for name, path in (("packed", packed), ("decoded", decoded)):
        [result] = run_tasks(
            [Target(run=path)], TASKS[:2], include_path=TASKS_DIR, device="cpu", log_samples=True, save=False
        )
        got[name] = {t: _by_doc(result["samples"][t]) for t in TASKS[:2]}
    for task in TASKS[:2]:
        lls = {n: torch.tensor([_loglikelihood(r[0]) for s in got[n][task] for r in s["resps"]]) for n in got}
        assert_close(lls["packed"], lls["decoded"], RTOL, what=task)


def _loglikelihood(response) -> float:
    """A logged response: (log-likelihood, is greedy) for a choice, the log-likelihood alone when rolling."""
    return response[0] if isinstance(response, (list, tuple)) else response
