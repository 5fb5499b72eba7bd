"""gptoss <-> llama.cpp's gpt-oss GGUF: hyper-parameter keys, tensor names and layouts, and what llama.cpp
computes differently. The one map the GGUF exporter (gguf_export.py) writes by.

The layout is the one llama.cpp's own converter writes for GptOssForCausalLM (convert_hf_to_gguf.py,
GptOssModel) and its loader reads (src/models/openai-moe.cpp). Names come from the `gguf` package's tables
(MODEL_ARCH.GPT_OSS). GGUF lists a tensor's dimensions fastest first; in numpy (and torch) order, which is
what this module produces, every matrix keeps our out x in layout:

    token_embd.weight              embedding.weight (V, H)
    output.weight                  unembedding.weight, or the embedding when tied (llama.cpp requires it)
    output_norm.weight             norm.scale
    blk.i.attn_norm.weight         block.i.attn.norm.scale
    blk.i.attn_{q,k,v}.weight      block.i.attn.qkv.weight rows [q: NH*D | k: NKV*D | v: NKV*D]
    blk.i.attn_{q,k,v}.bias        block.i.attn.qkv.bias split alike, zeros without attention_bias
    blk.i.attn_output.weight/.bias block.i.attn.out (the bias zeros without attention_bias)
    blk.i.attn_sinks.weight        block.i.attn.sinks (NH,)
    blk.i.post_attention_norm.weight  block.i.mlp.norm.scale
    blk.i.ffn_gate_inp.weight/.bias   block.i.mlp.gate (the bias zeros without router_bias)
    blk.i.ffn_gate_exps.weight/.bias  block.i.mlp.mlp1_weight/bias even rows (E, I, H) / (E, I)
    blk.i.ffn_up_exps.weight/.bias    block.i.mlp.mlp1_weight/bias odd rows
    blk.i.ffn_down_exps.weight/.bias  block.i.mlp.mlp2_weight (E, H, I) / mlp2_bias (E, H)

Zero biases compute exactly what no bias does; they are written because llama.cpp's gpt-oss loader (and
older releases of it) require every one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import torch

from ..errors import GptossError
from ..model.config import ModelConfig

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT_OSS]  # "gpt-oss"
LLAMA_SWIGLU = (1.702, 7.0)  # alpha and limit, constants in llama.cpp's build_moe_ffn (LLM_FFN_SWIGLU_OAI_MOE)
LLAMA_YARN_BETAS = (32.0, 1.0)  # beta_fast, beta_slow: llama.cpp's defaults; its gpt-oss loader reads no others

# What a tensor is stored as: the export's dtype; always fp32 (vectors: norms, biases, sinks; and the router,
# the precision policy of devices.py); the export's dtype or MXFP4 (expert matrices).
MATRIX, F32, EXPERTS = "matrix", "f32", "experts"


@dataclass(frozen=True)
class GgufTensor:
    name: str
    kind: str  # MATRIX | F32 | EXPERTS
    get: Callable[[], torch.Tensor]  # the values in numpy order, computed when written


def _name(kind: gguf.MODEL_TENSOR, suffix: str, layer: int | None = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=layer) + suffix


def check_llama_cpp(cfg: ModelConfig) -> list[str]:
    """Refuse a model llama.cpp would compute differently; return the warnings for what it rounds."""
    alpha, limit = LLAMA_SWIGLU
    if cfg.swiglu_limit != limit:
        raise GptossError(
            f"model.swiglu_limit is {cfg.swiglu_limit:g}, but llama.cpp's gpt-oss hard-codes {limit:g}: "
            "the GGUF would compute another model"
        )
    if cfg.rope_scaling_factor == 1:
        return []
    if (cfg.rope_ntk_beta, cfg.rope_ntk_alpha) != LLAMA_YARN_BETAS:
        raise GptossError(
            f"model.rope_ntk_beta/rope_ntk_alpha are {cfg.rope_ntk_beta:g}/{cfg.rope_ntk_alpha:g}, but llama.cpp's "
            f"gpt-oss uses YaRN's {LLAMA_YARN_BETAS[0]:g}/{LLAMA_YARN_BETAS[1]:g}: the GGUF would compute another model"
        )
    low, high = cfg.yarn_correction_range()
    if low.is_integer() and high.is_integer():
        return []
    return [
        f"llama.cpp rounds YaRN's correction range [{low:.2f}, {high:.2f}] out to whole dimensions where gpt-oss "
        "does not (as for the released gpt-oss models), so its RoPE differs slightly from gptoss's"
    ]


def write_hparams(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    """The `gpt-oss.*` keys llama.cpp reads (and Ollama's gpt-oss engine)."""
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_context_length)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_expert_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_expert_count(cfg.num_experts)
    writer.add_expert_used_count(cfg.experts_per_token)
    # llama.cpp slides on the even layers (its default pattern for gpt-oss). A model without a window gets
    # one as long as its context, which hides no key from any position it is used at.
    writer.add_sliding_window(cfg.sliding_window or cfg.max_context_length)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_scaling_orig_ctx_len(cfg.initial_context_length)
    if cfg.rope_scaling_factor != 1:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(cfg.rope_scaling_factor)
        writer.add_rope_scaling_yarn_beta_fast(cfg.rope_ntk_beta)
        writer.add_rope_scaling_yarn_beta_slow(cfg.rope_ntk_alpha)


def _layer(cfg: ModelConfig, w: dict[str, torch.Tensor], i: int) -> list[GgufTensor]:
    T = gguf.MODEL_TENSOR
    p = f"block.{i}."
    sizes = [cfg.q_dim, cfg.kv_dim, cfg.kv_dim]

    def ours(name: str, present: bool = True, size: int = 0) -> Callable[[], torch.Tensor]:
        """The checkpoint tensor, or zeros of `size` for a bias the model does not have."""
        return (lambda: w[p + name]) if present else (lambda: torch.zeros(size))

    def qkv(kind: str, part: int) -> Callable[[], torch.Tensor]:
        if kind == "bias" and not cfg.attention_bias:
            return lambda: torch.zeros(sizes[part])
        return lambda: w[p + f"attn.qkv.{kind}"].split(sizes)[part]

    def mlp1(name: str, parity: int) -> Callable[[], torch.Tensor]:
        """mlp1's rows interleave gate (even) and linear (odd) units; llama.cpp stores them apart."""
        return lambda: w[p + name][:, parity::2]

    out = [GgufTensor(_name(T.ATTN_NORM, ".weight", i), F32, ours("attn.norm.scale"))]
    for part, kind in enumerate((T.ATTN_Q, T.ATTN_K, T.ATTN_V)):
        out.append(GgufTensor(_name(kind, ".weight", i), MATRIX, qkv("weight", part)))
        out.append(GgufTensor(_name(kind, ".bias", i), F32, qkv("bias", part)))
    return out + [
        GgufTensor(_name(T.ATTN_OUT, ".weight", i), MATRIX, ours("attn.out.weight")),
        GgufTensor(_name(T.ATTN_OUT, ".bias", i), F32, ours("attn.out.bias", cfg.attention_bias, cfg.hidden_size)),
        GgufTensor(_name(T.ATTN_SINKS, ".weight", i), F32, ours("attn.sinks")),
        GgufTensor(_name(T.ATTN_POST_NORM, ".weight", i), F32, ours("mlp.norm.scale")),
        GgufTensor(_name(T.FFN_GATE_INP, ".weight", i), F32, ours("mlp.gate.weight")),
        GgufTensor(_name(T.FFN_GATE_INP, ".bias", i), F32, ours("mlp.gate.bias", cfg.router_bias, cfg.num_experts)),
        GgufTensor(_name(T.FFN_GATE_EXP, ".weight", i), EXPERTS, mlp1("mlp.mlp1_weight", 0)),
        GgufTensor(_name(T.FFN_GATE_EXP, ".bias", i), F32, mlp1("mlp.mlp1_bias", 0)),
        GgufTensor(_name(T.FFN_UP_EXP, ".weight", i), EXPERTS, mlp1("mlp.mlp1_weight", 1)),
        GgufTensor(_name(T.FFN_UP_EXP, ".bias", i), F32, mlp1("mlp.mlp1_bias", 1)),
        GgufTensor(_name(T.FFN_DOWN_EXP, ".weight", i), EXPERTS, ours("mlp.mlp2_weight")),
        GgufTensor(_name(T.FFN_DOWN_EXP, ".bias", i), F32, ours("mlp.mlp2_bias")),
    ]


def tensor_plan(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> list[GgufTensor]:
    """Every GGUF tensor of the model whose checkpoint tensors (our names, as saved) are `w`, in writing order."""
    T = gguf.MODEL_TENSOR
    unembedding = "embedding.weight" if cfg.tie_word_embeddings else "unembedding.weight"
    return [
        GgufTensor(_name(T.TOKEN_EMBD, ".weight"), MATRIX, lambda: w["embedding.weight"]),
        *(t for i in range(cfg.num_hidden_layers) for t in _layer(cfg, w, i)),
        GgufTensor(_name(T.OUTPUT_NORM, ".weight"), F32, lambda: w["norm.scale"]),
        GgufTensor(_name(T.OUTPUT, ".weight"), MATRIX, lambda: w[unembedding]),
    ]
