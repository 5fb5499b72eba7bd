"""Everything `gptoss train` does before the first step, as named steps in the order they run:

    resolve_run        the run directory (new, resumed, or a fine-tune's), its lock, the checkpoint to start from
    open_inputs        the tokenizer and the training / validation batches (inputs.py)
    build_model        the model from the seed, the starting checkpoint's weights loaded into it
    model transforms   transforms.py's training list: precision, device, activation checkpointing, compile,
                       then any extra (LoRA adapters first: lora.py builds the frozen base); then DDP / FSDP2
    build_optimizer    AdamW over the parameters that still require gradients (optim.py), and a resume's state

Under torchrun, rank 0 decides the run directory and broadcasts it; rank 0 prepares the data while the
others wait for it (data/dataset.py), then every rank memory-maps the same shards and reads only its own
rows, reads the checkpoint itself (multi-node runs need the run directory and the data on a shared file
system), builds the same model from the same seed and then wraps it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import write_atomic
from ..config import RunConfig, TrainConfig
from ..devices import native_bf16, pick_device, resolve_precision
from ..errors import GptossError
from ..model import Transformer
from ..output import console, warn
from ..run import checkpoint as ckpt
from ..run.checkpoint import CheckpointState
from ..run.layout import RunDir
from ..run.lock import RunLock
from ..transforms import ModelTransform, apply_transforms, build_model, training_transforms
from . import distributed, lora
from .inputs import TrainingInputs, open_inputs, source_run
from .optim import build_optimizer

# Model fields that only choose a kernel: a checkpoint resumes under either setting.
KERNEL_FIELDS = ("attention_backend", "moe_backend")


@dataclass(kw_only=True)
class TrainingSetup:
    cfg: RunConfig
    run: RunDir
    device: torch.device
    model: Transformer  # the plain module: names, state dicts
    wrapped: torch.nn.Module  # what the loop calls: the model, DDP(model) or the fully_shard-ed model
    optimizer: torch.optim.AdamW
    train_data: object  # TokenBatches or ConversationBatches; batch_size = the micro-batch of all ranks
    val_data: object | None
    tok_hash: str
    grad_accum_steps: int
    precision: str = "fp32"  # resolved: fp32 | bf16-mixed | bf16
    transforms: list[str] = field(default_factory=list)  # the model transforms applied, in order
    dist: distributed.DistInfo = field(default_factory=distributed.DistInfo)
    resume_state: CheckpointState | None = None
    resume_tensors: dict = field(default_factory=dict)
    resumed_from: Path | None = None  # the checkpoint resume_state came from
    started_from: Path | None = None  # --init-from: the checkpoint whose weights a new run starts from
    setup_times: dict = field(default_factory=dict)  # read_s, tokenizer_s, tokenize_s, model_s (seconds)
    data_root: Path | None = None  # the prepared dataset trained on (None: conversations)
    lock: RunLock | None = None  # rank 0's hold on RUN/train.lock, released when the Trainer ends
    pending: list = field(default_factory=list)  # writes a resume defers to its first save (commit_files)
    base: dict | None = None  # a LoRA run's base record for state.json (run/base.py; rank 0)
    base_checkpoint: Path | None = None  # a LoRA run's base checkpoint (every rank)

    @property
    def run_dir(self) -> Path:
        return self.run.path

    def commit_files(self) -> None:
        """Write what a resume deferred (config.yaml, tokenizer.json): called before its first checkpoint, so
        a resume that fails earlier leaves the run directory as it was."""
        for write in self.pending:
            write()
        self.pending = []

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


@dataclass
class RunStart:
    """What resolve_run decided: where the run goes and which checkpoint it starts from."""

    run: RunDir
    resume_ckpt: Path | None  # --resume / --resume-from: weights, optimizer and data position
    init_ckpt: Path | None  # --init-from: weights only, a new run at step 0
    state: CheckpointState | None  # the resumed checkpoint's state
    flag: str  # how errors name the resume option

    @property
    def start_ckpt(self) -> Path | None:
        return self.resume_ckpt or self.init_ckpt


def setup_training(
    cfg: RunConfig,
    run_dir: Path | None,
    resume: bool = False,
    resume_from: Path | None = None,
    tokenizer_path: Path | None = None,
    init_from: Path | None = None,
    progress: bool = True,
    transforms: Sequence[ModelTransform] = (),
) -> TrainingSetup:
    """Set up a run. `resume`/`resume_from` continue a checkpoint exactly (weights, optimizer, data
    position); `init_from` starts a new run (step 0, fresh optimizer) from a checkpoint's weights.
    `progress`: progress bars (stderr) while the data is prepared. `transforms` join the training list.

    The run directory is locked (RUN/train.lock) from here until the Trainer ends (TrainingSetup.release); a
    resume changes nothing in it until everything it needs is loaded and verified."""
    held: list[RunLock | None] = []
    try:
        return _setup(cfg, run_dir, resume, resume_from, tokenizer_path, init_from, progress, transforms, held)
    except BaseException:
        for lock in held:
            if lock is not None:
                lock.release()
        raise


def _setup(cfg, run_dir, resume, resume_from, tokenizer_path, init_from, progress, transforms, held) -> TrainingSetup:
    t = cfg.train
    if init_from is not None and (resume or resume_from):
        raise GptossError("--init-from starts a new run from weights; it cannot be combined with --resume")
    cfg.validate_for_training()
    device = pick_device(t.device, "train.device")
    info = distributed.init(device.type, t.parallel)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    distributed.check_same_config(cfg.to_dict(), info)

    start = resolve_run(cfg, run_dir, resume, resume_from, init_from, info, held)
    if start.state and t.max_steps and start.state.step >= t.max_steps:  # known without the data: refuse now
        _refuse_finished(start.run, start.state.step, t.max_steps)
    accum = accumulation(cfg, info.world)
    if info.main:
        _warn_world_change(cfg, start.state, info.world, accum)
    inputs = open_inputs(cfg, start.run, start.start_ckpt, tokenizer_path, info, progress)
    _check_inputs(cfg, start, inputs, accum)
    if info.main:  # every input is checked; building the model and optimizer takes seconds (imports included)
        console.print(f"building the model for {start.run} on {device.type}", highlight=False, soft_wrap=True)
    model_start = time.perf_counter()
    pending = _lock_and_write(cfg, start, inputs, info, held)

    before = [tr for tr in transforms if tr.before_weights]
    precision = _precision(t, device, cfg.lora.enabled)
    extra = [tr for tr in transforms if not tr.before_weights]
    base_record, base = None, None
    if cfg.lora.enabled:  # the base loaded as it is stored and frozen; the adapters join the training list
        model, base_record, adapters, base = lora.build_lora_model(
            cfg, start.run, start.resume_ckpt, start.init_ckpt, start.state, device, precision, before, info.main
        )
        extra = [adapters, *extra]
    else:
        model = build_start_model(cfg, start, info, before)
    names = apply_transforms(model, training_transforms(precision, device, **_switches(t)) + extra)
    wrapped = distributed.wrap(model, info, device, mixed_bf16=precision == "bf16-mixed" and device.type == "cuda")
    optimizer = build_optimizer(model, t, device)  # after fully_shard: FSDP2 parameters are DTensors
    tensors = {}
    if start.resume_ckpt:
        tensors = ckpt.read_trainer_tensors(start.resume_ckpt)
        distributed.load_optimizer_state(model, optimizer, ckpt.optimizer_from_tensors(tensors, start.state.optimizer))
    return TrainingSetup(
        cfg=cfg,
        run=start.run,
        device=device,
        model=model,
        wrapped=wrapped,
        optimizer=optimizer,
        train_data=inputs.train,
        val_data=inputs.val,
        tok_hash=inputs.tok_hash,
        grad_accum_steps=accum,
        precision=precision,
        transforms=names,
        dist=info,
        resume_state=start.state,
        resume_tensors=tensors,
        resumed_from=start.resume_ckpt,
        started_from=start.init_ckpt,
        setup_times={**inputs.times, "model_s": time.perf_counter() - model_start},
        base=base_record,
        base_checkpoint=base,
        data_root=inputs.root,
        lock=held[0],
        pending=pending,
    )


# ---- step 1: the run directory and the checkpoint to start from ----------------------------------


def resolve_run(cfg, run_dir, resume, resume_from, init_from, info, held) -> RunStart:
    """Where the run goes (given, the resumed one's, or a new runs/NAME-DATE), locked if it exists, and the
    checkpoint it resumes or starts from, checked against the config."""
    flag = "--resume-from" if resume_from else "--resume"
    resume_ckpt = None
    if resume or resume_from:
        source = resume_from or run_dir
        if source is None:
            raise GptossError("--resume needs --run DIR (or --resume-from PATH)")
        resume_ckpt = ckpt.resolve_checkpoint(source)
        if run_dir is None:
            if RunDir.of_checkpoint(resume_ckpt).path == resume_ckpt:
                raise GptossError(
                    f"--resume-from {source}: not inside a run's checkpoints/ folder; "
                    "say where the continued run goes with --run DIR"
                )
            run_dir = RunDir.of_checkpoint(resume_ckpt).path
    if run_dir is None:
        run_dir = distributed.broadcast_object(RunDir.new(cfg.name).path if info.main else None, info)
    run = RunDir(run_dir)
    if run.path.exists() and not run.path.is_dir():
        raise GptossError(f"--run {run} exists and is not a directory")
    # An existing run is locked before anything else looks at it (rank 0 decides: every rank must take part
    # in _take_lock's broadcast at the same point).
    if distributed.broadcast_object(run.path.is_dir() if info.main else None, info):
        held.append(_take_lock(run, info))
    _refuse_checkpoints(run, resume_ckpt)
    state = ckpt.read_state(resume_ckpt) if resume_ckpt else None
    if state:
        _check_same_model(cfg, state, resume_ckpt, flag)
        if state.optimizer is None:
            raise GptossError(f"{flag}: {resume_ckpt} holds weights only (imported?); use --init-from to train from it")
    init_ckpt = ckpt.resolve_checkpoint(init_from) if init_from is not None else None
    init_state = ckpt.read_state(init_ckpt) if init_ckpt else None
    lora.check_start(cfg, resume_ckpt, init_ckpt, state, init_state)  # before the model check: names a LoRA run
    if init_ckpt:
        _check_same_model(cfg, init_state, init_ckpt, "--init-from")
    return RunStart(run, resume_ckpt, init_ckpt, state, flag)


def _refuse_checkpoints(run: RunDir, resume_ckpt: Path | None) -> None:
    if resume_ckpt is None and ckpt.list_checkpoints(run.checkpoints):
        raise GptossError(f"{run} already holds checkpoints: add --resume to continue it, or pick another --run")


def _check_same_model(cfg: RunConfig, state: CheckpointState, where: Path, flag: str) -> None:
    saved = dict((state.config or {}).get("model", {}))
    now = cfg.to_dict()["model"]
    for key in saved.keys() | now.keys():
        if key not in KERNEL_FIELDS and saved.get(key) != now.get(key):
            raise GptossError(
                f"{flag}: {where} was trained with model.{key}={saved.get(key)!r}, the config has {now.get(key)!r}"
            )


def _take_lock(run: RunDir, info: distributed.DistInfo) -> RunLock | None:
    """Rank 0 locks the run directory (run/lock.py); every rank learns whether it could."""
    lock, error = None, None
    if info.main:
        try:
            lock = RunLock(run).acquire()
        except GptossError as err:
            error = str(err)
        except OSError as err:
            error = f"cannot create {run.lock} ({err.strerror or err})"
    error = distributed.broadcast_object(error, info)
    if error:
        raise GptossError(error)
    return lock


def accumulation(cfg: RunConfig, world: int) -> int:
    """Micro-batches per optimizer step: train.grad_accum_steps, or derived from train.global_batch_size."""
    t = cfg.train
    if t.global_batch_size is None:
        return t.grad_accum_steps
    per_step = t.batch_size * world
    if t.global_batch_size % per_step:
        raise GptossError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of batch_size x world "
            f"size = {t.batch_size} x {world}"
        )
    return t.global_batch_size // per_step


def _warn_world_change(cfg: RunConfig, state: CheckpointState | None, world: int, accum: int) -> None:
    """A resume on another number of processes keeps train.batch_size per process: without
    train.global_batch_size the global batch changes with it, which changes the run."""
    before = state.world_size if state else None
    if before is None or before == world or cfg.train.global_batch_size is not None:
        return
    per_process = cfg.train.batch_size * accum
    warn(
        f"resuming on {world} process{'es' if world > 1 else ''} instead of {before}: the global batch goes from "
        f"{per_process * before} to {per_process * world} sequences per step (set "
        f"train.global_batch_size={per_process * before} to keep it)"
    )


def total_steps(t: TrainConfig, batches_per_epoch: int, accum: int) -> int:
    """The run's optimizer steps: train.max_steps, else train.epochs passes of accum micro-batches a step."""
    return t.max_steps or max(1, t.epochs * batches_per_epoch // accum)


def _check_inputs(cfg: RunConfig, start: RunStart, inputs: TrainingInputs, accum: int) -> None:
    """Before the model is built: a resume with another tokenizer, or a finished run, is refused at once."""
    state = start.state
    if state and state.tokenizer_hash not in (None, inputs.tok_hash):
        where = f" of {inputs.root}" if inputs.root is not None else ""
        raise GptossError(
            f"{start.flag}: the tokenizer{where} differs from the one {start.resume_ckpt} was trained with"
        )
    done = state.step if state else 0
    steps = total_steps(cfg.train, inputs.train.batches_per_epoch, accum)
    if done >= steps:
        _refuse_finished(start.run, done, steps)


def _refuse_finished(run: RunDir, done: int, steps: int) -> None:
    raise GptossError(
        f"{run} already trained {done} of {steps} steps; raise train.max_steps (e.g. --set train.max_steps=N) to "
        "continue"
    )


def _lock_and_write(cfg: RunConfig, start: RunStart, inputs: TrainingInputs, info, held: list) -> list:
    """Lock a new run directory (creating it) and write its config and tokenizer; a resume defers those
    writes to its first save (TrainingSetup.commit_files), so a resume that fails (bad weights, divergence)
    leaves RUN/ exactly as it was. Returns the deferred writes."""
    run = start.run
    if not held:  # a new directory: created by taking its lock, then checked again under it
        held.append(_take_lock(run, info))
        _refuse_checkpoints(run, start.resume_ckpt)
    tok = inputs.tokenizer
    pending = [lambda: run.write_config(cfg), lambda: write_atomic(run.tokenizer, tok.to_str())] if info.main else []
    template = (source_run(start.init_ckpt) or run).chat_template
    if info.main and template.is_file() and template.parent != run.path:  # the chat template of an imported model
        pending.append(lambda: write_atomic(run.chat_template, template.read_text(encoding="utf-8")))
    if not start.state:
        for write in pending:
            write()
        pending = []
    distributed.barrier(info)
    return pending


# ---- steps 3-4: the model, its starting weights and its transforms --------------------------------


def build_start_model(
    cfg: RunConfig, start: RunStart, info, before_weights: Sequence[ModelTransform] = ()
) -> Transformer:
    """The model from train.seed (the same weights on every rank), the `before_weights` transforms, then the
    weights of the checkpoint it resumes or starts from, refused when they are not finite."""
    model = build_model(cfg.model, seed=cfg.train.seed)
    apply_transforms(model, before_weights)
    source = start.start_ckpt
    if source is None:
        return model
    ckpt.load_weights(model, source / ckpt.MODEL)
    bad = ckpt.first_non_finite(dict(model.named_parameters()))
    if bad is not None:
        where = start.flag if start.resume_ckpt else "--init-from"
        raise GptossError(
            f"{where}: {source} holds non-finite weights ({bad}); "
            f"{ckpt.newest_finite_text(RunDir.of_checkpoint(source).checkpoints)} (pass it to --resume-from)"
        )
    if start.init_ckpt and info.main:
        console.print(f"starting from the weights of {start.init_ckpt}")
    return model


def _precision(t: TrainConfig, device: torch.device, adapters: bool = False) -> str:
    """train.precision resolved. With LoRA, `auto` on a bf16 GPU is bf16: the frozen base needs no fp32
    master copy (the adapters and their optimizer state stay fp32)."""
    bf16_ok = native_bf16(device)
    if device.type == "cuda" and not bf16_ok and t.precision in ("bf16", "bf16-mixed"):
        raise GptossError(
            f"train.precision: {torch.cuda.get_device_name(device)} has no native bf16; use --set train.precision=fp32"
        )
    if adapters and t.precision == "auto" and bf16_ok:
        return "bf16"
    return resolve_precision(t.precision, bf16_ok)


def _switches(t: TrainConfig) -> dict:
    return {"checkpointing": t.activation_checkpointing, "compile": t.compile}


def training_autocast(precision: str, device: torch.device, info: distributed.DistInfo | None = None):
    """The context each forward runs in: autocast to bf16 for bf16-mixed, except under FSDP2 on CUDA, whose
    mixed-precision policy does it (distributed.wrap); nothing otherwise."""
    fsdp = info is not None and info.enabled and info.parallel == "fsdp" and device.type == "cuda"
    if precision == "bf16-mixed" and not fsdp:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def model_for_training(cfg: RunConfig, device: torch.device, precision: str) -> Transformer:
    """The model as setup_training builds it for one process without a checkpoint (bench): from the seed,
    through the training transforms."""
    model = build_model(cfg.model, seed=cfg.train.seed)
    apply_transforms(model, training_transforms(precision, device, **_switches(cfg.train)))
    return model
