"""torch.distributed for `gptoss train` under torchrun: the only module that imports torch.distributed.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*; with WORLD_SIZE > 1 a process group is created
(nccl on CUDA, gloo on CPU) and the model is wrapped from outside, in torchtitan's order: activation
checkpointing and compile first (setup.py), then DDP, or FSDP2 `fully_shard` per block and then the root.
Checkpoints hold the full (unsharded) weights and optimizer state keyed by parameter name, exactly as a
single process writes them, so a run trained on N processes resumes on M.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import GptossError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none | ddp | fsdp

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device_type: str, parallel: str) -> DistInfo:
    """Join torchrun's process group when there is one; a plain process gets DistInfo() (world 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = timedelta(seconds=int(os.environ.get("GPTOSS_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return DistInfo(rank, world, local_rank, parallel)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _guard(what: str):
    """Turn a broken collective (a peer died or timed out) into one clear line."""

    @contextmanager
    def guard():
        try:
            yield
        except (RuntimeError, dist.DistError) as err:
            raise GptossError(
                f"rank {dist.get_rank()}: {what} failed: another process died or timed out "
                f"(see its log) [{str(err).splitlines()[0][:200]}]"
            ) from None

    return guard()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    with _guard("broadcast"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same_config(config: dict, info: DistInfo) -> None:
    """Every rank must train the same config: compare hashes before any work."""
    if not info.enabled:
        return
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    digests = [None] * info.world
    with _guard("config check"):
        dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        bad = next(r for r, d in enumerate(digests) if d != digests[0])
        raise GptossError(f"rank {bad} has a different config from rank 0 (check --config/--set on every node)")


def all_reduce(tensor: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """In-place sum / max / mean over ranks (a no-op in one process)."""
    if info.enabled:
        with _guard("all_reduce"):
            if op == "mean":
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                tensor /= info.world
            else:
                dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.enabled:
        with _guard("barrier"):
            dist.barrier()


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device, mixed_bf16: bool) -> torch.nn.Module:
    """The module the loop calls: the model itself, a DDP wrapper, or the model after fully_shard."""
    if not info.enabled:
        return model
    if info.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (info.world,))
        # bf16 compute with fp32 gradient reduction on CUDA; plain fp32 (or the model's dtype) elsewhere.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else None
        kwargs = {"mesh": mesh} | ({"mp_policy": mp} if mp else {})
        for block in model.block:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)  # the root last: embedding, final norm, unembedding
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Frozen weights and the buffers (a LoRA base, its packed MXFP4 codes, the rope table) are the same on
    # every process, each loaded from the same verified checkpoint or derived: DDP need not broadcast them
    # from rank 0 at start and before every forward (the buffers), gigabytes for gpt-oss-20b's packed experts,
    # which would also write into each process's mapped pages of the file (run/checkpoint.py load_weights).
    fixed = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, fixed)
    # Stacked expert parameters always receive gradients: no find_unused_parameters traversal needed.
    return DDP(model, device_ids=[info.local_rank] if device.type == "cuda" else None)


def gradient_sync(wrapped: torch.nn.Module, info: DistInfo, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps; sync on the last one."""
    if not info.enabled:
        return nullcontext()
    if info.parallel == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else wrapped.no_sync()


def _state_dict():
    """torch.distributed.checkpoint.state_dict, imported on first use: the import takes seconds (longer than
    the rest of gptoss together), and a command must print its first line soon after torch is imported."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def full_weights(model: torch.nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    """Unsharded weights by gpt-oss name on CPU (a collective under FSDP: every rank calls it)."""
    sdm = _state_dict()
    with _guard("gathering weights"):
        sd = sdm.get_model_state_dict(model, options=sdm.StateDictOptions(full_state_dict=True, cpu_offload=True))
    if tied:
        sd.pop("unembedding.weight", None)  # shares the embedding's storage: stored once
    return sd


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """AdamW state keyed by parameter name, unsharded (collective under FSDP)."""
    sdm = _state_dict()
    with _guard("gathering optimizer state"):
        return sdm.get_optimizer_state_dict(
            model, optimizer, options=sdm.StateDictOptions(full_state_dict=True, cpu_offload=True)
        )


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a name-keyed full optimizer state (every rank holds all of it; FSDP keeps its shard)."""
    sdm = _state_dict()
    sdm.set_optimizer_state_dict(model, optimizer, state, options=sdm.StateDictOptions(full_state_dict=True))


def unwrap_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ returns a DTensor under FSDP2."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
