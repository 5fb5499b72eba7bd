"""`gptoss import`: a Hugging Face gpt_oss directory (or openai's `original/` layout) -> a gptoss run directory.

    RUN/config.yaml                          model section from config.json, the other sections default
    RUN/tokenizer.json                       copied (when the source has one)
    RUN/chat_template.json                   the source's chat template and its special tokens (when it has one)
    RUN/checkpoints/step-00000000/           model.safetensors in our names, an empty trainer state,
                                             state.json with "imported_from"

Accepted weights: bf16/fp32 safetensors, one file or sharded with model.safetensors.index.json, and
MXFP4 expert matrices (`..._blocks`/`..._scales` in HF, `.blocks`/`.scales` in openai's files). Those stay
packed, byte for byte, as `block.N.mlp.mlp1_weight.blocks` / `.scales` (model/mxfp4.py), unless
`dequantize` asks for bf16 (exact) or only some expert matrices are packed. The source files are read
through memory maps, tensor by tensor, so a packed import holds little more than the tensors it has to
transform (the q/k/v concatenation); decoding holds the bf16 experts. Everything is read and checked
before the run directory is built next to --run and renamed into place, so a bad input leaves nothing.
Only the directory's own files are read, text files up to a bounded size (interop/source.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from ..atomic import staged_directory
from ..config import ConfigError, RunConfig, config_from_dict
from ..data.tokenizer import EOS, check_vocab, tokenizer_hash
from ..errors import GptossError
from ..model import mxfp4
from ..output import warn
from ..run.checkpoint import CheckpointState, save_checkpoint
from ..run.layout import RunDir
from .chat_template import keep_hf_template, read_hf_template
from .names import (
    build_model_config,
    expected_hf_shapes,
    expected_shapes,
    expert_rules,
    from_hf_state_dict,
    model_config_from_hf,
    model_config_from_openai,
)
from .source import SourceDir

INDEX = "model.safetensors.index.json"
OPENAI_KEYS = {"num_experts", "experts_per_token"}  # openai's names; HF's are num_local_experts, ...


class TensorFiles:
    """The safetensors of one directory: index-sharded, a single model.safetensors, or every *.safetensors."""

    def __init__(self, src: SourceDir):
        root = src.root
        index = root / INDEX
        text = src.text(index, "safetensors index")
        if text is not None:
            try:
                weight_map = json.loads(text)["weight_map"]
                files = sorted({root / f for f in weight_map.values()})
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise GptossError(f"{index}: not a safetensors index ({err})") from None
            for f in files:
                if src.file(f) is None:
                    raise GptossError(f"{f}: shard listed in {INDEX} is missing")
        elif src.file(root / "model.safetensors") is not None:
            files = [root / "model.safetensors"]
        else:
            files = sorted(f for f in root.glob("*.safetensors") if src.file(f) is not None)
            if not files:
                raise GptossError(f"{root}: no model.safetensors, {INDEX} or *.safetensors file")
        self.where: dict[str, Path] = {}
        self.handles = {}
        for f in files:
            try:
                self.handles[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, ValueError) as err:
                raise GptossError(f"{f}: not a readable safetensors file ({err})") from None
            self.where.update(dict.fromkeys(self.handles[f].keys(), f))
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.where

    def load(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self.where:
            raise GptossError(f"tensor {name} is missing (looked in {', '.join(p.name for p in self.handles)})")
        self.used.add(name)
        tensor = self.handles[self.where[name]].get_tensor(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise GptossError(
                f"{self.where[name]}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(shape)}"
            )
        return tensor

    def load_packed(self, blocks_name: str, scales_name: str, shape: tuple[int, ...]):
        """The MXFP4 blocks and scales of a matrix whose logical (our-layout) shape is (E, rows, cols),
        checked: (E, rows, cols/32, 16) and (E, rows, cols/32) uint8."""
        e, rows, cols = shape
        if cols % mxfp4.BLOCK:
            raise GptossError(f"tensor {blocks_name}: {cols} columns are not a multiple of {mxfp4.BLOCK}")
        scales = self.load(scales_name, (e, rows, cols // mxfp4.BLOCK))
        blocks = self.load(blocks_name)
        if tuple(blocks.shape) == (e, rows, cols // 2):  # some writers keep the 16-byte groups flattened
            blocks = blocks.view(e, rows, cols // mxfp4.BLOCK, mxfp4.BLOCK // 2)
        want = (e, rows, cols // mxfp4.BLOCK, mxfp4.BLOCK // 2)
        if tuple(blocks.shape) != want or blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise GptossError(
                f"{self.where[blocks_name]}: tensor {blocks_name} is {blocks.dtype} "
                f"{tuple(blocks.shape)}, MXFP4 for config.json needs uint8 {want}"
            )
        return blocks, scales


def read_json(src: SourceDir, path: Path) -> dict:
    text = src.text(path, "JSON file")
    if text is None:
        raise GptossError(f"{path} does not exist (is {path.parent} a Hugging Face model directory?)")
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise GptossError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise GptossError(f"{path}: expected a JSON object")
    return raw


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b.to(a.dtype))


def read_hf(raw: dict, files: TensorFiles, source: str, dequantize: bool = False):
    """HF layout -> (ModelConfig, our weights)."""
    fields = model_config_from_hf(raw, source)
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        if method != "mxfp4":
            raise GptossError(f"{source}: quantization {method!r} is not supported (only mxfp4)")
    # Tied when the config says so or lm_head is absent (HF would leave it random); also when both are
    # present and equal, unless the config explicitly unties them (then they train apart).
    tied = fields["tie_word_embeddings"] or not files.has("lm_head.weight")
    if files.has("lm_head.weight") and files.has("model.embed_tokens.weight"):
        same = _same(files.load("model.embed_tokens.weight"), files.load("lm_head.weight"))
        if fields["tie_word_embeddings"] and not same:
            raise GptossError(f"{source}: tie_word_embeddings is true but lm_head.weight differs from embed_tokens")
        tied = tied or (same and raw.get("tie_word_embeddings") is None)
    fields["tie_word_embeddings"] = tied
    if raw.get("router_bias") is False:  # written by `gptoss export` for a bias-free router: HF stored zeros
        biases = [f"model.layers.{i}.mlp.router.bias" for i in range(fields["num_hidden_layers"])]
        fields["router_bias"] = not all(files.has(b) and not files.load(b).any() for b in biases)
    cfg = build_model_config(fields, source)
    shapes = expected_hf_shapes(cfg)
    experts = {r.hf[0]: r.ours for r in expert_rules(cfg)}

    def packed(name: str):  # HF (E, in, out); the blocks are stored (E, out, in/32, 16)
        e, cols, rows = shapes[name]
        return files.load_packed(name + "_blocks", name + "_scales", (e, rows, cols))

    def get(name: str) -> torch.Tensor:
        if files.has(name) or name not in experts or not files.has(name + "_blocks"):
            return files.load(name, shapes[name])
        return mxfp4.dequantize(*packed(name), torch.bfloat16).transpose(1, 2)

    keep = _keep_packed([not files.has(n) and files.has(n + "_blocks") for n in experts], dequantize)
    weights = from_hf_state_dict(cfg, get, skip=set(experts.values()) if keep else set())
    if keep:
        for name, ours in experts.items():
            weights[ours + ".blocks"], weights[ours + ".scales"] = packed(name)
    return cfg, weights


def _keep_packed(packed: list[bool], dequantize: bool) -> bool:
    """Whether the experts stay MXFP4: all of them are packed and no decoding was asked for."""
    if any(packed) and not all(packed) and not dequantize:
        warn(f"only {sum(packed)} of the {len(packed)} expert matrices are MXFP4: decoding them all to bf16")
    return all(packed) and not dequantize


def read_openai(raw: dict, files: TensorFiles, source: str, dequantize: bool = False):
    """openai/gpt-oss `original/` layout (our own names) -> (ModelConfig, our weights)."""
    fields = model_config_from_openai(raw)
    tied = not files.has("unembedding.weight") or _same(
        files.load("embedding.weight"), files.load("unembedding.weight")
    )
    cfg = build_model_config(
        fields
        | {
            "tie_word_embeddings": tied,
            "attention_bias": files.has("block.0.attn.qkv.bias"),
            "router_bias": files.has("block.0.mlp.gate.bias"),
        },
        source,
    )
    shapes = expected_shapes(cfg)
    experts = [r.ours for r in expert_rules(cfg)]
    keep = _keep_packed([not files.has(n) and files.has(n + ".blocks") for n in experts], dequantize)
    weights = {}
    for name, shape in shapes.items():
        if not files.has(name) and files.has(name + ".blocks"):
            blocks, scales = files.load_packed(name + ".blocks", name + ".scales", shape)
            if keep:
                weights[name + ".blocks"], weights[name + ".scales"] = blocks, scales
            else:
                weights[name] = mxfp4.dequantize(blocks, scales, torch.bfloat16)
        else:
            weights[name] = files.load(name, shape)
    if tied:
        files.used.add("unembedding.weight")
    return cfg, weights


def infer_defaults(src: SourceDir, cfg: RunConfig) -> RunConfig:
    """Sampling defaults from generation_config.json, when it has usable ones (else ours stay)."""
    path = src.root / "generation_config.json"
    if src.file(path) is None:
        return cfg
    gen = read_json(src, path)
    infer = {"temperature": gen.get("temperature", 1.0) if gen.get("do_sample") else 0.0}
    infer |= {k: gen[k] for k in ("top_k", "top_p", "repetition_penalty", "max_new_tokens") if gen.get(k) is not None}
    try:
        return config_from_dict(cfg.to_dict() | {"infer": cfg.to_dict()["infer"] | infer}, str(path))
    except ConfigError as err:
        warn(f"ignoring the sampling defaults of {path.name} ({err})")
        return cfg


def find_tokenizer(src: SourceDir, layout: str, vocab_size: int) -> tuple[Path, Tokenizer, str] | None:
    """(path, tokenizer, its JSON) of the directory's tokenizer.json (for openai's original/, the parent's);
    None, with a warning, if unusable."""
    root = src.root
    candidates = [root / "tokenizer.json"] + ([root.parent / "tokenizer.json"] if layout == "openai" else [])
    path = next((p for p in candidates if src.file(p) is not None), None)
    if path is None:
        warn(
            f"{root} has no tokenizer.json: importing the weights only; `gptoss infer` needs a tokenizer.json "
            "in the run directory"
        )
        return None
    text = src.text(path, "tokenizer.json")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a plain Exception for bad JSON
        raise GptossError(f"{path}: not a valid tokenizer.json ({err})") from None
    if tok.token_to_id(EOS) is None:
        warn(f"{path} has no {EOS} token, which gptoss uses as end of text: not copied")
        return None
    check_vocab(tok, vocab_size, str(path))
    return path, tok, text


def import_dir(hf_dir: Path, run_dir: Path, dequantize: bool = False) -> dict:
    """Convert `hf_dir` into the run directory `run_dir` (which must not exist or be empty); MXFP4 experts
    stay packed unless `dequantize`. Returns a summary."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise GptossError(f"--run {run_dir} already exists and is not empty; pick a new directory")
    config_path = hf_dir / "config.json"
    raw = read_json(SourceDir(hf_dir), config_path)
    if "model_type" in raw or not OPENAI_KEYS <= set(raw):
        layout = "hf"  # a missing model_type (without openai keys) is refused there, naming config.json
    else:
        layout = "openai"
    src = SourceDir(hf_dir, openai_layout=layout == "openai")
    files = TensorFiles(src)
    try:
        read = read_hf if layout == "hf" else read_openai
        model_cfg, weights = read(raw, files, str(config_path), dequantize)
    except (ValueError, TypeError) as err:  # a config value of the wrong type (int("x"), ...)
        raise GptossError(f"{config_path}: {err}") from None
    unused = sorted(set(files.where) - files.used)
    if unused:
        warn(f"{len(unused)} tensor(s) in {hf_dir} are not part of the model and were skipped, e.g. {unused[0]}")
    quantized = sorted({n.rsplit(".", 1)[0] for n in files.used if n.endswith(("_blocks", ".blocks"))})
    packed = any(n.endswith(".blocks") for n in weights)

    name = (hf_dir.resolve().parent if hf_dir.resolve().name == "original" else hf_dir.resolve()).name
    run_cfg = RunConfig(model=model_cfg, name=name or "imported")
    run_cfg.train.seq_len = min(run_cfg.train.seq_len, model_cfg.max_context_length)
    run_cfg = config_from_dict(run_cfg.to_dict(), str(config_path))  # the same checks as a YAML config
    run_cfg = infer_defaults(src, run_cfg)
    found = find_tokenizer(src, layout, model_cfg.vocab_size)
    template = read_hf_template(src, found[0].parent, found[1]) if found else None
    kept = False

    state = CheckpointState(
        step=0,
        tokenizer_hash=tokenizer_hash(found[1]) if found else None,
        config=run_cfg.to_dict(),
        imported_from=str(hf_dir.resolve()),
        source_layout=layout,
        quantization="mxfp4" if packed else None,  # what the checkpoint holds
    )
    with staged_directory(run_dir, flag="--run") as tmp:
        staged = RunDir(tmp)
        staged.write_config(run_cfg)
        if found is not None:
            staged.tokenizer.write_text(found[2], encoding="utf-8")
            if template is not None:
                kept = keep_hf_template(template, found[1], staged.chat_template, str(found[0].parent))
        ckpt = save_checkpoint(staged.checkpoints, 0, weights, {}, state, keep=1)
    return {
        "run": str(run_dir),
        "checkpoint": str(RunDir(run_dir).checkpoints / ckpt.name),
        "layout": layout,
        "quantized_tensors": len(quantized),
        "experts": "mxfp4" if packed else str(weights["block.0.mlp.mlp1_weight"].dtype).removeprefix("torch."),
        "tensors": len(weights),
        "params": sum(
            t.numel() * (2 if t.dtype == torch.uint8 and n.endswith(".blocks") else 1)
            for n, t in weights.items()
            if not n.endswith(".scales")
        ),
        "bytes": sum(t.numel() * t.element_size() for t in weights.values()),
        "tokenizer": found is not None,
        "chat_template": kept,
        "tie_word_embeddings": model_cfg.tie_word_embeddings,
        "attention_bias": model_cfg.attention_bias,
        "rope_scaling_factor": model_cfg.rope_scaling_factor,
    }
