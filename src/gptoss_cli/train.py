"""`gptoss train`: from a config to a trained run directory.

Set-up (documents, split, tokenizer, token cache, model, AdamW) happens in `prepare`; `Trainer.run`
is the loop: gradient accumulation, autocast, clipping, the MoE auxiliary losses, logging, evaluation,
checkpoints on schedule / at the end / on Ctrl-C or SIGTERM, and exact resume. What the loop writes is
described in rundir.py; the metric fields are those of `_log_line` and `_evaluate`.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import RunConfig, save_config
from .data import TokenBatches, load_documents, split_documents, tokenize_stream
from .errors import GptossError
from .memory import MemorySampler
from .model import Transformer
from .optim import build_optimizer, lr_at
from .output import console, warn
from .rundir import new_run_dir
from .sizing import resolve_precision
from .tokenizer import check_vocab, load_tokenizer, tokenizer_hash, train_tokenizer

# Model fields that only choose a kernel: a checkpoint resumes under either setting.
KERNEL_FIELDS = ("attention_backend", "moe_backend")


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise GptossError("train.device: cuda requested but torch sees no CUDA device (see `gptoss env`)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _check_resumable(cfg: RunConfig, state: dict, where: Path) -> None:
    saved = dict(state["config"]["model"])
    now = cfg.to_dict()["model"]
    for key in saved.keys() | now.keys():
        if key not in KERNEL_FIELDS and saved.get(key) != now.get(key):
            raise GptossError(
                f"--resume: {where} was trained with model.{key}={saved.get(key)!r}, the config has {now.get(key)!r}"
            )


@dataclass
class Prepared:
    cfg: RunConfig
    run_dir: Path
    device: torch.device
    model: Transformer
    optimizer: torch.optim.AdamW
    train_data: TokenBatches
    val_data: TokenBatches | None
    tok_hash: str
    resume_state: dict | None = None
    resume_tensors: dict = field(default_factory=dict)


def prepare(cfg: RunConfig, run_dir: Path | None, resume: bool = False, resume_from: Path | None = None,
            tokenizer_path: Path | None = None) -> Prepared:
    resume_ckpt = None
    if resume or resume_from:
        source = resume_from or run_dir
        if source is None:
            raise GptossError("--resume needs --run DIR (or --resume-from PATH)")
        resume_ckpt = ckpt.resolve_checkpoint(source)
        if run_dir is None:  # a step directory sits in RUN/checkpoints/
            run_dir = resume_ckpt.parent.parent
    if run_dir is None:
        run_dir = new_run_dir(cfg.name)
    run_dir = Path(run_dir)
    if resume_ckpt is None and ckpt.list_checkpoints(run_dir / "checkpoints"):
        raise GptossError(f"{run_dir} already holds checkpoints: add --resume to continue it, or pick another --run")
    state = ckpt.read_state(resume_ckpt) if resume_ckpt else None
    if state:
        _check_resumable(cfg, state, resume_ckpt)

    t = cfg.train
    device = pick_device(t.device)
    docs = load_documents(cfg.data.paths)
    train_docs, val_docs = split_documents(docs, cfg.data.val_fraction, t.seed)

    # Tokenizer: --tokenizer, then data.tokenizer, then the run's own (resume), else train one.
    tok_source = tokenizer_path or (Path(cfg.data.tokenizer) if cfg.data.tokenizer else None)
    if tok_source is None and resume_ckpt and (run_dir / "tokenizer.json").is_file():
        tok_source = run_dir / "tokenizer.json"
    if tok_source is not None:
        if not Path(tok_source).is_file():
            raise GptossError(f"tokenizer: {tok_source} does not exist")
        tok = load_tokenizer(Path(tok_source))
        check_vocab(tok, cfg.model.vocab_size, str(tok_source))
    else:
        tok = train_tokenizer(train_docs, cfg.model.vocab_size)
        if tok.get_vocab_size() < cfg.model.vocab_size:
            warn(f"the corpus fills only {tok.get_vocab_size()} of {cfg.model.vocab_size} vocabulary entries; "
                 "the model keeps model.vocab_size")
    tok_hash = tokenizer_hash(tok)
    if state and state.get("tokenizer_hash") not in (None, tok_hash):
        raise GptossError(f"--resume: the tokenizer differs from the one {resume_ckpt} was trained with")

    train_stream = tokenize_stream(train_docs, tok, tok_hash)
    train_data = TokenBatches(train_stream, t.seq_len, t.batch_size, t.seed)
    if train_data.batches_per_epoch < 1:
        raise GptossError(
            f"data: {train_stream.numel()} training tokens make {train_data.num_samples} sequences of "
            f"{t.seq_len}+1 tokens, fewer than train.batch_size={t.batch_size}; add text or lower them"
        )
    val_data = None
    if val_docs:
        val_stream = tokenize_stream(val_docs, tok, tok_hash)
        val_len = min(t.seq_len, val_stream.numel() - 1)
        if val_len >= 2:
            val_data = TokenBatches(val_stream, val_len, t.batch_size, t.seed)

    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    _write_atomic(run_dir / "tokenizer.json", tok.to_str())

    torch.manual_seed(t.seed)
    random.seed(t.seed)
    model = Transformer(cfg.model)
    model.init_weights(torch.Generator().manual_seed(t.seed))
    precision = resolve_precision(t.precision, device.type == "cuda")
    if precision.name == "bf16":  # bf16 weights, grads and AdamW state; the norm scales stay fp32
        model.to(torch.bfloat16)
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.data = p.data.float()
    model.to(device)
    optimizer = build_optimizer(model, t, device)
    tensors = {}
    if resume_ckpt:
        ckpt.load_weights(model, resume_ckpt / "model.safetensors")
        tensors = ckpt.read_trainer_tensors(resume_ckpt)
        ckpt.optimizer_from_tensors(optimizer, tensors, state["optimizer"])  # moved to each param's device
        console.print(f"resuming from {resume_ckpt} (step {state['step']})")
    return Prepared(cfg, run_dir, device, model, optimizer, train_data, val_data, tok_hash, state, tensors)


class StopRequest:
    """Ctrl-C / SIGTERM set a flag: the loop finishes its step, saves, and exits. A second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        console.print("[yellow]stop requested: finishing this step and saving a checkpoint "
                      "(Ctrl-C again to abort without saving)[/]")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, p: Prepared, stop_after: int | None = None):
        self.p = p
        self.cfg = p.cfg
        self.t = p.cfg.train
        self.model = p.model
        self.device = p.device
        self.stop_after = stop_after  # tests: behave as if Ctrl-C arrived after this many steps
        precision = resolve_precision(self.t.precision, p.device.type == "cuda")
        self.precision = precision.name
        self.autocast = (torch.autocast(p.device.type, dtype=torch.bfloat16)
                         if precision.name == "bf16-mixed" else nullcontext())
        per_epoch = p.train_data.batches_per_epoch
        self.total_steps = self.t.max_steps or max(1, self.t.epochs * per_epoch // self.t.grad_accum_steps)
        s = p.resume_state or {}
        self.step = s.get("step", 0)
        self.epoch = s.get("epoch", 0)
        self.batch_idx = s.get("batch_idx", 0)
        self.tokens = s.get("tokens", 0)
        self.best_val = s.get("best_val_loss", math.inf)
        self.epoch_loss = s.get("epoch_loss", [0.0, 0])  # running [sum, count] of the current epoch
        self.elapsed_before = s.get("elapsed_s", 0.0)
        if p.resume_state:
            self._restore_rng(p.resume_state, p.resume_tensors)
        self.last_ckpt: Path | None = None
        self.final_val = s.get("final_val_loss")
        if self.t.activation_checkpointing:
            self._checkpoint_blocks()
        if self.t.compile:
            for blk in self.model.block:  # per block, as torchtitan: names and state dicts stay unchanged
                blk.compile()

    # ---- pieces applied from outside the model --------------------------------------------------
    def _checkpoint_blocks(self) -> None:
        from torch.utils.checkpoint import checkpoint

        for blk in self.model.block:
            inner = blk.forward

            def forward(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            blk.forward = forward

    def _restore_rng(self, state: dict, tensors: dict) -> None:
        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))

    # ---- one micro-batch --------------------------------------------------------------------------
    def _forward(self, inputs, targets):
        with self.autocast:
            out = self.model(inputs)
        lm = F.cross_entropy(out.logits.view(-1, out.logits.shape[-1]), targets.reshape(-1))
        loss = lm + self.t.aux_loss_coef * out.aux_loss + self.t.z_loss_coef * out.z_loss
        acc = (out.logits.argmax(-1) == targets).float().mean()
        return loss, lm, out, acc

    @torch.no_grad()
    def _evaluate(self) -> dict | None:
        if self.p.val_data is None:
            return None
        self.model.eval()
        total, count, correct = 0.0, 0, 0.0
        for inputs, targets in self.p.val_data.eval_batches(self.t.eval_batches):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            _, lm, _, acc = self._forward(inputs, targets)
            total += lm.item() * targets.numel()
            correct += acc.item() * targets.numel()
            count += targets.numel()
        self.model.train()
        loss = total / count
        self.best_val = min(self.best_val, loss)
        self.final_val = loss
        return {"kind": "eval", "step": self.step, "epoch": self.epoch, "val_loss": loss,
                "val_ppl": math.exp(min(loss, 50)), "val_accuracy": correct / count,
                "elapsed_s": self.elapsed()}

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start

    # ---- checkpoints ------------------------------------------------------------------------------
    def save(self) -> Path:
        opt_tensors, opt_meta = ckpt.optimizer_to_tensors(self.p.optimizer)
        tensors = dict(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"format": 1, "step": self.step, "epoch": self.epoch, "batch_idx": self.batch_idx,
                 "tokens": self.tokens, "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
                 "final_val_loss": self.final_val, "epoch_loss": self.epoch_loss, "elapsed_s": self.elapsed(),
                 "tokenizer_hash": self.p.tok_hash,
                 "python_rng": list(random.getstate()), "optimizer": opt_meta, "config": self.cfg.to_dict()}
        if state["best_val_loss"] is None:
            state.pop("best_val_loss")
        self.last_ckpt = ckpt.save_checkpoint(self.p.run_dir / "checkpoints", self.step,
                                              ckpt.weights_state_dict(self.model), tensors, state,
                                              self.t.keep_checkpoints)
        return self.last_ckpt

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        t, data = self.t, self.p.train_data
        self.start = time.time()
        metrics = open(self.p.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        memory = MemorySampler(self.p.run_dir / "memory.jsonl", self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        console.print(f"run {self.p.run_dir}: {self.total_steps} steps of {t.batch_size} x {t.seq_len} tokens "
                      f"x {t.grad_accum_steps} accumulation on {self.device} ({self.precision})")
        window = _Window(self.cfg.model.num_hidden_layers, self.cfg.model.num_experts, self.device)
        status = "completed"
        columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        self.model.train()
        try:
            with StopRequest() as stop, Progress(*columns, console=console, transient=True) as bar:
                task = bar.add_task("training", total=self.total_steps, completed=self.step, info="")
                while self.step < self.total_steps:
                    self._step(data, window)
                    memory.sample(self.step)
                    bar.update(task, completed=self.step,
                               info=f"loss {window.last_loss:.3f}  {window.last_tps:,.0f} tok/s")
                    if self.step % t.log_every == 0 or self.step == self.total_steps:
                        line = window.flush(self)
                        metrics.write(json.dumps(line) + "\n")
                        metrics.flush()
                        bar.console.print(f"Epoch {line['epoch']}, Step {line['step']}: Loss={line['loss']:.4f}, "
                                          f"PPL={line['ppl']:.2f}, Acc={line['accuracy']:.3f}, LR={line['lr']:.2e}",
                                          highlight=False)
                    if self.step % t.eval_every == 0 or self.step == self.total_steps:
                        ev = self._evaluate()
                        if ev:
                            metrics.write(json.dumps(ev) + "\n")
                            metrics.flush()
                            bar.console.print(f"  validation: loss {ev['val_loss']:.4f}, ppl {ev['val_ppl']:.2f}",
                                              highlight=False)
                    if stop.requested or (self.stop_after is not None and self.step >= self.stop_after):
                        status = "interrupted"
                        break
                    if self.step % t.save_every == 0 and self.step < self.total_steps:
                        self.save()
            self.save()
        except torch.cuda.OutOfMemoryError:
            peak = torch.cuda.max_memory_allocated(self.device) / 1024**3
            raise GptossError(
                f"CUDA out of memory at step {self.step + 1} (peak {peak:.1f} GiB): lower train.batch_size and "
                "raise train.grad_accum_steps, or set train.activation_checkpointing=true"
            ) from None
        finally:
            metrics.close()
            peak = memory.peak_bytes()
            memory.close()
        summary = {"status": status, "steps": self.step, "epochs": self.epoch, "elapsed_s": self.elapsed(),
                   "tokens": self.tokens, "tokens_per_s": self.tokens / max(self.elapsed(), 1e-9),
                   "final_loss": window.final_loss, "best_val_loss": self.best_val if math.isfinite(self.best_val)
                   else None, "final_val_loss": self.final_val, "peak_memory_bytes": peak,
                   "device": self.device.type, "precision": self.precision, "run_dir": str(self.p.run_dir),
                   "checkpoint": str(self.last_ckpt) if self.last_ckpt else None}
        _write_atomic(self.p.run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary

    def _step(self, data: TokenBatches, window: _Window) -> None:
        t, opt = self.t, self.p.optimizer
        lr = lr_at(self.step, t, self.total_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        for _ in range(t.grad_accum_steps):
            inputs, targets = data.batch(self.epoch, self.batch_idx)
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            loss, lm, out, acc = self._forward(inputs, targets)
            (loss / t.grad_accum_steps).backward()
            lm_value = lm.item()  # one host sync per micro-batch: catches a NaN before it reaches the weights
            if not math.isfinite(lm_value):
                where = f"; the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else ""
                raise GptossError(f"non-finite loss ({lm_value}) at step {self.step + 1}{where}")
            self.batch_idx += 1
            self.tokens += targets.numel()
            self.epoch_loss = [self.epoch_loss[0] + lm_value, self.epoch_loss[1] + 1]
            window.add(lm_value, out, acc, targets.numel())
            if self.batch_idx >= data.batches_per_epoch:
                self._end_epoch()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.step += 1
        window.lr, window.grad_norm = lr, grad_norm

    def _end_epoch(self) -> None:
        total, n = self.epoch_loss
        console.print(f"Epoch {self.epoch} completed. Average Loss: {total / max(n, 1):.4f}", highlight=False)
        self.epoch += 1
        self.batch_idx = 0
        self.epoch_loss = [0.0, 0]


class _Window:
    """Sums over one logging interval (device tensors where possible: no extra host syncs)."""

    def __init__(self, layers: int, experts: int, device: torch.device):
        self.shape = (layers, experts)
        self.device = device
        self.final_loss = None
        self.last_loss, self.last_tps = math.nan, 0.0
        self._reset()

    def _reset(self):
        self.loss = self.n = self.tokens = 0
        self.aux = torch.zeros((), device=self.device)
        self.z = torch.zeros((), device=self.device)
        self.acc = torch.zeros((), device=self.device)
        self.counts = torch.zeros(self.shape, dtype=torch.long, device=self.device)
        self.t0 = time.time()

    def add(self, lm: float, out, acc, tokens: int) -> None:
        self.loss += lm
        self.n += 1
        self.tokens += tokens
        self.aux += out.aux_loss.detach().float()
        self.z += out.z_loss.detach().float()
        self.acc += acc.detach()
        self.counts += out.expert_counts
        self.last_loss = lm
        self.last_tps = self.tokens / max(time.time() - self.t0, 1e-9)

    def flush(self, tr: Trainer) -> dict:
        n = max(self.n, 1)
        loss = self.loss / n
        self.final_loss = loss
        line = {"kind": "train", "step": tr.step, "epoch": tr.epoch, "loss": loss,
                "aux_loss": self.aux.item() / n, "z_loss": self.z.item() / n, "ppl": math.exp(min(loss, 50)),
                "accuracy": self.acc.item() / n, "lr": self.lr, "grad_norm": float(self.grad_norm),
                "tokens_per_s": self.tokens / max(time.time() - self.t0, 1e-9), "tokens": tr.tokens,
                "elapsed_s": tr.elapsed(), "expert_counts": self.counts.tolist()}
        self._reset()
        return line
