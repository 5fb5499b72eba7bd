"""The training losses (train/loss.py and the MoE statistics it adds): the objective with `train.fused_loss`
on and off in float64, and the load-balancing loss (non-zero and differentiable, one for a uniform router,
and alone enough to push a collapsed router toward balance).
"""

from __future__ import annotations

import pytest
import torch

from gptoss_cli.config import TrainConfig
from gptoss_cli.model import Transformer
from gptoss_cli.model.moe import MLPBlock
from gptoss_cli.train.loss import objective
from tests.conftest import assert_close
from tests.unit.model.references import small_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny shapes on a shared machine

FP64_RTOL = 1e-12  # float64 on both sides: ~4500 eps, a check of the algorithm, not of the rounding


@pytest.mark.parametrize("tied", [True, False])
def test_objective_fused_equals_unfused(tied):
    """The whole training objective, both ways: loss, accuracy and every parameter's gradient."""
    cfg = small_config(
        tie_word_embeddings=tied, attention_bias=False, router_bias=False, attention_backend="sdpa", moe_backend="auto"
    )
    ids = torch.randint(0, 64, (3, 13), generator=torch.Generator().manual_seed(2))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    results = {}
    for fused in (True, False):
        model = Transformer(cfg).double()
        model.init_weights(torch.Generator().manual_seed(0))
        got = objective(model, inputs, targets, TrainConfig(fused_loss=fused, z_loss_coef=1e-3))
        got.loss.backward()
        assert (got.out.logits is None) == fused
        results[fused] = got, {n: p.grad for n, p in model.named_parameters()}
    (fused, fused_grads), (plain, plain_grads) = results[True], results[False]
    assert_close(fused.loss, plain.loss, rtol=FP64_RTOL)
    assert_close(fused.lm, plain.lm, rtol=FP64_RTOL)
    assert fused.accuracy.item() == pytest.approx(plain.accuracy.item(), abs=1e-12)
    for name, grad in plain_grads.items():
        assert_close(fused_grads[name], grad, rtol=FP64_RTOL, what=name)


def _mlp_block(experts_per_token: int = 2, router_bias: bool = False) -> MLPBlock:
    cfg = small_config(
        num_hidden_layers=1,
        experts_per_token=experts_per_token,
        router_bias=router_bias,
        attention_bias=False,
        tie_word_embeddings=True,
        sliding_window=128,
        max_context_length=4096,
        attention_backend="sdpa",
    )
    block = MLPBlock(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif name != "norm.scale":
                p.normal_(0.0, 0.1, generator=g)
    return block


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_mlp_block_aux_loss_is_nonzero_and_differentiable():
    block = _mlp_block()
    out, stats = block(_tokens())
    assert out.shape == (2, 32, 32)
    assert stats.aux_loss.ndim == 0 and torch.isfinite(stats.aux_loss) and stats.aux_loss.item() > 0.5
    assert stats.counts.sum().item() == 2 * 32 * 2
    stats.aux_loss.backward()
    assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0


def test_aux_loss_is_one_for_uniform_router_probabilities():
    block = _mlp_block()
    with torch.no_grad():
        block.gate.weight.zero_()  # every router probability is 1 / num_experts
    _, stats = block(_tokens())
    assert stats.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_aux_loss_alone_pushes_a_collapsed_router_toward_balance():
    block = _mlp_block(experts_per_token=1, router_bias=True)
    with torch.no_grad():
        block.gate.bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))  # every token goes to expert 0
    x = _tokens()
    opt = torch.optim.SGD(block.gate.parameters(), lr=2.0)

    def max_share() -> float:
        with torch.no_grad():
            counts = block(x)[1].counts
        return counts.max().item() / counts.sum().item()

    assert max_share() == 1.0
    first = None
    for _ in range(8):
        _, stats = block(x)
        first = stats.aux_loss.item() if first is None else first
        opt.zero_grad()
        stats.aux_loss.backward()
        opt.step()
    assert max_share() <= 0.5
    assert block(x)[1].aux_loss.item() < first
