"""`gptoss bench` smoke test: a very small model through the command's JSON output (not a timing test).

Checks the report's shape and sanity: positive throughputs, a forward/backward/optimizer split that adds up,
an MFU between 0 and 1.5, prefill and decode figures for batch 1 and the larger batch, peak memory.
"""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from gptoss_cli.commands import bench

SMALL = [
    "model.num_hidden_layers=2",
    "model.hidden_size=32",
    "model.head_dim=16",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=1",
    "model.intermediate_size=32",
    "model.num_experts=4",
    "model.experts_per_token=2",
    "model.vocab_size=128",
    "model.sliding_window=8",
    "model.max_context_length=64",
    "model.initial_context_length=64",
    "train.batch_size=2",
    "train.seq_len=16",
    "train.device=cpu",
]


def invoke(*args: str):
    app = typer.Typer()
    app.command("bench")(bench.command)
    app.callback()(lambda: None)  # keep `bench` a sub-command, as in the real app
    result = CliRunner().invoke(app, ["bench", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_bench_json_report_is_complete_and_sane(torch_one_thread):
    sets = [arg for o in SMALL for arg in ("--set", o)]
    result = invoke(
        "--config", "tiny", *sets, "--steps", "2", "--warmup", "1", "--new-tokens", "6", "--decode-batch", "3", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"] == "tiny"
    assert report["device"]["type"] == "cpu" and report["device"]["torch"]

    tr = report["train"]
    assert tr["tokens_per_step"] == 2 * 16 and tr["steps"] == 2
    assert tr["tokens_per_s"] > 0
    ms = tr["ms_per_step"]
    assert all(ms[k] > 0 for k in ("forward", "backward", "optimizer", "total"))
    assert 0 < tr["mfu"] < 1.5
    assert tr["flops_per_token"] > 0 and tr["peak_tflops"] > 0 and "GEMM" in tr["peak_source"]
    assert tr["peak_memory_bytes"] > 0

    inf = report["infer"]
    assert inf["prefill"]["tokens"] == 16 and inf["prefill"]["tokens_per_s"] > 0
    assert [d["batch"] for d in inf["decode"]] == [1, 3]
    for d in inf["decode"]:
        assert d["tokens_per_s"] > 0 and d["ms_per_step"] > 0 and d["new_tokens"] == 6
    assert inf["peak_memory_bytes"] > 0
    assert inf["active_weight_bytes"] > 0 and inf["bandwidth_gb_s"] > 0
    assert inf["decode_batch1_of_bound"] == inf["decode"][0]["tokens_per_s"] / inf["decode_bound_tokens_per_s"]


def test_bench_train_only_prints_a_summary(torch_one_thread):
    sets = [arg for o in SMALL for arg in ("--set", o)]
    result = invoke("--config", "tiny", *sets, "--train", "--steps", "1", "--warmup", "0")
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.stderr and "MFU" in result.stderr and result.stdout == ""
    assert "decode" not in result.stderr
