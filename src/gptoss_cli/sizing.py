"""What a config costs, without allocating: module tree, parameter counts, FLOPs and memory estimates.

The model is built on the meta device, so even gpt-oss-120b is described in seconds. Memory figures are
estimates (documented term by term in docs/configs.md); `gptoss train` measures the real thing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import RunConfig

GIB = 1024**3


def _category(name: str) -> str:
    if name.startswith(("embedding", "unembedding")):
        return "embeddings"
    if name.endswith("sinks"):
        return "sinks"
    if ".gate." in name:
        return "router"
    if "mlp1" in name or "mlp2" in name:
        return "experts"
    if name.endswith("scale"):
        return "norms"
    return "attention"


@dataclass
class Precision:
    name: str
    param_bytes: int  # master weights, gradients and AdamW state use this width
    act_bytes: int  # activations


def precision_widths(name: str, bf16_ok: bool) -> Precision:
    """Byte widths of the resolved train.precision (devices.resolve_precision decides `auto`)."""
    from .devices import resolve_precision

    name = resolve_precision(name, bf16_ok)
    return Precision(name, 2 if name == "bf16" else 4, 4 if name == "fp32" else 2)


def _mean_keys(seq_len: int, window: int) -> float:
    """Mean number of keys a query attends to over positions 0..T-1 (causal, optional window)."""
    if not window or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def kv_cache_bytes(m, width: int, context: int) -> int:
    """One sequence's keys and values at `context` tokens: sliding layers keep their window's worth."""
    return sum(
        2 * m.kv_dim * width * (min(m.sliding_window, context) if m.is_sliding(layer) else context)
        for layer in range(m.num_hidden_layers)
    )


def inference_memory(cfg: RunConfig, params: dict[str, int], width: int, context: int) -> dict:
    """Estimated inference memory (bytes, batch 1) at `context` tokens: the weights with MXFP4 experts
    (packed, as an imported release keeps them) and decoded to `width` bytes, the KV cache, and the
    prefill's largest transients: the activations of `context` tokens, the two (T, T) boolean attention
    masks, one expert decoded a chunk at a time (model/mxfp4.py) and the last position's fp32 logits."""
    from .model.mxfp4 import DECODE_CHUNK_BYTES, packed_bytes

    m = cfg.model
    weight_elems = m.num_experts * (2 * m.intermediate_size * m.hidden_size + m.hidden_size * m.intermediate_size)
    packed = (
        m.num_hidden_layers
        * m.num_experts
        * (packed_bytes(2 * m.intermediate_size, m.hidden_size) + packed_bytes(m.hidden_size, m.intermediate_size))
    )
    total = sum(params.values())  # the expert biases stay in the compute dtype either way
    decoded_weights = total * width
    packed_weights = (total - m.num_hidden_layers * weight_elems) * width + packed
    kv = kv_cache_bytes(m, width, context)
    k, h, i = m.experts_per_token, m.hidden_size, m.intermediate_size
    per_token = width * (4 * h + 2 * m.q_dim + 2 * m.kv_dim + k * (2 * h + 3 * i))  # hidden, qkv, attn, MoE rows
    transients = context * per_token + 2 * context * context + DECODE_CHUNK_BYTES + m.vocab_size * 4
    return {
        "context": context,
        "weights_mxfp4_experts": packed_weights,
        "weights_decoded": decoded_weights,
        "kv_cache": kv,
        "prefill_transients": transients,
        "peak_mxfp4_experts": packed_weights + kv + transients,
        "peak_decoded": decoded_weights + kv + transients,
    }


def step_activations(cfg: RunConfig, a: int) -> tuple[int, int]:
    """(activations kept for the backward, the loss's logits) of one training step in bytes, with
    activation width `a`: tensors saved per token and layer, a rough sum over the ops in attention.py and
    moe.py (with train.activation_checkpointing, the blocks' inputs and one block recomputed at a time)."""
    from .model.cross_entropy import chunk_rows

    m, t = cfg.model, cfg.train
    tokens = t.seq_len * t.batch_size
    k, h, i = m.experts_per_token, m.hidden_size, m.intermediate_size
    attn_act = 8 * h + a * (3 * (m.q_dim + 2 * m.kv_dim) + 2 * m.q_dim)
    if m.attention_backend == "eager":
        attn_act += 4 * m.num_attention_heads * _mean_keys(t.seq_len, 0) * 2  # fp32 probabilities kept
    moe_act = 8 * h + 12 * m.num_experts + a * k * (2 * h + 4 * i + i) + 4 * k * h
    per_layer = attn_act + moe_act
    if t.activation_checkpointing:  # keep block inputs, recompute one block at a time
        activations = tokens * (m.num_hidden_layers * a * h + per_layer)
    else:
        activations = tokens * m.num_hidden_layers * per_layer
    if t.fused_loss:  # one chunk of fp32 logits and its gradient in the compute dtype (cross_entropy.py);
        # the GPU's chunk, the larger one, so the figure is an upper bound on CPU too
        logits = min(tokens, chunk_rows(m.vocab_size, "cuda")) * m.vocab_size * (4 + a)
    else:  # the fp32 logits, log_softmax's output and their gradient
        logits = tokens * m.vocab_size * 4 * 3
    return int(activations), int(logits)


def lora_precision(name: str, cuda: bool) -> str:
    """train.precision of a LoRA run: `auto` is bf16 on a GPU (the frozen base needs no fp32 master copy),
    else as for full training (train/setup.py decides the same)."""
    from .devices import resolve_precision

    return "bf16" if name == "auto" and cuda else resolve_precision(name, cuda)


def lora_training(cfg: RunConfig, model, cuda: bool = False) -> dict:
    """A LoRA run (`lora.rank > 0`) on `model` (a meta-device Transformer of cfg.model, adapted in place):
    its trainable parameters and the estimated training peak in bytes. The base is frozen in the training
    dtype (norms and router fp32), its experts packed in MXFP4 or decoded; the adapters train in fp32 with
    their gradients and AdamW's two moments (16 bytes a parameter); a step's activations and logits as for
    full training, plus the adapters' own (a rank-r row per adapted projection and token) and one packed
    expert's decode chunk. Python and torch themselves (~0.5 GiB) are not counted."""
    from .devices import param_dtypes
    from .model.lora import adapter_tensors, add_adapters
    from .model.mxfp4 import DECODE_CHUNK_BYTES, packed_bytes

    m, lo = cfg.model, cfg.lora
    precision = lora_precision(cfg.train.precision, cuda)
    width = 2 if precision == "bf16" else 4
    act = 4 if precision == "fp32" else 2
    base = dict(model.named_parameters())
    dtypes = param_dtypes(base, torch_dtype(width))
    decoded = sum(p.numel() * dtypes[n].itemsize for n, p in base.items())
    experts = ("mlp1_weight", "mlp2_weight")
    expert_bytes = sum(p.numel() * dtypes[n].itemsize for n, p in base.items() if n.endswith(experts))
    packed = (
        m.num_hidden_layers
        * m.num_experts
        * (packed_bytes(2 * m.intermediate_size, m.hidden_size) + packed_bytes(m.hidden_size, m.intermediate_size))
    )
    add_adapters(model, lo.rank, lo.alpha, lo.dropout, lo.projections(), lo.layers)
    adapters = adapter_tensors(model)
    trainable = sum(t.numel() for t in adapters.values())
    by_target = {}
    for name, t in adapters.items():
        part = name.split(".")[-2].removesuffix("_lora")  # qkv, out, gate, mlp1, mlp2
        key = {"gate": "router"}.get(part, part)
        by_target[key] = by_target.get(key, 0) + t.numel()
    activations, logits = step_activations(cfg, act)
    layers = len(lo.layers) if lo.layers is not None else m.num_hidden_layers
    # Saved per token and adapted layer: the rank-r rows x A^T (q, k, v: three; an expert's: one per routed
    # assignment); with activation checkpointing one layer's at a time.
    rows = {"qkv": 3, "out": 1, "router": 1, "mlp1": m.experts_per_token, "mlp2": m.experts_per_token}
    per_token = lo.rank * sum(rows[p] for p in lo.projections()) * act
    kept = 1 if cfg.train.activation_checkpointing else layers
    activations += cfg.train.seq_len * cfg.train.batch_size * kept * per_token
    fixed = 16 * trainable + activations + logits
    chunk = min(DECODE_CHUNK_BYTES, 2 * m.intermediate_size * m.hidden_size * act)  # at most one expert
    memory = {
        "base_mxfp4_experts": decoded - expert_bytes + packed,
        "base_decoded": decoded,
        "adapters": 4 * trainable,
        "gradients": 4 * trainable,
        "optimizer": 8 * trainable,
        "activations": activations,
        "logits": logits,
        "decode_chunk": chunk,
    }
    memory["peak_mxfp4_experts"] = memory["base_mxfp4_experts"] + fixed + chunk
    memory["peak_decoded"] = decoded + fixed
    return {
        "rank": lo.rank,
        "alpha": lo.alpha,
        "targets": list(lo.projections()),
        "layers": layers,
        "precision": precision,
        "trainable_params": trainable,
        "trainable_by_target": by_target,
        "memory_bytes": memory,
    }


def torch_dtype(width: int):
    import torch

    return torch.bfloat16 if width == 2 else torch.float32


def describe(cfg: RunConfig, cuda: bool = False, context: int | None = None) -> dict:
    """Everything `gptoss build` shows, as one JSON-ready dict. `context`: the inference estimate's
    context (default: train.seq_len, within max_context_length)."""
    import torch

    from .model import Transformer

    m = cfg.model
    with torch.device("meta"):
        model = Transformer(m)
    breakdown: dict[str, int] = {}
    for name, p in model.named_parameters():  # a tied unembedding is listed (and counted) once
        breakdown[_category(name)] = breakdown.get(_category(name), 0) + p.numel()
    total = sum(breakdown.values())
    inactive = breakdown.get("experts", 0) * (m.num_experts - m.experts_per_token) // m.num_experts
    active = total - inactive

    t = cfg.train
    seq, batch = t.seq_len, t.batch_size
    # Forward FLOPs per token: 2 per active weight in a matmul (the input embedding is a lookup), plus
    # attention scores and weighted values: 2 * 2 * NH * D * (mean keys visible).
    lookup = m.vocab_size * m.hidden_size if not m.tie_word_embeddings else 0
    matmul_params = active - lookup - breakdown.get("norms", 0) - breakdown.get("sinks", 0)
    attn_flops = sum(
        4 * m.num_attention_heads * m.head_dim * _mean_keys(seq, m.sliding_window if m.is_sliding(i) else 0)
        for i in range(m.num_hidden_layers)
    )
    fwd_flops = 2 * matmul_params + attn_flops
    prec = precision_widths(t.precision, cuda)
    activations, logits = step_activations(cfg, prec.act_bytes)
    weights = total * prec.param_bytes
    train_mem = {
        "weights": weights,
        "gradients": total * prec.param_bytes,
        "optimizer": 2 * total * prec.param_bytes,  # AdamW exp_avg + exp_avg_sq
        "activations": int(activations),
        "logits": logits,
    }
    train_mem["total"] = sum(train_mem.values())
    infer_bytes = 2 if cuda or prec.name != "fp32" else 4
    kv = kv_cache_bytes(m, infer_bytes, m.max_context_length)
    infer_mem = {"weights": total * infer_bytes, "kv_cache_per_sequence": kv, "logits": m.vocab_size * 4}
    infer_mem["total_batch1"] = sum(infer_mem.values())
    context = min(context or t.seq_len, m.max_context_length)
    lora = {"lora": lora_training(cfg, model, cuda)} if cfg.lora.enabled else {}
    return lora | {
        "config": cfg.name,
        "total_params": total,
        "active_params": active,
        "params_by_part": breakdown,
        "layer_types": ["sliding" if m.is_sliding(n) else "full" for n in range(m.num_hidden_layers)],
        "train_flops_per_token": int(3 * fwd_flops),
        "forward_flops_per_token": int(fwd_flops),
        "precision": prec.name,
        "batch_size": batch,
        "seq_len": seq,
        "train_memory_bytes": train_mem,
        "inference_memory_bytes": infer_mem,
        "inference_dtype": "bf16" if infer_bytes == 2 else "fp32",
        "inference_at_context": inference_memory(cfg, breakdown, infer_bytes, context),
        "module_tree": repr(model),
    }
