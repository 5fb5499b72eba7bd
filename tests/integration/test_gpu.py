"""CUDA correctness checks as tests (`gpu` marker: skipped, with the reason, where torch sees no CUDA device).

The checks themselves live once, in benchmarks/gpu_check.py, which also times them and runs the benchmarks;
here each is run and its verdict asserted: the grouped-matmul MoE (bf16) as close to an fp32 loop as the bf16
loop is, its forward and backward free of host syncs, the SDPA sink and banded sliding-window attention
against eager in fp32 and bf16 (outputs and all four gradients), the fused unembedding + cross-entropy
against F.cross_entropy in bf16. The CUDA-graph decode step (`infer --compile`) is checked against eager
decoding on a tiny random model: the same tokens and the same logits.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_close, randomise, rtol_for, tiny_model_config

pytestmark = pytest.mark.gpu

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """benchmarks/gpu_check.py as a module (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grouped_mm_moe_is_as_accurate_as_the_loop(gpu_check):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch lacks _grouped_mm")
    result = gpu_check.check_moe(tokens=2048)
    assert result["grouped_as_accurate_as_loop"], result


def test_grouped_mm_moe_forward_and_backward_never_sync_the_host(gpu_check):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch lacks _grouped_mm")
    # set_sync_debug_mode("error") raises at the first host sync, so returning at all is the verdict
    assert gpu_check.check_no_host_sync(tokens=2048) == {"no_host_sync_in_grouped_fwd_bwd": True}


def test_sink_and_banded_attention_match_eager_in_fp32_and_bf16(gpu_check):
    result = gpu_check.check_attention()
    assert len(result) == 6  # sdpa at windows 0 and 128, banded at 128; fp32 and bf16
    failed = {name: errs for name, errs in result.items() if not errs["pass"]}
    assert not failed, failed


def test_fused_loss_matches_cross_entropy_in_bf16(gpu_check):
    result = gpu_check.check_fused_loss()
    assert result["pass"], result


def test_cuda_graph_decode_matches_eager_decoding():
    from gptoss_cli.config import InferConfig
    from gptoss_cli.infer.generate import generate_tokens
    from gptoss_cli.model import Transformer

    cfg = tiny_model_config("released", attention_backend="sdpa", max_context_length=128)
    model = Transformer(cfg)
    randomise(model, std=0.15, bias_std=0.15, mlp1_std=0.15)  # spread logits: greedy is far from ties
    model = model.cuda().eval()
    params = InferConfig(max_new_tokens=3 * cfg.sliding_window, temperature=0.0)  # the ring wraps
    prompts = [torch.randint(0, 255, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 11)]
    runs = {}
    for compiled in (False, True, True):  # the second compiled run reuses the captured graph
        steps: list[torch.Tensor] = []
        ids, reasons, _ = generate_tokens(
            model,
            prompts,
            params,
            pad_id=255,
            eos_id=None,
            on_logits=lambda x, steps=steps: steps.append(x.float().clone()),
            compile_decode=compiled,
        )
        runs.setdefault(compiled, []).append((ids, reasons, torch.stack(steps, 1)))
    ((eager_ids, eager_reasons, eager_logits),) = runs[False]
    for ids, reasons, logits in runs[True]:
        assert ids == eager_ids and reasons == eager_reasons
        # fp32 logits of 4 layers (attention 3, MoE 4 reductions over H = 64 each) plus the unembedding
        assert_close(logits, eager_logits, rtol=rtol_for(torch.float32, 64, 4 * 7 + 1))
