"""The Hugging Face <-> gptoss map: weight names and config keys, both ways (openai/gpt-oss
`gpt_oss/torch/{model,weights}.py` <-> transformers `models/gpt_oss/{modeling,configuration}_gpt_oss.py`).

Our weights use openai/gpt-oss names; transformers' `GptOssForCausalLM` splits the fused qkv rows into
q/k/v, stores the expert matrices in x out (transposed), always has a router bias, and stores lm_head only
when untied. Config-wise HF reads YaRN from `rope_parameters` and, when that is missing, silently uses
YaRN x32 over 4096 tokens (`GptOssConfig.__post_init__`): an export always writes it explicitly, an import
mirrors the default.
Reading and writing tensors is left to export.py / import_.py; this module only maps, with one
declarative table of weight rules used in both directions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import GptossError
from ..model.config import ModelConfig

HF_SWIGLU_LIMIT = 7.0  # older transformers (5.18: GptOssExperts, integrations/mxfp4.py) hard-codes these two
HF_SWIGLU_ALPHA = 1.702
HF_DEFAULT_THETA = 150000.0  # GptOssConfig.default_theta
# What GptOssConfig fills in when config.json has neither rope_parameters nor rope_scaling.
HF_DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
SLIDING, FULL = "sliding_attention", "full_attention"
# The openai/gpt-oss ModelConfig defaults (the 120b), used for keys an original config.json leaves out.
OPENAI_DEFAULTS = dict(
    num_hidden_layers=36,
    num_experts=128,
    experts_per_token=4,
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    swiglu_limit=7.0,
    head_dim=64,
    num_attention_heads=64,
    num_key_value_heads=8,
    sliding_window=128,
    initial_context_length=4096,
    rope_theta=150000.0,
    rope_scaling_factor=32.0,
    rope_ntk_alpha=1.0,
    rope_ntk_beta=32.0,
)


def layer_types(cfg: ModelConfig) -> list[str]:
    return [SLIDING if cfg.is_sliding(i) else FULL for i in range(cfg.num_hidden_layers)]


# ---- weights ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One of our tensors and the HF tensor(s) it is. Several HF names: ours is their concatenation along
    dim 0 (the fused qkv rows [q: NH*D | k: NKV*D | v: NKV*D], no permutation). `transpose`: the expert
    matrices are (E, out, in) in ours and (E, in, out) in HF."""

    ours: str
    hf: tuple[str, ...]
    transpose: bool = False
    when: Callable[[ModelConfig], bool] = lambda cfg: True


def _qkv(kind: str) -> tuple[str, ...]:
    return tuple(f"self_attn.{p}_proj.{kind}" for p in "qkv")


# The one map, used both ways, in HF's order (exports are sharded in this order). Layer rules are relative
# to block.{i}. / model.layers.{i}.
LAYER_RULES = (
    Rule("attn.norm.scale", ("input_layernorm.weight",)),
    Rule("attn.qkv.weight", _qkv("weight")),
    Rule("attn.qkv.bias", _qkv("bias"), when=lambda cfg: cfg.attention_bias),
    Rule("attn.out.weight", ("self_attn.o_proj.weight",)),
    Rule("attn.out.bias", ("self_attn.o_proj.bias",), when=lambda cfg: cfg.attention_bias),
    Rule("attn.sinks", ("self_attn.sinks",)),
    Rule("mlp.norm.scale", ("post_attention_layernorm.weight",)),
    Rule("mlp.gate.weight", ("mlp.router.weight",)),
    Rule("mlp.gate.bias", ("mlp.router.bias",), when=lambda cfg: cfg.router_bias),
    Rule("mlp.mlp1_weight", ("mlp.experts.gate_up_proj",), transpose=True),  # (E, 2I, H) <-> (E, H, 2I)
    Rule("mlp.mlp1_bias", ("mlp.experts.gate_up_proj_bias",)),
    Rule("mlp.mlp2_weight", ("mlp.experts.down_proj",), transpose=True),  # (E, H, I) <-> (E, I, H)
    Rule("mlp.mlp2_bias", ("mlp.experts.down_proj_bias",)),
)
HEAD_RULES = (Rule("embedding.weight", ("model.embed_tokens.weight",)),)
TAIL_RULES = (
    Rule("norm.scale", ("model.norm.weight",)),
    Rule("unembedding.weight", ("lm_head.weight",), when=lambda cfg: not cfg.tie_word_embeddings),
)


def rules(cfg: ModelConfig) -> list[Rule]:
    """Every rule that applies to `cfg`, with full names, in HF's order."""
    layers = [
        Rule(f"block.{i}.{r.ours}", tuple(f"model.layers.{i}.{h}" for h in r.hf), r.transpose, r.when)
        for i in range(cfg.num_hidden_layers)
        for r in LAYER_RULES
    ]
    return [r for r in (*HEAD_RULES, *layers, *TAIL_RULES) if r.when(cfg)]


def to_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights (as saved: a tied unembedding absent; packed experts as `.blocks` / `.scales`) -> HF names
    (`..._blocks` / `..._scales`), in HF's order. Views, not copies."""
    split = [cfg.q_dim, cfg.kv_dim, cfg.kv_dim]
    out = {}
    for rule in rules(cfg):
        if rule.transpose and rule.ours + ".blocks" in sd:  # MXFP4 experts: HF keeps openai's layout and bytes
            out[rule.hf[0] + "_blocks"], out[rule.hf[0] + "_scales"] = (
                sd[rule.ours + ".blocks"],
                sd[rule.ours + ".scales"],
            )
            continue
        t = sd[rule.ours].transpose(1, 2) if rule.transpose else sd[rule.ours]
        for name, part in zip(rule.hf, t.split(split, dim=0) if len(rule.hf) > 1 else (t,), strict=True):
            out[name] = part
        if rule.ours.endswith("mlp.gate.weight") and not cfg.router_bias:
            # HF's router always adds a bias: zeros compute exactly what a bias-free router does.
            out[rule.hf[0].replace(".weight", ".bias")] = torch.zeros(cfg.num_experts, dtype=t.dtype, device=t.device)
    return out


def from_hf_state_dict(
    cfg: ModelConfig, get: Callable[[str], torch.Tensor], skip: set[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """HF tensors, fetched one by one through `get(hf_name)`, -> our names (contiguous, ready to save);
    our names in `skip` are left to the caller (packed experts)."""
    out = {}
    for rule in rules(cfg):
        if rule.ours in skip:
            continue
        parts = [get(name) for name in rule.hf]
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        out[rule.ours] = (t.transpose(1, 2) if rule.transpose else t).contiguous()
    return out


def expert_rules(cfg: ModelConfig) -> list[Rule]:
    """The rules of the expert matrices, the tensors MXFP4 quantises (HF `..._blocks` / `..._scales`)."""
    return [r for r in rules(cfg) if r.transpose]


def expected_shapes(cfg: ModelConfig, packed: bool = False) -> dict[str, tuple[int, ...]]:
    """Our tensor names -> shapes for `cfg`, as saved (tied unembedding absent; with `packed`, the experts
    as MXFP4 `.blocks` / `.scales`); allocates nothing."""
    from ..model import Transformer
    from ..model.mxfp4 import pack_experts
    from ..run.checkpoint import model_tensors

    with torch.device("meta"):
        model = Transformer(cfg)
        if packed:
            pack_experts(model)
    return {name: tuple(t.shape) for name, t in model_tensors(model).items()}


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    meta = {name: torch.empty(shape, device="meta") for name, shape in expected_shapes(cfg).items()}
    return {name: tuple(t.shape) for name, t in to_hf_state_dict(cfg, meta).items()}


# ---- config: ours -> HF -------------------------------------------------------------------------


def hf_rope_parameters(cfg: ModelConfig) -> dict:
    if cfg.rope_scaling_factor == 1:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    # truncate False: openai's YaRN uses the fractional correction range (gpt_oss/torch/model.py); HF's
    # _compute_yarn_parameters (modeling_rope_utils.py) floors/ceils otherwise.
    return {
        "rope_type": "yarn",
        "rope_theta": cfg.rope_theta,
        "factor": cfg.rope_scaling_factor,
        "beta_fast": cfg.rope_ntk_beta,
        "beta_slow": cfg.rope_ntk_alpha,
        "original_max_position_embeddings": cfg.initial_context_length,
        "truncate": False,
    }


def hf_legacy_rope(cfg: ModelConfig) -> dict:
    """rope_theta and rope_scaling as transformers 4.x reads them: null scaling for plain RoPE, else the
    same YaRN parameters as hf_rope_parameters."""
    params = hf_rope_parameters(cfg)
    scaling = None if params["rope_type"] == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling}


# The quantization_config of the released MXFP4 checkpoints: only the experts are quantised.
HF_MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


def to_hf_config(cfg: ModelConfig, dtype: str, token_ids: dict[str, int | None], mxfp4: bool = False) -> dict:
    """config.json for GptOssForCausalLM. `dtype` is "bfloat16" or "float32"; token_ids has bos/eos/pad;
    `mxfp4`: the experts are stored packed (transformers' Mxfp4Config reads them)."""
    if cfg.swiglu_limit != HF_SWIGLU_LIMIT:
        raise GptossError(
            f"model.swiglu_limit is {cfg.swiglu_limit:g}, but older transformers releases and its MXFP4 "
            f"kernels hard-code {HF_SWIGLU_LIMIT:g}: the export would compute another model"
        )
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "sliding_window": cfg.sliding_window or None,
        "layer_types": layer_types(cfg),
        "max_position_embeddings": cfg.max_context_length,
        "rope_parameters": hf_rope_parameters(cfg),
        # The legacy keys too: transformers 4.x ignores rope_parameters and, without rope_scaling, builds
        # GptOssConfig's default YaRN x32 at theta 150000, another model. 5.x reads rope_parameters, and a
        # rope_scaling equal to it (or null) changes nothing there.
        **hf_legacy_rope(cfg),
        "rms_norm_eps": cfg.rms_norm_eps,
        "attention_bias": cfg.attention_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "hidden_act": "silu",
        "swiglu_alpha": HF_SWIGLU_ALPHA,
        "swiglu_limit": cfg.swiglu_limit,
        "attention_dropout": 0.0,
        "output_router_logits": False,
        "use_cache": True,
        "bos_token_id": token_ids.get("bos"),
        "eos_token_id": token_ids.get("eos"),
        "pad_token_id": token_ids.get("pad"),
        "dtype": dtype,
        "torch_dtype": dtype,
        # openai's names, for reference only (transformers keeps but ignores them)
        "experts_per_token": cfg.experts_per_token,
        "initial_context_length": cfg.initial_context_length,
        "router_bias": cfg.router_bias,  # false: the router.bias tensors are zeros; `gptoss import` drops them
    } | ({"quantization_config": dict(HF_MXFP4_CONFIG)} if mxfp4 else {})


# ---- config: HF or openai -> ours ---------------------------------------------------------------


def _rope_from_hf(raw: dict, max_positions: int, source: str) -> dict:
    """HF rope keys -> our rope fields, with HF's semantics (defaults included) so the logits match."""
    # GptOssConfig: a legacy `rope_scaling` wins over `rope_parameters`; neither means YaRN x32 (its __post_init__).
    rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or HF_DEFAULT_ROPE)
    if {SLIDING, FULL} & set(rope):
        raise GptossError(f"{source}: per-layer-type rope_parameters are not supported (gptoss has one RoPE)")
    theta = float(rope.get("rope_theta") or raw.get("rope_theta") or HF_DEFAULT_THETA)
    if float(rope.get("partial_rotary_factor") or raw.get("partial_rotary_factor") or 1.0) != 1.0:
        raise GptossError(f"{source}: partial_rotary_factor != 1 is not supported (gptoss rotates every dim)")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {
            "rope_theta": theta,
            "rope_scaling_factor": 1.0,
            "initial_context_length": int(raw.get("initial_context_length") or max_positions),
        }
    if kind != "yarn":
        raise GptossError(f"{source}: rope_type {kind!r} is not supported (only default and yarn)")
    # HF: a top-level original_max_position_embeddings wins; else the rope dict's; else max_position_embeddings.
    original = int(
        raw.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_positions
    )
    factor = float(rope.get("factor") or max_positions / original)
    if rope.get("truncate", True):
        raise GptossError(
            f"{source}: YaRN with truncate=true (HF's default when the key is absent) rounds the "
            "correction range; gptoss follows openai's unrounded one"
        )
    concentration = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    attention_factor = rope.get("attention_factor")
    if (
        (attention_factor is not None and not math.isclose(attention_factor, concentration, rel_tol=1e-6))
        or rope.get("mscale")
        or rope.get("mscale_all_dim")
    ):
        raise GptossError(f"{source}: YaRN attention_factor/mscale overrides are not supported")
    return {
        "rope_theta": theta,
        "rope_scaling_factor": factor,
        "initial_context_length": original,
        "rope_ntk_beta": float(rope.get("beta_fast") or 32.0),  # HF: `or 32`, `or 1` as well
        "rope_ntk_alpha": float(rope.get("beta_slow") or 1.0),
    }


def _window_from_layer_types(raw: dict, layers: int, source: str) -> int:
    window = raw.get("sliding_window", 128)  # GptOssConfig default; an explicit null means no window
    kinds = raw.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(layers)]
    slides = [k == SLIDING for k in kinds]
    if len(kinds) != layers or not set(kinds) <= {SLIDING, FULL}:
        raise GptossError(f"{source}: layer_types must list {layers} of {SLIDING}/{FULL}, got {kinds}")
    if not any(slides):
        return 0
    if not window or slides != [i % 2 == 0 for i in range(layers)]:
        raise GptossError(
            f"{source}: layer_types {kinds} with sliding_window {window} is not supported: "
            "gptoss slides on the even layers (0, 2, ...) only"
        )
    return int(window)


def model_config_from_hf(raw: dict, source: str) -> dict:
    """HF gpt_oss config.json -> ModelConfig fields (layout flags as the config states them)."""
    if raw.get("model_type") != "gpt_oss":
        raise GptossError(f"{source}: model_type {raw.get('model_type')!r} is not gpt_oss")

    def get(key, default):  # GptOssConfig defaults for absent (or null) keys
        return default if raw.get(key) is None else raw[key]

    if float(get("swiglu_alpha", HF_SWIGLU_ALPHA)) != HF_SWIGLU_ALPHA:
        raise GptossError(f"{source}: swiglu_alpha {raw['swiglu_alpha']} is not supported (gptoss uses 1.702)")
    layers, heads = int(get("num_hidden_layers", 36)), int(get("num_attention_heads", 64))
    max_positions = int(get("max_position_embeddings", 131072))
    return dict(
        num_hidden_layers=layers,
        num_experts=int(get("num_local_experts", get("num_experts", 128))),
        experts_per_token=int(get("num_experts_per_tok", get("experts_per_token", 4))),
        vocab_size=int(get("vocab_size", 201088)),
        hidden_size=int(get("hidden_size", 2880)),
        intermediate_size=int(get("intermediate_size", 2880)),
        swiglu_limit=float(get("swiglu_limit", HF_SWIGLU_LIMIT)),  # transformers 5.24 reads it (5.18 used 7.0)
        head_dim=int(get("head_dim", int(get("hidden_size", 2880)) // heads)),
        num_attention_heads=heads,
        num_key_value_heads=int(get("num_key_value_heads", heads)),
        sliding_window=_window_from_layer_types(raw, layers, source),
        max_context_length=max_positions,
        rms_norm_eps=float(get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        attention_bias=bool(get("attention_bias", True)),
        router_bias=True,  # HF's router always has a bias tensor: keep it (zeros cost nothing and stay exact)
        initializer_range=float(get("initializer_range", 0.02)),
        **_rope_from_hf(raw, max_positions, source),
    )


def model_config_from_openai(raw: dict) -> dict:
    """openai/gpt-oss `original/config.json` -> ModelConfig fields; layout flags come from the tensors."""
    fields = OPENAI_DEFAULTS | {k: raw[k] for k in OPENAI_DEFAULTS if raw.get(k) is not None}
    # openai has no max_context_length key: its YaRN is built for initial_context_length x factor tokens.
    length = raw.get("max_context_length") or int(fields["initial_context_length"] * fields["rope_scaling_factor"])
    return fields | {"max_context_length": int(length)}


def build_model_config(fields: dict, source: str) -> ModelConfig:
    """ModelConfig(**fields), turning a validation error into one line naming the source file."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in fields.items() if k in known})
    except (ValueError, TypeError) as err:
        raise GptossError(f"{source}: {err}") from None
