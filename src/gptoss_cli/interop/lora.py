"""A LoRA run's adapters for other tools: in PEFT's format, or merged into its base weights.

PEFT (`peft.PeftModel.from_pretrained(model, DIR)`, model = the base exported for transformers) reads

    DIR/adapter_config.json         LoraConfig: r, lora_alpha, target_modules, target_parameters, ...
    DIR/adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r, in) / lora_B.weight (out, r)

Our adapters map onto transformers' `GptOssForCausalLM` modules as the weights do (names.py):

    block.N.attn.qkv       -> model.layers.N.self_attn.{q,k,v}_proj    one (A, B) pair each: our lora_A stacks
                                                                      the three A's, lora_B's rows split q|k|v
    block.N.attn.out       -> model.layers.N.self_attn.o_proj
    block.N.mlp.gate       -> model.layers.N.mlp.router.weight         a parameter target (PEFT's ParamWrapper)
    block.N.mlp.mlp1_lora  -> model.layers.N.mlp.experts.gate_up_proj  parameter targets on the 3-D expert
    block.N.mlp.mlp2_lora  -> model.layers.N.mlp.experts.down_proj     weights, one pair per expert

For a 3-D parameter (E, in, out), as transformers stores the experts, PEFT's ParamWrapper holds all the
experts' pairs in two matrices: lora_A (E r, in) with expert e's A in rows e r .. e r + r - 1, and lora_B
(out, r E) with expert e's column j at j E + e (peft/tuners/lora/layer.py `ParamWrapper.get_delta_weight`).
Two parameters of one module nest: the first one PEFT wraps (gate_up_proj, first in the module's parameter
order) becomes `experts.base_layer`, the second `experts`. PEFT applies `layers_to_transform` to modules only,
so a subset of layers is written as full module and parameter names. PEFT cannot drop out the input of a
parameter target, so with router or expert targets the config says lora_dropout 0 (dropout only acts while
training anyway).

Merging computes W + (alpha / r) B A per matrix in fp32. A packed MXFP4 base's merged experts are packed
again (OCP MX rounding, model/mxfp4.py) unless decoded: the error is reported against the merged weights
and, what matters for a fine-tune, against the update itself (how much of B A the rounding lost).
"""

from __future__ import annotations

import torch

from ..config import LoraConfig
from ..model import mxfp4
from ..model.config import ModelConfig
from ..model.lora import delta_experts, delta_linear
from ..run.checkpoint import packed_weights, read_adapters, read_weights, tensor_names
from .names import expected_shapes

PREFIX = "base_model.model."
EXPERT_PARAMS = {"mlp1": "gate_up_proj", "mlp2": "down_proj"}  # in the module's parameter order


def _layers(cfg: ModelConfig, lora: LoraConfig) -> list[int]:
    return sorted(lora.layers) if lora.layers is not None else list(range(cfg.num_hidden_layers))


def peft_tensors(cfg: ModelConfig, lora: LoraConfig, adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our adapter tensors -> adapter_model.safetensors' names and layouts (contiguous, as stored)."""
    targets, r = lora.projections(), lora.rank
    out: dict[str, torch.Tensor] = {}

    def pair(module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        out[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
        out[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()

    for i in _layers(cfg, lora):
        ours, hf = f"block.{i}.", f"model.layers.{i}."
        if "qkv" in targets:
            a, b = adapters[ours + "attn.qkv.lora_A"], adapters[ours + "attn.qkv.lora_B"]
            for j, (part, rows) in enumerate(zip("qkv", b.split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim]), strict=True)):
                pair(f"{hf}self_attn.{part}_proj", a[j * r : (j + 1) * r], rows)
        if "out" in targets:
            pair(f"{hf}self_attn.o_proj", adapters[ours + "attn.out.lora_A"], adapters[ours + "attn.out.lora_B"])
        if "router" in targets:
            pair(f"{hf}mlp.router", adapters[ours + "mlp.gate.lora_A"], adapters[ours + "mlp.gate.lora_B"])
        experts = [p for p in EXPERT_PARAMS if p in targets]
        for k, name in enumerate(experts):
            a, b = adapters[f"{ours}mlp.{name}_lora.lora_A"], adapters[f"{ours}mlp.{name}_lora.lora_B"]
            e, rows = b.shape[0], b.shape[1]
            # (E, r, in) -> (E r, in); (E, out, r) -> (out, r, E) -> (out, r E): column j E + e
            nested = ".base_layer" if len(experts) == 2 and k == 0 else ""
            pair(f"{hf}mlp.experts{nested}", a.reshape(e * r, -1), b.permute(1, 2, 0).reshape(rows, r * e))
    return out


def peft_config(cfg: ModelConfig, lora: LoraConfig, base: str | None = None) -> dict:
    """adapter_config.json for the adapters peft_tensors writes (PEFT fills the keys left out)."""
    targets = lora.projections()
    modules = (["q_proj", "k_proj", "v_proj"] if "qkv" in targets else []) + (["o_proj"] if "out" in targets else [])
    params = (["mlp.router.weight"] if "router" in targets else []) + [
        f"mlp.experts.{p}" for t, p in EXPERT_PARAMS.items() if t in targets
    ]
    if lora.layers is not None:  # PEFT's layers_to_transform leaves parameter targets alone: full names
        layers = _layers(cfg, lora)
        modules = [f"model.layers.{i}.self_attn.{m}" for i in layers for m in modules]
        params = [f"model.layers.{i}.{p}" for i in layers for p in params]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0 if params else lora.dropout,
        "target_modules": modules or None,
        "target_parameters": params or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }


def run_weights(opened, repack: bool, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], bool, dict[str, dict]]:
    """A run's weights as the exporters read them (our names; packed experts as .blocks / .scales): for a LoRA
    run (`opened`: run/open.py's OpenRun) its base's, with the adapters merged (`merge`). Returns (weights,
    whether the base's experts are packed, {expert matrix packed again: its error})."""
    cfg = opened.config
    packed = bool(packed_weights(tensor_names(opened.base_weights)))
    weights = read_weights(opened.base_weights, expected_shapes(cfg.model, packed))
    if opened.base is None:
        return weights, packed, {}
    weights, errors = merge(cfg.model, cfg.lora, weights, read_adapters(opened.checkpoint), packed and repack, dtype)
    return weights, packed, errors


def merge(
    cfg: ModelConfig,
    lora: LoraConfig,
    weights: dict[str, torch.Tensor],
    adapters: dict[str, torch.Tensor],
    repack: bool,
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The base `weights` (our names, as saved: packed experts as .blocks/.scales) with every adapter's update
    added, in place. Dense matrices come out in fp32 (the export casts them); packed experts are packed again
    when `repack`, else decoded in `dtype`. Returns (weights, {expert matrix: its error}) for repacked ones."""
    s = lora.alpha / lora.rank
    errors: dict[str, dict] = {}
    groups = {"qkv": (cfg.q_dim, cfg.kv_dim, cfg.kv_dim), "out": (), "gate": ()}
    for name in [n for n in adapters if n.endswith(".lora_A")]:
        stem = name.removesuffix(".lora_A")
        a, b = adapters[name], adapters[stem + ".lora_B"]
        if stem.endswith("_lora"):  # block.N.mlp.mlp1_lora -> block.N.mlp.mlp1_weight
            target = stem.removesuffix("_lora") + "_weight"
            if target + ".blocks" in weights:
                errors[target] = _merge_packed(weights, target, a, b, s, repack, dtype)
            else:
                weights[target] = weights[target].float() + delta_experts(a, b, s)
        else:
            part = stem.rsplit(".", 1)[1]
            target = stem + ".weight"
            weights[target] = weights[target].float() + delta_linear(a, b, groups[part] or (b.shape[0],), s)
    return weights, {k: v for k, v in errors.items() if v}


def _merge_packed(weights, target, a, b, s, repack: bool, dtype: torch.dtype) -> dict:
    """One packed expert matrix merged expert by expert: decoded, plus its update, packed again (with the
    error) or kept decoded."""
    blocks, scales = weights.pop(target + ".blocks"), weights.pop(target + ".scales")
    out_b, out_s, dense = [], [], []
    err2 = merged2 = update2 = 0.0
    worst = 0.0
    for e in range(blocks.shape[0]):
        update = delta_experts(a[e], b[e], s)  # (out, in) fp32
        merged = mxfp4.dequantize(blocks[e], scales[e], torch.float32) + update
        if not repack:
            dense.append(merged.to(dtype))
            continue
        qb, qs = mxfp4.quantize(merged)
        diff = (mxfp4.dequantize(qb, qs, torch.float32) - merged).double()
        err2 += diff.pow(2).sum().item()
        merged2 += merged.double().pow(2).sum().item()
        update2 += update.double().pow(2).sum().item()
        worst = max(worst, diff.abs().max().item())
        out_b.append(qb)
        out_s.append(qs)
    if not repack:
        weights[target] = torch.stack(dense)
        return {}
    weights[target + ".blocks"], weights[target + ".scales"] = torch.stack(out_b), torch.stack(out_s)
    return {
        "relative_rms": (err2 / merged2) ** 0.5 if merged2 else 0.0,
        "max_abs": worst,
        # ||Q(W + dW) - (W + dW)|| / ||dW||: near or above 1, the rounding undoes the fine-tune's update
        "update_relative_rms": (err2 / update2) ** 0.5 if update2 else 0.0,
    }
