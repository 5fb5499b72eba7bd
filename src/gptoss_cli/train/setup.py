"""Everything `gptoss train` does before the first step: run directory, data, tokenizer, model, optimizer,
resume state, and (under torchrun) the process group and the DDP / FSDP2 wrapping.

Under torchrun, rank 0 decides the run directory and broadcasts it; rank 0 prepares the data while the
others wait for it (data/dataset.py), then every rank memory-maps the same shards and reads only its own
rows, reads the checkpoint itself (multi-node runs need the run directory and the data on a shared file
system), builds the same model from the same seed and then wraps it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig, TrainConfig
from ..data import conversations
from ..data.batches import TokenBatches
from ..data.corpus import split_documents
from ..data.dataset import open_training_data
from ..data.tokenizer import check_vocab, load_tokenizer, tokenizer_hash, train_tokenizer
from ..devices import apply_precision, native_bf16, pick_device, resolve_precision
from ..errors import GptossError
from ..model import Transformer
from ..output import console, warn
from ..run import checkpoint as ckpt
from ..run.atomic import write_atomic
from ..run.checkpoint import CheckpointState
from ..run.layout import RunDir
from ..run.lock import RunLock
from ..run.open import find_tokenizer
from . import distributed
from .optim import build_optimizer

# Model fields that only choose a kernel: a checkpoint resumes under either setting.
KERNEL_FIELDS = ("attention_backend", "moe_backend")


def _check_same_model(cfg: RunConfig, state: CheckpointState, where: Path, flag: str) -> None:
    saved = dict((state.config or {}).get("model", {}))
    now = cfg.to_dict()["model"]
    for key in saved.keys() | now.keys():
        if key not in KERNEL_FIELDS and saved.get(key) != now.get(key):
            raise GptossError(
                f"{flag}: {where} was trained with model.{key}={saved.get(key)!r}, the config has {now.get(key)!r}"
            )


@dataclass
class Prepared:
    cfg: RunConfig
    run_dir: Path
    device: torch.device
    model: Transformer  # the plain module: names, state dicts
    wrapped: torch.nn.Module  # what the loop calls: the model, DDP(model) or the fully_shard-ed model
    optimizer: torch.optim.AdamW
    train_data: TokenBatches  # batch_size = the micro-batch of all ranks together
    val_data: TokenBatches | None
    tok_hash: str
    grad_accum_steps: int
    precision: str = "fp32"  # resolved: fp32 | bf16-mixed | bf16
    dist: distributed.DistInfo = field(default_factory=distributed.DistInfo)
    resume_state: CheckpointState | None = None
    resume_tensors: dict = field(default_factory=dict)
    resumed_from: Path | None = None  # the checkpoint resume_state came from
    setup_times: dict = field(default_factory=dict)  # read_s, tokenizer_s, tokenize_s, model_s (seconds)
    data_root: Path | None = None  # the prepared dataset trained on (None: conversations)
    lock: RunLock | None = None  # rank 0's hold on RUN/train.lock, released when the Trainer ends
    pending: list = field(default_factory=list)  # writes a resume defers to its first save (commit_files)

    def commit_files(self) -> None:
        """Write what a resume deferred (config.yaml, tokenizer.json): called before its first checkpoint, so
        a resume that fails earlier leaves the run directory as it was."""
        for write in self.pending:
            write()
        self.pending = []

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _tokenizer_source(cfg, run_dir, source_ckpt, tokenizer_path) -> Path | None:
    """The tokenizer.json a run must use (given, or the one its checkpoint was trained with); None: the
    data's own. Every rank finds the same path by itself (no collective)."""
    source = tokenizer_path or (Path(cfg.data.tokenizer) if cfg.data.tokenizer else None)
    if source is None and source_ckpt:  # the tokenizer the checkpoint was trained with
        source = find_tokenizer(RunDir.of_checkpoint(source_ckpt), source_ckpt)
        if source is None and RunDir(run_dir).tokenizer.is_file():
            source = RunDir(run_dir).tokenizer
    return source


def _conversation_tokenizer(cfg, run_dir, source_ckpt, tokenizer_path, texts, info):
    """For fine-tuning on conversations: rank 0 loads the run's tokenizer (or trains one on the
    conversations' text); the others receive its JSON."""
    from tokenizers import Tokenizer

    text = None
    if info.main:
        source = _tokenizer_source(cfg, run_dir, source_ckpt, tokenizer_path)
        if source is not None:
            if not Path(source).is_file():
                raise GptossError(f"tokenizer: {source} does not exist")
            tok = load_tokenizer(Path(source))
            check_vocab(tok, cfg.model.vocab_size, str(source))
        else:
            tok = train_tokenizer(texts, cfg.model.vocab_size)
            if tok.get_vocab_size() < cfg.model.vocab_size:
                warn(
                    f"the corpus fills only {tok.get_vocab_size()} of {cfg.model.vocab_size} vocabulary entries; "
                    "the model keeps model.vocab_size"
                )
        text = tok.to_str()
    return Tokenizer.from_str(distributed.broadcast_object(text, info))


def _accumulation(cfg: RunConfig, world: int) -> int:
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


def _source_run(checkpoint: Path | None) -> Path | None:
    """RUN for RUN/checkpoints/step-N (where an imported chat template lives), else None."""
    if checkpoint is None or RunDir.of_checkpoint(checkpoint).path == checkpoint:
        return None
    return RunDir.of_checkpoint(checkpoint).path


def prepare(
    cfg: RunConfig,
    run_dir: Path | None,
    resume: bool = False,
    resume_from: Path | None = None,
    tokenizer_path: Path | None = None,
    init_from: Path | None = None,
    progress: bool = True,
) -> Prepared:
    """Set up a run. `resume`/`resume_from` continue a checkpoint exactly (weights, optimizer, data
    position); `init_from` starts a new run (step 0, fresh optimizer) from a checkpoint's weights.
    `progress`: progress bars (stderr) while the data is prepared.

    The run directory is locked (RUN/train.lock) from here until the Trainer ends (Prepared.release); a
    resume changes nothing in it until everything it needs is loaded and verified."""
    held: list[RunLock | None] = []
    try:
        return _prepare(cfg, run_dir, resume, resume_from, tokenizer_path, init_from, progress, held)
    except BaseException:
        for lock in held:
            if lock is not None:
                lock.release()
        raise


def total_steps(t: TrainConfig, batches_per_epoch: int, accum: int) -> int:
    """The run's optimizer steps: train.max_steps, else train.epochs passes of accum micro-batches a step."""
    return t.max_steps or max(1, t.epochs * batches_per_epoch // accum)


def _prepare(
    cfg: RunConfig,
    run_dir: Path | None,
    resume: bool,
    resume_from: Path | None,
    tokenizer_path: Path | None,
    init_from: Path | None,
    progress: bool,
    held: list,
) -> Prepared:
    t = cfg.train
    if init_from is not None and (resume or resume_from):
        raise GptossError("--init-from starts a new run from weights; it cannot be combined with --resume")
    cfg.validate_for_training()
    flag = "--resume-from" if resume_from else "--resume"
    device = pick_device(t.device, "train.device")
    info = distributed.init(device.type, t.parallel)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    distributed.check_same_config(cfg.to_dict(), info)

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
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise GptossError(f"--run {run_dir} exists and is not a directory")
    run = RunDir(run_dir)
    # An existing run is locked before anything else looks at it (rank 0 decides: every rank must take part
    # in _take_lock's broadcast at the same point).
    if distributed.broadcast_object(run_dir.is_dir() if info.main else None, info):
        held.append(_take_lock(run, info))
    if resume_ckpt is None and ckpt.list_checkpoints(run.checkpoints):
        raise GptossError(f"{run_dir} already holds checkpoints: add --resume to continue it, or pick another --run")
    state = ckpt.read_state(resume_ckpt) if resume_ckpt else None
    if state:
        _check_same_model(cfg, state, resume_ckpt, flag)
        if state.optimizer is None:
            raise GptossError(f"{flag}: {resume_ckpt} holds weights only (imported?); use --init-from to train from it")
    init_ckpt = ckpt.resolve_checkpoint(init_from) if init_from is not None else None
    if init_ckpt:
        _check_same_model(cfg, ckpt.read_state(init_ckpt), init_ckpt, "--init-from")
    accum = _accumulation(cfg, info.world)

    chats = conversations.read_conversation_paths(cfg.data.paths) if cfg.data.prepared is None else None
    data_times, data_root = {}, None
    if chats is not None:  # supervised fine-tuning: the loss on assistant tokens, conversations packed per row
        train_chats, val_chats = split_documents(chats, cfg.data.val_fraction, t.seed)
        tok = _conversation_tokenizer(
            cfg, run_dir, resume_ckpt or init_ckpt, tokenizer_path, conversations.conversation_text(train_chats), info
        )
        template_run = _source_run(resume_ckpt or init_ckpt) or run_dir
        tok, train_data, val_data = conversations.conversation_data(
            tok,
            template_run,
            train_chats,
            val_chats,
            t.seq_len,
            t.batch_size * info.world,
            t.seed,
            cfg.model.vocab_size,
            "tokenizer",
        )
        tok_hash = tokenizer_hash(tok)
    else:
        data = open_training_data(
            cfg,
            _tokenizer_source(cfg, run_dir, resume_ckpt or init_ckpt, tokenizer_path),
            info.rank,
            show=progress and info.main,
        )
        tok, data_times, data_root = data.tokenizer, data.times, data.root
        tok_hash = tokenizer_hash(tok)
        # Every rank walks the same global order and draws only its own slice of each global micro-batch.
        train_data = TokenBatches(data.train.arrays, t.seq_len, t.batch_size * info.world, t.seed)
        if train_data.batches_per_epoch < 1:
            raise GptossError(
                f"data: {train_data.tokens} training tokens make {train_data.num_samples} sequences of "
                f"{t.seq_len}+1 tokens, fewer than one batch of {train_data.batch_size}; add text or lower them"
            )
        val_data = None
        val_len = min(t.seq_len, data.val.tokens - 1)
        if val_len >= 2:
            val_data = TokenBatches(data.val.arrays, val_len, t.batch_size, t.seed)
    if state and state.tokenizer_hash not in (None, tok_hash):
        where = f" of {data_root}" if data_root is not None else ""
        raise GptossError(f"{flag}: the tokenizer{where} differs from the one {resume_ckpt} was trained with")
    done = state.step if state else 0
    steps = total_steps(t, train_data.batches_per_epoch, accum)
    if done >= steps:  # before the model is built: a finished run is refused in an instant
        raise GptossError(
            f"{run_dir} already trained {done} of {steps} steps; "
            "raise train.max_steps (e.g. --set train.max_steps=N) to continue"
        )
    if info.main:  # every input is checked; building the model and optimizer takes seconds (imports included)
        console.print(f"building the model for {run_dir} on {device.type}", highlight=False, soft_wrap=True)
    model_start = time.perf_counter()

    if not held:  # a new directory: created by taking its lock, then checked again under it
        held.append(_take_lock(run, info))
        if resume_ckpt is None and ckpt.list_checkpoints(run.checkpoints):
            raise GptossError(
                f"{run_dir} already holds checkpoints: add --resume to continue it, or pick another --run"
            )
    # A new run writes its config and tokenizer now; a resume only once it saves (Prepared.commit_files),
    # so a resume that fails (bad weights, divergence) leaves RUN/ exactly as it was.
    pending = [lambda: run.write_config(cfg), lambda: write_atomic(run.tokenizer, tok.to_str())] if info.main else []
    template = RunDir(_source_run(init_ckpt) or run_dir).chat_template
    if info.main and template.is_file() and template.parent != run_dir:  # the chat template of an imported model
        pending.append(lambda: write_atomic(run.chat_template, template.read_text(encoding="utf-8")))
    if not state:
        for write in pending:
            write()
        pending = []
    distributed.barrier(info)

    torch.manual_seed(t.seed)
    model = Transformer(cfg.model)
    model.init_weights(torch.Generator().manual_seed(t.seed))  # same seed, same weights on every rank
    if resume_ckpt or init_ckpt:
        ckpt.load_weights(model, (resume_ckpt or init_ckpt) / "model.safetensors")
        bad = ckpt.first_non_finite(dict(model.named_parameters()))
        if bad is not None:
            where = flag if resume_ckpt else "--init-from"
            raise GptossError(
                f"{where}: {resume_ckpt or init_ckpt} holds non-finite weights ({bad}); "
                f"{ckpt.newest_finite_text(RunDir.of_checkpoint(resume_ckpt or init_ckpt).checkpoints)}"
                " (pass it to --resume-from)"
            )
        if init_ckpt and info.main:
            console.print(f"starting from the weights of {init_ckpt}")
    bf16_ok = native_bf16(device)
    if device.type == "cuda" and not bf16_ok and t.precision in ("bf16", "bf16-mixed"):
        raise GptossError(
            f"train.precision: {torch.cuda.get_device_name(device)} has no native bf16; use --set train.precision=fp32"
        )
    precision = resolve_precision(t.precision, bf16_ok)
    place_model(model, t, precision, device)
    mixed = precision == "bf16-mixed" and device.type == "cuda"
    wrapped = distributed.wrap(model, info, device, mixed_bf16=mixed)
    optimizer = build_optimizer(model, t, device)  # after fully_shard: FSDP2 parameters are DTensors
    tensors = {}
    if resume_ckpt:
        tensors = ckpt.read_trainer_tensors(resume_ckpt)
        distributed.load_optimizer_state(model, optimizer, ckpt.optimizer_from_tensors(tensors, state.optimizer))
    times = {**data_times, "model_s": time.perf_counter() - model_start}
    return Prepared(
        cfg,
        run_dir,
        device,
        model,
        wrapped,
        optimizer,
        train_data,
        val_data,
        tok_hash,
        accum,
        precision,
        info,
        state,
        tensors,
        resume_ckpt,
        times,
        data_root,
        held[0],
        pending,
    )


def place_model(model: Transformer, t: TrainConfig, precision: str, device: torch.device) -> None:
    """Dtype, device, activation checkpointing and compile, applied from outside the model in
    torchtitan's order (parallelism comes after, in distributed.wrap)."""
    if precision == "bf16":  # bf16 weights, grads and AdamW state, but for what the precision policy keeps fp32
        apply_precision(model, torch.bfloat16)
    model.to(device)
    if t.activation_checkpointing:
        checkpoint_blocks(model)
    if t.compile:
        for blk in model.block:  # per block, as torchtitan: names and state dicts stay unchanged
            blk.compile()


def checkpoint_blocks(model: Transformer) -> None:
    """Activation checkpointing from outside: each block's forward is recomputed in backward."""
    from torch.utils.checkpoint import checkpoint

    for blk in model.block:
        inner = blk.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        blk.forward = forward
