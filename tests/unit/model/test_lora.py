"""LoRA adapters (model/lora.py) against an independent reference: the same model with every adapted weight
written out as W + (alpha / r) B A, built from the adapters' tensors with plain matrix products and run
through torch.func.functional_call with plain autograd. The adapters' gradients, the loss and the logits
must be that model's, for dense and for packed MXFP4 experts (whose reference is the decoded weight), on
every MoE path an adapted model runs (the sorted loop, grouped_mm, the per-token decode). With B at zero the
adapted model is the base model; merged weights compute what the adapters compute.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from gptoss_cli.model import Transformer
from gptoss_cli.model.lora import (
    ExpertsLora,
    LoraLinear,
    adapter_modules,
    adapter_tensors,
    add_adapters,
    delta_experts,
    init_adapters,
)
from gptoss_cli.model.mxfp4 import PackedExperts, dequantize, pack_experts, quantize
from tests.conftest import assert_close, max_diff, randomise, rtol_for, tiny_model_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ALL = ("qkv", "out", "router", "mlp1", "mlp2")
RANK, ALPHA = 4, 6.0
# Float64 on both sides, except the router, which computes in fp32 whatever the model's dtype (model/moe.py):
# its logits over H = 64 features, the two sides summing in different orders, bound what follows them.
FP64_RTOL = rtol_for(torch.float32, 64, 2)


# grouped_mm computes in fp32 (torch._grouped_mm has no float64): a whole 4-layer model's budget, twice for
# the backward (tests/conftest.py's rule).
FP32_MODEL_RTOL = rtol_for(torch.float32, 64, 2 * (2 * 7 + 1))


def base_model(packed: bool, seed: int = 0, dtype=torch.float64, **overrides) -> Transformer:
    model = Transformer(tiny_model_config("released", **overrides))
    randomise(model, seed, std=0.1, bias_std=0.1, mlp1_std=0.3)
    if packed:
        pack_experts(model)  # rounds the experts to MXFP4; the reference decodes exactly these
    return model.to(dtype)


def adapted(model: Transformer, projections=ALL, layers=None, seed: int = 1) -> Transformer:
    """Adapters on `model` with A drawn by init_adapters and B random (a trained adapter), in the model's
    dtype."""
    dtype = model.embedding.weight.dtype
    add_adapters(model, RANK, ALPHA, 0.0, projections, layers)
    init_adapters(model, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, module in adapter_modules(model):
            module.lora_B.copy_(0.2 * torch.randn(module.lora_B.shape, generator=g))
    return model.to(dtype)


def written_out(model: Transformer, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{base weight name: W + s B A} from the adapters in `tensors` (A and B by name, leaves that may require
    grad), each product written per part and per expert, decoded where the base is packed."""
    cfg, s = model.config, ALPHA / RANK
    out = {}
    for i, block in enumerate(model.block):
        for attr, parent, prefix in _linears(block):
            layer = getattr(parent, attr)
            if not isinstance(layer, LoraLinear):
                continue
            a, b = tensors[f"block.{i}.{prefix}.{attr}.lora_A"], tensors[f"block.{i}.{prefix}.{attr}.lora_B"]
            if attr == "qkv":  # q, k and v each with their own r rows of A
                rows = (cfg.q_dim, cfg.kv_dim, cfg.kv_dim)
                parts = [bp @ a[j * RANK : (j + 1) * RANK] for j, bp in enumerate(b.split(rows))]
                update = torch.cat(parts)
            else:
                update = b @ a
            out[f"block.{i}.{prefix}.{attr}.weight"] = layer.weight.detach() + s * update
        for name in ("mlp1", "mlp2"):
            if getattr(block.mlp, f"{name}_lora") is None:
                continue
            weight = getattr(block.mlp, f"{name}_weight")
            dense = dequantize(weight.blocks, weight.scales, a.dtype) if isinstance(weight, PackedExperts) else weight
            a, b = tensors[f"block.{i}.mlp.{name}_lora.lora_A"], tensors[f"block.{i}.mlp.{name}_lora.lora_B"]
            update = torch.stack([b[e] @ a[e] for e in range(a.shape[0])])  # (E, out, in), expert by expert
            out[f"block.{i}.mlp.{name}_weight"] = dense.detach() + s * update
    return out


def _linears(block):
    """(attribute, module, name prefix) of a block's three linear layers that may carry adapters."""
    return (("qkv", block.attn, "attn"), ("out", block.attn, "attn"), ("gate", block.mlp, "mlp"))


def reference_model(model: Transformer) -> Transformer:
    """A plain model holding the adapted model's base weights (packed experts decoded): the reference runs it
    with the written-out weights swapped in."""
    dtype = model.embedding.weight.dtype
    plain = Transformer(model.config).to(dtype)
    sd = {}
    for name, t in model.state_dict().items():
        if name.endswith(".blocks"):
            base = name.removesuffix(".blocks")
            sd[base] = dequantize(t, model.state_dict()[base + ".scales"], dtype)
        elif not name.endswith((".scales", ".lora_A", ".lora_B")):
            sd[name] = t
    plain.load_state_dict(sd)
    return plain


def _batch(seed: int = 3, b: int = 2, t: int = 20):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (b, t), generator=g)
    return tokens, torch.randint(0, 256, (b, t), generator=g)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_adapter_gradients_equal_a_dense_model_with_the_update_written_out(packed, backend):
    if backend == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch lacks _grouped_mm")
    dtype, rtol = (torch.float64, FP64_RTOL) if backend == "loop" else (torch.float32, FP32_MODEL_RTOL)
    model = adapted(base_model(packed, dtype=dtype, moe_backend=backend))
    tokens, targets = _batch()
    out = model(tokens, targets=targets)
    (out.lm_loss + 0.1 * out.aux_loss).backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trained) == set(adapter_tensors(model)) and len(trained) == 2 * len(ALL) * 4

    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in trained.items()}
    plain = reference_model(model)
    ref = functional_call(plain, written_out(model, leaves), (tokens,), {"targets": targets})
    (ref.lm_loss + 0.1 * ref.aux_loss).backward()
    assert_close(out.lm_loss, ref.lm_loss, rtol=rtol, what="loss")
    for name, p in trained.items():
        assert leaves[name].grad.abs().max() > 0, name  # every adapter takes part
        assert_close(p.grad, leaves[name].grad, rtol=rtol, what=name)


def test_the_gradients_hold_under_activation_checkpointing_and_dropout_off_in_eval():
    from gptoss_cli.transforms import activation_checkpointing

    grads = []
    for recompute in (False, True):
        model = adapted(base_model(True))
        if recompute:
            activation_checkpointing()(model)
        tokens, targets = _batch()
        model(tokens, targets=targets).lm_loss.backward()
        grads.append({n: p.grad for n, p in adapter_tensors(model).items()})
    for name, g in grads[0].items():
        assert_close(grads[1][name], g, rtol=FP64_RTOL, what=name)


def test_only_the_chosen_projections_and_layers_get_adapters():
    model = base_model(False)
    names = add_adapters(model, RANK, ALPHA, 0.0, ["qkv", "mlp2"], layers=[1, 3])
    assert names == [
        "block.1.attn.qkv.weight",
        "block.1.mlp.mlp2_weight",
        "block.3.attn.qkv.weight",
        "block.3.mlp.mlp2_weight",
    ]
    shapes = {n: tuple(t.shape) for n, t in adapter_tensors(model).items()}
    cfg = model.config
    assert shapes["block.1.attn.qkv.lora_A"] == (3 * RANK, cfg.hidden_size)
    assert shapes["block.1.attn.qkv.lora_B"] == (cfg.q_dim + 2 * cfg.kv_dim, RANK)
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    assert shapes["block.3.mlp.mlp2_lora.lora_A"] == (e, RANK, i)
    assert shapes["block.3.mlp.mlp2_lora.lora_B"] == (e, h, RANK)
    assert len(shapes) == 8
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in shapes)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        add_adapters(base_model(False), RANK, ALPHA, 0.0, ["mlp3"])


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_zero_initialised_adapters_compute_the_base_model(packed):
    base = base_model(packed)
    tokens, _ = _batch()
    with torch.no_grad():
        ref = base(tokens).logits
        add_adapters(base, RANK, ALPHA, 0.0, ALL)
        init_adapters(base, torch.Generator().manual_seed(0))
        got = base.double()(tokens).logits
    assert all(m.lora_A.abs().max() > 0 and m.lora_B.abs().max() == 0 for _, m in adapter_modules(base))
    assert torch.equal(got, ref)  # W x + (x A^T) 0 is W x exactly: step 0 is the base model bit for bit


def test_init_is_seeded_and_kaiming_uniform():
    draws = []
    for _ in range(2):
        model = base_model(False)
        add_adapters(model, RANK, ALPHA, 0.0, ALL)
        init_adapters(model, torch.Generator().manual_seed(7))
        draws.append(adapter_tensors(model))
    for name, t in draws[0].items():
        assert torch.equal(t, draws[1][name]), name
        if name.endswith("lora_A"):
            bound = t.shape[-1] ** -0.5
            assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_decoding_paths_equal_the_sorted_path(packed):
    """Without gradients a few tokens run each token's experts directly (the per-token path), a compiled
    step gathers merged experts (`decode`) or all of them (`dense`): each equals the sorted loop."""
    from gptoss_cli.model.moe import LoraExperts, _experts_per_token

    model = adapted(base_model(packed))
    mlp = model.block[0].mlp
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        ref, _ = mlp(x[None])  # 3 tokens x 2 experts > k: the sorted path
        w1, w2 = (LoraExperts(getattr(mlp, f"mlp{j}_weight"), getattr(mlp, f"mlp{j}_lora"), x.dtype) for j in (1, 2))
        tokens = mlp.norm(x)
        t32 = tokens.float()  # the router computes in fp32, as MLPBlock does
        logits = torch.nn.functional.linear(t32, mlp.gate.weight.float(), mlp.gate.bias.float()) + mlp.gate.delta(t32)
        vals, idx = torch.topk(logits, 2)
        weights = torch.softmax(vals, -1)
        per_token = _experts_per_token(tokens, idx, weights, w1, mlp.mlp1_bias, w2, mlp.mlp2_bias, 7.0)
        for e in range(4):
            dense = (mlp.mlp1_weight if not packed else mlp.mlp1_weight.dense(torch.float64))[e]
            merged = dense + delta_experts(mlp.mlp1_lora.lora_A[e], mlp.mlp1_lora.lora_B[e], ALPHA / RANK)
            assert_close(w1.decode(e, torch.float64), merged, rtol=FP64_RTOL)
            assert_close(w1.dense(torch.float64)[e], merged, rtol=FP64_RTOL)
    assert_close(x + per_token, ref[0], rtol=FP64_RTOL)


def test_merged_weights_compute_what_the_adapters_compute():
    model = adapted(base_model(False))
    plain = reference_model(model)
    with torch.no_grad():
        for i, block in enumerate(model.block):
            for attr, parent, prefix in _linears(block):
                plain.get_parameter(f"block.{i}.{prefix}.{attr}.weight").copy_(getattr(parent, attr).merged_weight())
            for name in ("mlp1", "mlp2"):
                lora = getattr(block.mlp, f"{name}_lora")
                update = delta_experts(lora.lora_A, lora.lora_B, lora.scaling)
                plain.get_parameter(f"block.{i}.mlp.{name}_weight").add_(update)
        tokens, _ = _batch()
        got, ref = model(tokens).logits, plain(tokens).logits
    assert max_diff(ref, reference_model(model)(tokens).logits) > 1e-3  # the adapters change the model
    assert_close(got, ref, rtol=FP64_RTOL)


def test_packed_linear_backward_keeps_no_decoded_expert():
    """The packed base's backward decodes again: no tensor of an expert's size is saved for it."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 96, 64, generator=g)
    packed = PackedExperts(*quantize(weight))
    dense = packed.dense(torch.float32)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    bias = torch.randn(96, generator=g, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = packed.linear(1, x, bias)
    up = torch.randn(y.shape, generator=g)
    (y * up).sum().backward()
    assert all(n < 96 * 64 for n in saved)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = bias.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, dense[1], b_ref)
    (y_ref * up).sum().backward()
    assert_close(y, y_ref, rtol=rtol_for(torch.float32, 64))
    assert_close(x.grad, x_ref.grad, rtol=rtol_for(torch.float32, 96))
    assert_close(bias.grad, b_ref.grad, rtol=rtol_for(torch.float32, 5))


def test_experts_lora_shapes_follow_the_weight():
    lora = ExpertsLora(3, 10, 6, 2, 4.0, 0.0)
    assert lora.lora_A.shape == (3, 2, 6) and lora.lora_B.shape == (3, 10, 2) and lora.scaling == 2.0


def test_bf16_rows_padded_per_expert_on_cpu_change_nothing(monkeypatch):
    """On CPU in bf16 `loop` pads each expert's rows (moe.ROW_BUCKET): outputs and adapter gradients are those
    of the unpadded loop."""
    from gptoss_cli.model import moe

    runs = []
    for bucket in (moe.ROW_BUCKET, 1):
        monkeypatch.setattr(moe, "ROW_BUCKET", bucket)
        model = adapted(base_model(True, dtype=torch.bfloat16))
        tokens, targets = _batch(t=24)
        out = model(tokens, targets=targets)
        out.lm_loss.backward()
        runs.append((out.lm_loss.detach(), {n: p.grad.float() for n, p in adapter_tensors(model).items()}))
    (loss, grads), (ref_loss, ref_grads) = runs
    rtol = rtol_for(torch.bfloat16, 64, 2 * (2 * 7 + 1))  # bf16 throughout: a 4-layer model and its backward
    assert_close(loss, ref_loss, rtol=rtol)
    for name, g in ref_grads.items():
        assert_close(grads[name], g, rtol=rtol, what=name)
