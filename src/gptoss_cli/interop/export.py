"""`gptoss export`: a run's checkpoint -> a Hugging Face `GptOssForCausalLM` directory.

    HF_DIR/config.json                      model_type gpt_oss, explicit rope_parameters and layer_types,
                                            quantization_config when the experts are MXFP4
    HF_DIR/model.safetensors                HF names (or model-0000X-of-0000N.safetensors + the index)
    HF_DIR/generation_config.json           token ids and the run's sampling defaults
    HF_DIR/tokenizer.json, tokenizer_config.json   with the run's chat_template, when it has a conversation format

The experts of a packed run are written as they are stored (`..._blocks` / `..._scales`, byte for byte),
or decoded (`dequantize`); a dense run's can be quantised to MXFP4 (`quantize`, model/mxfp4.py), the
error of each matrix reported. The directory is built next to HF_DIR and renamed into place, so a failure
leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from ..atomic import staged_directory
from ..config import RunConfig
from ..data.tokenizer import EOS, PAD, bos_id
from ..devices import param_dtypes, resolve_dtype
from ..errors import GptossError
from ..model import mxfp4
from ..output import warn
from ..run.checkpoint import read_adapters
from ..run.open import OpenRun, open_run
from ..sizes import parse_size
from . import lora
from .chat_template import export_chat
from .names import expert_rules, to_hf_config, to_hf_state_dict

HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def shard(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Tensor names in consecutive groups of at most `limit` bytes (a bigger tensor gets a shard of its own)."""
    groups: list[list[str]] = [[]]
    total = 0
    for name, nbytes in sizes.items():
        if groups[-1] and total + nbytes > limit:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += nbytes
    return groups


def write_safetensors(out: Path, tensors: dict[str, torch.Tensor], limit: int) -> list[str]:
    """model.safetensors, or HF-style shards plus model.safetensors.index.json, each tensor in its own dtype.
    Returns the file names."""
    sizes = {n: t.numel() * t.dtype.itemsize for n, t in tensors.items()}
    groups = shard(sizes, limit)
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)]
    )
    for fname, group in zip(names, groups, strict=True):  # one shard in memory at a time, cast on the way
        save_file({n: tensors[n].contiguous() for n in group}, str(out / fname), metadata={"format": "pt"})
    if len(groups) == 1:
        return names
    index = {
        "metadata": {"total_size": sum(sizes.values())},
        "weight_map": {n: fname for fname, group in zip(names, groups, strict=True) for n in group},
    }
    _dump(out / "model.safetensors.index.json", index)
    return names + ["model.safetensors.index.json"]


def generation_config(cfg: RunConfig, token_ids: dict) -> dict:
    """The run's infer section as HF generate() defaults (temperature 0 = greedy)."""
    i = cfg.infer
    out = {
        "bos_token_id": token_ids.get("bos"),
        "eos_token_id": token_ids.get("eos"),
        "pad_token_id": token_ids.get("pad"),
        "max_new_tokens": i.max_new_tokens,
        "do_sample": i.temperature > 0,
    }
    if i.temperature > 0:
        out |= {"temperature": i.temperature, "top_k": i.top_k, "top_p": i.top_p}
    if i.repetition_penalty != 1.0:
        out["repetition_penalty"] = i.repetition_penalty
    return out


def special_tokens(tok: Tokenizer) -> dict[str, str]:
    """{"bos", "eos", "pad"} -> token text for a run's tokenizer (bos: data/tokenizer.bos_id; pad falls back
    to <|endoftext|>)."""
    return {
        "bos": tok.id_to_token(bos_id(tok)),  # o200k_harmony's start token; our BPE reuses <|endoftext|>
        "eos": EOS,
        "pad": PAD if tok.token_to_id(PAD) is not None else EOS,
    }


def convert_experts(
    cfg, weights: dict[str, torch.Tensor], packed: bool, quantize: str | None, dequantize: bool, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], bool, dict[str, dict]]:
    """The experts as the export writes them: packed runs keep their bytes unless `dequantize`; dense ones
    are quantised with `quantize="mxfp4"`. Returns (weights, packed, {matrix: its quantisation error})."""
    errors: dict[str, dict] = {}
    for name in (r.ours for r in expert_rules(cfg)):
        if packed and dequantize and name + ".blocks" in weights:  # (a merged LoRA update may be decoded already)
            blocks, scales = weights.pop(name + ".blocks"), weights.pop(name + ".scales")
            weights[name] = mxfp4.dequantize(blocks, scales, dtype)
        elif not packed and quantize == "mxfp4":
            dense = weights.pop(name)
            blocks, scales = mxfp4.quantize(dense)
            weights[name + ".blocks"], weights[name + ".scales"] = blocks, scales
            errors[name] = quantization_error(dense, blocks, scales)
    return weights, (packed and not dequantize) or (not packed and quantize == "mxfp4"), errors


def quantization_error(dense: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> dict:
    """How far the MXFP4 matrix is from the one it packs: ||W - Q(W)|| / ||W|| and max |W - Q(W)|."""
    rel, worst, norm = 0.0, 0.0, 0.0
    for w, b, s in zip(dense, blocks, scales, strict=True):  # one expert at a time: fp32 temporaries
        diff = w.double() - mxfp4.dequantize(b, s, torch.float32).double()
        rel += diff.pow(2).sum().item()
        norm += w.double().pow(2).sum().item()
        worst = max(worst, diff.abs().max().item())
    return {"relative_rms": (rel / norm) ** 0.5 if norm else 0.0, "max_abs": worst}


def refuse_overlap(out: Path, opened) -> None:
    """An export never replaces what it reads: --out may not be the run or a file of it, lie inside it, or hold
    it (with --force the old --out is replaced once the new one is complete). `opened`: run/open.py's OpenRun."""
    sources = [opened.run.path, opened.checkpoint, opened.weights, opened.tokenizer_path, opened.base]
    target = out.resolve()
    for source in filter(None, sources):
        real = Path(source).resolve()
        if target == real or target.is_relative_to(real) or real.is_relative_to(target):
            raise GptossError(f"--out {out} overlaps {source}, which this export reads; write it outside the run")


def _check_options(dtype: str, quantize: str | None, dequantize: bool) -> None:
    if dtype not in ("bf16", "fp32"):
        raise GptossError(f"--dtype {dtype!r}: expected one of bf16, fp32")
    if quantize not in (None, "mxfp4"):
        raise GptossError(f"--quantize {quantize!r}: expected mxfp4")
    if quantize and dequantize:
        raise GptossError("--quantize and --dequantize contradict each other: pick one")


def _check_out(out: Path, opened, force: bool) -> None:
    """Before reading gigabytes: refuse_overlap, and a non-empty --out needs --force."""
    refuse_overlap(out, opened)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise GptossError(f"--out {out} is not empty (add --force to replace it)")


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def export_run(
    run: Path | None,
    out: Path,
    dtype: str = "bf16",
    checkpoint: Path | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    quantize: str | None = None,
    dequantize: bool = False,
    adapter_only: bool = False,
) -> dict:
    """Write the HF directory `out`; returns a summary (files, tensors, bytes, checkpoint, experts and,
    when quantised, each expert matrix's error). A LoRA run is written merged into its base (packed
    experts packed again unless `dequantize`), or with `adapter_only` as a PEFT adapter directory."""
    _check_options(dtype, quantize, dequantize)
    torch_dtype = resolve_dtype(dtype)
    dtype_name = HF_DTYPE_NAMES[torch_dtype]
    limit = parse_size(max_shard_size, "--max-shard-size")
    opened = open_run(run, checkpoint, need_tokenizer=False)
    cfg, ckpt, tok, tok_path = opened.config, opened.checkpoint, opened.tokenizer, opened.tokenizer_path
    out = Path(out)
    _check_out(out, opened, force)
    if adapter_only:
        return export_adapter(opened, out, force)

    token_ids: dict[str, int | None] = {}
    chat = None
    if tok is None:
        warn(f"{opened.run} has no tokenizer.json: exporting the weights without a tokenizer")
    else:
        special = special_tokens(tok)
        bos, eos, pad = special["bos"], special["eos"], special["pad"]
        token_ids = {k: tok.token_to_id(t) for k, t in special.items()}
        chat = export_chat(tok, opened.run.chat_template)
    to_hf_config(cfg.model, dtype_name, token_ids)  # refuses what HF would compute differently, before reading
    weights, packed, merged = lora.run_weights(opened, not dequantize, torch_dtype)  # a LoRA run's merged
    weights, packed, errors = convert_experts(cfg.model, weights, packed, quantize, dequantize, torch_dtype)
    errors |= merged
    hf_config = to_hf_config(cfg.model, dtype_name, token_ids, mxfp4=packed)
    dtypes = param_dtypes(weights, torch_dtype)  # the precision policy: norms and router stay fp32, losslessly
    hf_tensors = to_hf_state_dict(
        cfg.model, {n: t.to(dtypes[n]) if t.is_floating_point() else t for n, t in weights.items()}
    )

    with staged_directory(out, force=force) as tmp:
        files = write_safetensors(tmp, hf_tensors, limit)
        _dump(tmp / "config.json", hf_config)
        gen = generation_config(cfg, token_ids)
        if tok_path is not None and chat is not None:  # generate() stops at the end of an assistant turn too
            gen["eos_token_id"] = [gen["eos_token_id"], *(i for i in chat["stop_ids"] if i != gen["eos_token_id"])]
        _dump(tmp / "generation_config.json", gen)
        files += ["config.json", "generation_config.json"]
        if tok_path is not None:
            shutil.copyfile(tok_path, tmp / "tokenizer.json")
            tok_config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": bos,
                "eos_token": eos,
                "pad_token": pad,
                "model_max_length": cfg.model.max_context_length,
                "clean_up_tokenization_spaces": False,
            }
            if chat is not None:  # an imported template keeps the special tokens it was written for
                tok_config |= chat["special"] | {"chat_template": chat["template"]}
            _dump(tmp / "tokenizer_config.json", tok_config)
            files += ["tokenizer.json", "tokenizer_config.json"]
    return {
        "out": str(out),
        "checkpoint": str(ckpt),
        "step": opened.step,
        "lora_base": str(opened.base) if opened.base is not None else None,  # merged into these weights
        "dtype": dtype,
        "experts": "mxfp4" if packed else dtype,
        "quantization_error": errors,
        "files": files,
        "tensors": len(hf_tensors),
        "bytes": sum((out / f).stat().st_size for f in files if f.endswith(".safetensors")),
    }


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export_adapter(opened: OpenRun, out: Path, force: bool) -> dict:
    """A LoRA run's adapters as a PEFT adapter directory (interop/lora.py), in fp32 as trained: load it onto
    the base exported for transformers with peft.PeftModel.from_pretrained(model, out)."""
    if opened.base is None:
        raise GptossError(f"--adapter-only: {opened.checkpoint} holds a whole model, not LoRA adapters")
    cfg = opened.config
    tensors = lora.peft_tensors(cfg.model, cfg.lora, read_adapters(opened.checkpoint))
    with staged_directory(out, force=force) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILES[1]), metadata={"format": "pt"})
        _dump(tmp / ADAPTER_FILES[0], lora.peft_config(cfg.model, cfg.lora))
    return {
        "out": str(out),
        "checkpoint": str(opened.checkpoint),
        "step": opened.step,
        "lora_base": str(opened.base),
        "adapter": True,
        "files": list(ADAPTER_FILES),
        "tensors": len(tensors),
        "bytes": (out / ADAPTER_FILES[1]).stat().st_size,
    }
