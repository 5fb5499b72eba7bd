"""`gptoss export`: a run's checkpoint -> a Hugging Face `GptOssForCausalLM` directory.

    HF_DIR/config.json                      model_type gpt_oss, explicit rope_parameters and layer_types
    HF_DIR/model.safetensors                HF names (or model-0000X-of-0000N.safetensors + the index)
    HF_DIR/generation_config.json           token ids and the run's sampling defaults
    HF_DIR/tokenizer.json, tokenizer_config.json   with the run's chat_template, when it has a conversation format

The directory is built next to HF_DIR and renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import RunConfig, config_from_dict, read_yaml
from ..data.tokenizer import EOS, PAD, load_tokenizer, tokenizer_hash
from ..errors import GptossError
from ..output import warn
from ..run.checkpoint import read_state, resolve_checkpoint
from ..run.layout import newest_run_dir
from .chat_template import export_chat
from .names import expected_shapes, staged_directory, to_hf_config, to_hf_state_dict

DTYPES = {"bf16": (torch.bfloat16, "bfloat16"), "fp32": (torch.float32, "float32")}
FP32_SUFFIXES = ("layernorm.weight", "model.norm.weight")  # HF keeps norms fp32 (_keep_in_fp32_modules)
BOS_CANDIDATES = ("<|startoftext|>", EOS)  # o200k_harmony has a start token; our BPE reuses <|endoftext|>
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes (decimal, as transformers' max_shard_size), '512MiB' -> binary, '1000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in UNITS or float(match.group(1)) <= 0:
        raise GptossError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def locate(run: Path | None, checkpoint: Path | None) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) from --run and/or --checkpoint (default: the newest run)."""
    if checkpoint is not None:
        ckpt = resolve_checkpoint(checkpoint)
        if run is None:  # a step directory sits in RUN/checkpoints/
            run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
        return Path(run), ckpt
    if run is None:
        run = newest_run_dir(need="checkpoints")
    elif not Path(run).is_dir():
        raise GptossError(f"--run {run} does not exist")
    return Path(run), resolve_checkpoint(run)


def read_run_config(run_dir: Path, ckpt: Path, state: dict) -> RunConfig:
    """The model shapes the weights were saved with (state.json), the infer defaults from config.yaml."""
    saved = config_from_dict(state["config"], str(ckpt / "state.json")) if "config" in state else None
    path = run_dir / "config.yaml"
    if path.is_file():
        cfg = config_from_dict(read_yaml(path), str(path))
        if saved is not None:
            cfg.model = saved.model
        return cfg
    if saved is None:
        raise GptossError(f"{run_dir}: no config.yaml, and {ckpt / 'state.json'} holds no config")
    return saved


def read_weights(cfg: RunConfig, path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, checked tensor by tensor against the config's shapes."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise GptossError(f"{path}: cannot read weights ({err})") from None
    expected = expected_shapes(cfg.model)
    for name, shape in expected.items():
        if name not in tensors:
            raise GptossError(f"{path}: tensor {name} is missing")
        if tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape)
            raise GptossError(f"{path}: tensor {name} has shape {got}, the config expects {shape}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise GptossError(f"{path}: unexpected tensor {extra[0]} (was it saved from another config?)")
    return tensors


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


def write_safetensors(out: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype, limit: int) -> list[str]:
    """model.safetensors, or HF-style shards plus model.safetensors.index.json. Returns the file names."""
    dtypes = {n: torch.float32 if n.endswith(FP32_SUFFIXES) else dtype for n in tensors}  # fp32 norms: lossless
    sizes = {n: t.numel() * dtypes[n].itemsize for n, t in tensors.items()}
    groups = shard(sizes, limit)
    names = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)]
    for fname, group in zip(names, groups, strict=True):  # one shard in memory at a time, cast on the way
        save_file({n: tensors[n].to(dtypes[n]).contiguous() for n in group}, str(out / fname),
                  metadata={"format": "pt"})
    if len(groups) == 1:
        return names
    index = {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": {n: fname for fname, group in zip(names, groups, strict=True) for n in group}}
    _dump(out / "model.safetensors.index.json", index)
    return names + ["model.safetensors.index.json"]


def generation_config(cfg: RunConfig, token_ids: dict) -> dict:
    """The run's infer section as HF generate() defaults (temperature 0 = greedy)."""
    i = cfg.infer
    out = {"bos_token_id": token_ids.get("bos"), "eos_token_id": token_ids.get("eos"),
           "pad_token_id": token_ids.get("pad"), "max_new_tokens": i.max_new_tokens, "do_sample": i.temperature > 0}
    if i.temperature > 0:
        out |= {"temperature": i.temperature, "top_k": i.top_k, "top_p": i.top_p}
    if i.repetition_penalty != 1.0:
        out["repetition_penalty"] = i.repetition_penalty
    return out


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def export_run(run: Path | None, out: Path, dtype: str = "bf16", checkpoint: Path | None = None,
               max_shard_size: str | int = "5GB", force: bool = False) -> dict:
    """Write the HF directory `out`; returns a summary (files, tensors, bytes, checkpoint)."""
    if dtype not in DTYPES:
        raise GptossError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    torch_dtype, dtype_name = DTYPES[dtype]
    limit = parse_size(max_shard_size)
    run_dir, ckpt = locate(run, checkpoint)
    state = read_state(ckpt)
    cfg = read_run_config(run_dir, ckpt, state)
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not force:  # fail before reading gigabytes
        raise GptossError(f"--out {out} is not empty (add --force to replace it)")

    tok_path = next((p for p in (run_dir / "tokenizer.json", ckpt / "tokenizer.json") if p.is_file()), None)
    token_ids: dict[str, int | None] = {}
    if tok_path is None:
        warn(f"{run_dir} has no tokenizer.json: exporting the weights without a tokenizer")
    else:
        tok = load_tokenizer(tok_path)
        if state.get("tokenizer_hash") not in (None, tokenizer_hash(tok)):
            raise GptossError(f"{tok_path} is not the tokenizer {ckpt.name} was trained with (hash mismatch)")
        eos = EOS
        bos = next(t for t in BOS_CANDIDATES if tok.token_to_id(t) is not None)
        pad = PAD if tok.token_to_id(PAD) is not None else EOS
        token_ids = {"bos": tok.token_to_id(bos), "eos": tok.token_to_id(eos), "pad": tok.token_to_id(pad)}
        chat = export_chat(tok, run_dir)
    hf_config = to_hf_config(cfg.model, dtype_name, token_ids)  # refuses what HF would compute differently
    hf_tensors = to_hf_state_dict(cfg.model, read_weights(cfg, ckpt / "model.safetensors"))

    with staged_directory(out, force=force) as tmp:
        files = write_safetensors(tmp, hf_tensors, torch_dtype, limit)
        _dump(tmp / "config.json", hf_config)
        gen = generation_config(cfg, token_ids)
        if tok_path is not None and chat is not None:  # generate() stops at the end of an assistant turn too
            gen["eos_token_id"] = [gen["eos_token_id"], *(i for i in chat["stop_ids"] if i != gen["eos_token_id"])]
        _dump(tmp / "generation_config.json", gen)
        files += ["config.json", "generation_config.json"]
        if tok_path is not None:
            shutil.copyfile(tok_path, tmp / "tokenizer.json")
            tok_config = {
                "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
                "model_max_length": cfg.model.max_context_length, "clean_up_tokenization_spaces": False,
            }
            if chat is not None:  # an imported template keeps the special tokens it was written for
                tok_config |= chat["special"] | {"chat_template": chat["template"]}
            _dump(tmp / "tokenizer_config.json", tok_config)
            files += ["tokenizer.json", "tokenizer_config.json"]
    return {"out": str(out), "checkpoint": str(ckpt), "step": int(state.get("step", 0)), "dtype": dtype,
            "files": files, "tensors": len(hf_tensors),
            "bytes": sum((out / f).stat().st_size for f in files if f.endswith(".safetensors"))}
