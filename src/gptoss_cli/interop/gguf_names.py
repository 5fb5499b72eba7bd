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

MXFP4 experts (a packed run's `.blocks` / `.scales`, model/mxfp4.py) are stored as ggml's block_mxfp4:
per 32 values of a row one E8M0 scale byte, then 16 bytes whose low nibbles are values 0-15 and high
nibbles values 16-31. The codes and scales are the same numbers (ggml doubles the e2m1 table and halves
the scale); only the nibbles move (`ggml_mxfp4`), so the experts are written byte for byte.

Zero biases compute exactly what no bias does; they are written because llama.cpp's gpt-oss loader (and
older releases of it) require every one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import torch

from ..errors import GptossError
from ..model import mxfp4
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
    get: Callable[[], torch.Tensor]  # the values in numpy order, computed when written (experts: dense only)
    packed: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None  # MXFP4 experts: (blocks, scales)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape, in numpy order (views: nothing is converted)."""
        if self.packed is None:
            return tuple(self.get().shape)
        _, scales = self.packed()
        return (*scales.shape[:-1], scales.shape[-1] * mxfp4.BLOCK)


def ggml_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """openai's MXFP4 (blocks (..., G, 16), value 2j in byte j's low nibble, 2j+1 in its high; scales (..., G))
    -> ggml's block_mxfp4 bytes (..., G * 17): the scale, then value j in byte j's low nibble, j+16 in its high."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # (..., G, 32) in value order
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat([scales.unsqueeze(-1), qs], dim=-1).flatten(-2).contiguous()


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

    def experts(name: str, kind: gguf.MODEL_TENSOR, rows: slice) -> GgufTensor:
        """An expert matrix, dense or (a packed run) its MXFP4 blocks and scales, rows picked alike."""
        if p + name in w:
            return GgufTensor(_name(kind, ".weight", i), EXPERTS, lambda: w[p + name][:, rows])
        blocks, scales = p + name + mxfp4.SUFFIXES[0], p + name + mxfp4.SUFFIXES[1]
        return GgufTensor(_name(kind, ".weight", i), EXPERTS, None, lambda: (w[blocks][:, rows], w[scales][:, rows]))

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
        experts("mlp.mlp1_weight", T.FFN_GATE_EXP, slice(0, None, 2)),
        GgufTensor(_name(T.FFN_GATE_EXP, ".bias", i), F32, mlp1("mlp.mlp1_bias", 0)),
        experts("mlp.mlp1_weight", T.FFN_UP_EXP, slice(1, None, 2)),
        GgufTensor(_name(T.FFN_UP_EXP, ".bias", i), F32, mlp1("mlp.mlp1_bias", 1)),
        experts("mlp.mlp2_weight", T.FFN_DOWN_EXP, slice(None)),
        GgufTensor(_name(T.FFN_DOWN_EXP, ".bias", i), F32, ours("mlp.mlp2_bias")),
    ]


def tensor_plan(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> list[GgufTensor]:
    """Every GGUF tensor of the model whose checkpoint tensors (our names, as saved: experts dense or MXFP4
    `.blocks` / `.scales`) are `w`, in writing order."""
    T = gguf.MODEL_TENSOR
    unembedding = "embedding.weight" if cfg.tie_word_embeddings else "unembedding.weight"
    return [
        GgufTensor(_name(T.TOKEN_EMBD, ".weight"), MATRIX, lambda: w["embedding.weight"]),
        *(t for i in range(cfg.num_hidden_layers) for t in _layer(cfg, w, i)),
        GgufTensor(_name(T.OUTPUT_NORM, ".weight"), F32, lambda: w["norm.scale"]),
        GgufTensor(_name(T.OUTPUT, ".weight"), MATRIX, lambda: w[unembedding]),
    ]
