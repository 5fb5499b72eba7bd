"""`gptoss train`: the training loop, from a prepared run (setup.py) to checkpoints and metrics.

Gradient accumulation, autocast, clipping, the MoE auxiliary losses, logging, evaluation, checkpoints on
schedule / at the end / on Ctrl-C or SIGTERM, and exact resume. Under torchrun every rank runs this loop
on its slice of each global batch; rank 0 alone prints and writes metrics and checkpoints, and memory is
sampled on every rank. The run directory layout is in run/layout.py.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from ..atomic import write_atomic
from ..data.batches import TokenBatches
from ..errors import GptossError
from ..memory import MemorySampler, peak_rss, release_freed_memory_if_due
from ..model.cross_entropy import IGNORE_INDEX
from ..output import console, warn
from ..run import checkpoint as ckpt
from ..run.metrics import MetricsFile
from ..threads import describe
from ..transforms import trainable
from . import distributed
from .loggers import Loggers
from .lora import checkpoint_weights, start_line
from .loss import objective
from .optim import lr_at, schedule_warnings
from .setup import TrainingSetup, setup_training, total_steps, training_autocast
from .signals import StopRequest
from .window import MetricsWindow, Position

__all__ = ["Trainer", "setup_training"]


class Trainer:
    def __init__(self, p: TrainingSetup, stop_after: int | None = None):
        self.p = p
        self.files = p.run
        self.cfg = p.cfg
        self.t = p.cfg.train
        self.dist = p.dist
        self.model = p.model
        self.device = p.device
        self.accum = p.grad_accum_steps
        self.stop_after = stop_after  # tests: behave as if Ctrl-C arrived after this many steps
        self.precision = p.precision
        self.autocast = training_autocast(self.precision, p.device, self.dist)
        per_epoch = p.train_data.batches_per_epoch
        self.total_steps = total_steps(self.t, per_epoch, self.accum)
        s = p.resume_state or ckpt.CheckpointState()
        self.step = s.step
        self.epoch = s.epoch or 0
        self.batch_idx = s.batch_idx or 0
        self.tokens = s.tokens or 0
        self.tokens_before = self.tokens  # what earlier sessions of a resumed run trained
        self.best_val = s.best_val_loss or math.inf
        self.final_val = s.final_val_loss
        self.epoch_loss = s.epoch_loss or [0.0, 0]  # running [sum, count] of the current epoch
        self.elapsed_before = s.elapsed_s or 0.0
        if p.resume_state:
            self._restore_rng(p.resume_state, p.resume_tensors)
        self.last_ckpt: Path | None = None
        if self.dist.main:
            for message in schedule_warnings(self.t, self.total_steps, self.accum, per_epoch, p.resume_state):
                warn(message)

    def _restore_rng(self, state: ckpt.CheckpointState, tensors: dict) -> None:
        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        version, internal, gauss = state.python_rng
        random.setstate((version, tuple(internal), gauss))

    def say(self, text: str) -> None:
        if self.dist.main:
            console.print(text, highlight=False)

    @torch.no_grad()
    def _evaluate(self) -> dict | None:
        """Fixed validation batches; every rank runs all of them (FSDP needs every rank in each forward)."""
        if self.p.val_data is None:
            return None
        self.p.wrapped.eval()
        total, count, correct = 0.0, 0, 0.0
        for inputs, targets, *layout in self.p.val_data.eval_batches(self.t.eval_batches):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            layout = [x.to(self.device) for x in layout]  # conversations: positions, segments
            _, lm, acc, _ = objective(self.p.wrapped, inputs, targets, self.t, self.autocast, *layout)
            counted = int((targets != IGNORE_INDEX).sum())  # every target, except the masked ones of conversations
            if not counted:
                continue
            total += lm.item() * counted
            correct += acc.item() * counted
            count += counted
        self.p.wrapped.train()
        loss = total / count
        if self.step > 0:  # the untrained model's loss is a reference, not a result
            self.best_val = min(self.best_val, loss)
            self.final_val = loss
        return {
            "kind": "eval",
            "step": self.step,
            "epoch": self.epoch,
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50)),
            "val_accuracy": correct / count,
            "elapsed_s": self.elapsed(),
        }

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start

    def _position(self) -> Position:
        return Position(self.step, self.precision, self.epoch, self.epochs_done, self.tokens, self.elapsed())

    @property
    def epochs_done(self) -> float:
        """Passes over the training data so far, a fraction of the current one included (0.35 after a
        third of the first epoch): what "epochs" means in metrics.jsonl and summary.json."""
        return self.epoch + self.batch_idx / self.p.train_data.batches_per_epoch

    # ---- checkpoints ------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Every rank takes part in gathering the state; rank 0 writes it. Non-finite weights are never
        saved: every rank checks its own (shard of the) parameters and all agree before any gather."""
        bad = next(  # only what trains can have changed (a LoRA run's frozen base was checked when loaded)
            (
                name
                for name, param in trainable(self.model)
                if not bool(torch.isfinite(param.to_local() if hasattr(param, "to_local") else param).all())
            ),
            None,
        )
        if distributed.all_reduce(torch.tensor([float(bad is not None)]), self.dist)[0] > 0:
            raise GptossError(
                f"refusing to save a checkpoint at step {self.step}: the weights hold non-finite "
                f"values ({bad or 'on another rank'}); "
                f"{ckpt.newest_finite_text(self.files.checkpoints)}"
            )
        # Both gathers are collectives under FSDP; with cpu_offload only rank 0 receives the tensors.
        weights = checkpoint_weights(self.model, self.cfg)  # a LoRA run's: its adapters alone
        osd = distributed.full_optimizer_state(self.model, self.p.optimizer)
        if self.dist.main:
            self.p.commit_files()  # a resume's deferred config.yaml / tokenizer.json, before its first checkpoint
            tensors, opt_meta = ckpt.optimizer_to_tensors(osd)
            tensors["rng.torch"] = torch.get_rng_state()
            if self.device.type == "cuda":
                tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
            state = ckpt.CheckpointState(
                step=self.step,
                epoch=self.epoch,
                batch_idx=self.batch_idx,
                tokens=self.tokens,
                final_val_loss=self.final_val,
                epoch_loss=self.epoch_loss,
                elapsed_s=self.elapsed(),
                tokenizer_hash=self.p.tok_hash,
                world_size=self.dist.world,
                python_rng=list(random.getstate()),
                optimizer=opt_meta,
                config=self.cfg.to_dict(),
                best_val_loss=self.best_val if math.isfinite(self.best_val) else None,
                base=self.p.base,
            )
            self.last_ckpt = ckpt.save_checkpoint(
                self.files.checkpoints, self.step, weights, tensors, state, self.t.keep_checkpoints
            )
        distributed.barrier(self.dist)
        return self.last_ckpt

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to the end (or to a stop request) and write summary.json; the run's lock is released after
        the last write, or when an error ends the run."""
        try:
            return self._run()
        finally:
            self.p.release()

    def _run(self) -> dict:
        main = self.dist.main
        self.start = time.time()
        self._announce()
        resumed = self.p.resume_state.step if self.p.resume_state else None
        metrics = MetricsFile(self.files.metrics, cut_after=resumed) if main else None  # cut at the first line
        memory = MemorySampler(self.files.memory, self.device, rank=self.dist.rank)
        trackers = Loggers(self.cfg, self.files, self.step, warn, enabled=main)  # train.loggers, rank 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        window = MetricsWindow(self.cfg.model.num_hidden_layers, self.cfg.model.num_experts, self.device)
        self.p.wrapped.train()
        try:
            # The final save runs under the stop handler too: a second Ctrl-C during it exits 130 at once.
            with StopRequest(announce=main) as stop:
                with _progress(disable=not main) as bar:
                    status, stop_signal = self._loop(stop, bar, window, metrics, trackers, memory)
                self.save()
        except torch.cuda.OutOfMemoryError:
            peak = torch.cuda.max_memory_allocated(self.device) / 1024**3
            raise GptossError(
                f"CUDA out of memory at step {self.step + 1} (peak {peak:.1f} GiB): lower train.batch_size and "
                "raise train.grad_accum_steps, or set train.activation_checkpointing=true"
            ) from None
        finally:
            if metrics:
                metrics.close()
            trackers.close()
            peak = memory.peak_bytes()
            if self.device.type == "cpu":  # the highest RSS of the whole process, data preparation included
                peak = max(peak, peak_rss())
            memory.close()
        summary = self._summary(status, stop_signal, window, peak)
        if main:
            write_atomic(self.files.summary, json.dumps(summary, indent=1))
        return summary

    def _announce(self) -> None:
        """The lines before the first step: resume point, setup times, the run's shape."""
        t, world = self.t, self.dist.world
        if self.p.resumed_from is not None:
            self.say(f"resuming from {self.p.resumed_from} (step {self.step})")
        setup = self.p.setup_times
        if setup:
            data = f" (data {self.p.data_root})" if self.p.data_root is not None else ""
            self.say("setup: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in setup.items()) + data)
        self.say(
            f"run {self.files}: {self.total_steps} steps; global batch {t.batch_size} x {self.accum} "
            f"accumulation x {world} process{'es' if world > 1 else ''} = {t.batch_size * self.accum * world} "
            f"sequences of {t.seq_len} tokens; {self.device} ({self.precision}"
            f"{', ' + self.dist.parallel if world > 1 else ''}"
            f"{'; ' + describe() if self.device.type == 'cpu' else ''})"
        )
        if self.cfg.lora.enabled and self.dist.main:
            self.say(start_line(self.cfg, self.model, self.precision, self.device, self.p.base_checkpoint))

    def _loop(self, stop, bar, window, metrics, trackers, memory) -> tuple[str, str | None]:
        """Steps until the end or a stop request; returns (status, the signal that stopped it)."""
        t, data = self.t, self.p.train_data
        task = bar.add_task("training", total=self.total_steps, completed=self.step, info="")
        if self.step == 0 and self.p.started_from is not None:  # a fine-tune: the loss it starts from
            start = f"Step 0 (the weights of {self.p.started_from}): validation loss {{loss:.4f}}, ppl {{ppl:.2f}}"
            self._log_eval(bar, metrics, trackers, start)
        elif self.step == 0:  # the untrained loss, which a user checks against ln(vocab_size)
            ln_v = math.log(self.cfg.model.vocab_size)
            untrained = "Step 0 (untrained): validation loss {loss:.4f}, ppl {ppl:.2f}; "
            self._log_eval(bar, metrics, trackers, untrained + f"ln(vocab_size) = {ln_v:.4f}")
        while self.step < self.total_steps:
            step_start = time.perf_counter()
            stopping = self._step(data, window, stop)
            stop.step_s = time.perf_counter() - step_start
            if self.device.type == "cpu":
                release_freed_memory_if_due()
            sample = memory.sample(self.step)
            bar.update(task, completed=self.step, info=f"loss {window.last_loss:.3f}  {window.last_tps:,.0f} tok/s")
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                self._log_train(bar, metrics, trackers, window, sample)
            if self.step % t.eval_every == 0 or self.step == self.total_steps:
                self._log_eval(bar, metrics, trackers, "  validation: loss {loss:.4f}, ppl {ppl:.2f}")
            if stopping or (self.stop_after is not None and self.step >= self.stop_after):
                if window.n:  # steps since the last logged one: their line, so the summary has a final loss
                    self._log_train(bar, metrics, trackers, window, sample)
                return "interrupted", stop.signal or "SIGTERM" if stopping else None
            if self.step % t.save_every == 0 and self.step < self.total_steps:
                self.save()
        return "completed", None

    def _log_train(self, bar, metrics, trackers, window, sample) -> None:
        line = window.flush(self._position(), self.dist)
        if not self.dist.main:
            return
        metrics.write(json.dumps(line) + "\n")
        metrics.flush()
        trackers.log(line, sample)
        bar.console.print(
            f"Epoch {line['epoch']}, Step {line['step']}: Loss={line['loss']:.4f}, PPL={line['ppl']:.2f}, "
            f"Acc={line['accuracy']:.3f}, LR={line['lr']:.2e}",
            highlight=False,
        )

    def _log_eval(self, bar, metrics, trackers, template: str) -> None:
        """A validation pass (every rank), written and printed with `template` by rank 0."""
        ev = self._evaluate()
        if not ev or not self.dist.main:
            return
        metrics.write(json.dumps(ev) + "\n")
        metrics.flush()
        trackers.log(ev)
        bar.console.print(template.format(loss=ev["val_loss"], ppl=ev["val_ppl"]), highlight=False)

    def _summary(self, status: str, stop_signal: str | None, window: MetricsWindow, peak: int) -> dict:
        return {
            "status": status,
            "signal": stop_signal,
            "steps": self.step,
            "epochs": self.epochs_done,
            "elapsed_s": self.elapsed(),
            "tokens": self.tokens,
            # this session's rate: a resumed run's earlier sessions have their own time
            "tokens_per_s": (self.tokens - self.tokens_before) / max(time.time() - self.start, 1e-9),
            "session_tokens": self.tokens - self.tokens_before,
            "session_s": time.time() - self.start,
            "final_loss": window.final_loss,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "final_val_loss": self.final_val,
            "peak_memory_bytes": peak,
            "device": self.device.type,
            "precision": self.precision,
            "world_size": self.dist.world,
            "run_dir": str(self.files),
            "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
            "setup_s": dict(self.p.setup_times),
            "data": str(self.p.data_root) if self.p.data_root else None,
        }

    def _step(self, data: TokenBatches, window: MetricsWindow, stop: StopRequest) -> bool:
        """One optimizer step over `accum` micro-batches. Returns whether any rank asked to stop.

        Nothing non-finite reaches the weights: a NaN/inf loss or gradient norm (the global norm, the same
        on every rank) ends training before optimizer.step, naming the newest finite checkpoint."""
        t, opt, info = self.t, self.p.optimizer, self.dist
        lr = lr_at(self.step, t, self.total_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        lm_sum, bad, bad_value = 0.0, 0, None
        for micro in range(self.accum):
            inputs, targets, *layout = data.batch(self.epoch, self.batch_idx, info.rank, info.world)
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            layout = [x.to(self.device, non_blocking=True) for x in layout]  # conversations: positions, segments
            loss, lm, acc, out = objective(self.p.wrapped, inputs, targets, self.t, self.autocast, *layout)
            with distributed.gradient_sync(self.p.wrapped, info, sync=micro == self.accum - 1):
                (loss / self.accum).backward()
            lm_value = lm.item()  # one host sync per micro-batch: catches a NaN before it reaches the weights
            if not math.isfinite(lm_value):
                bad, bad_value = bad + 1, lm_value
            lm_sum += lm_value
            window.add(out, acc, targets.numel() * info.world)
            self.batch_idx += 1
            self.tokens += targets.numel() * info.world
            if self.batch_idx >= data.batches_per_epoch:
                self._end_epoch()
        # One small collective per step: the global loss, any non-finite loss, any stop request (read now,
        # after this step's micro-batches, so a signal during the step stops at this step, not the next).
        agreed = distributed.all_reduce(torch.tensor([lm_sum, float(bad), float(stop.requested)]), info)
        if agreed[1] > 0:
            value = bad_value if bad_value is not None else "on another rank"
            self._diverged(f"non-finite loss ({value})")
        step_loss = agreed[0].item() / (self.accum * info.world)
        # The norm is computed even when clipping is off (max_norm=inf); it is global under DDP and FSDP,
        # so every rank takes the same decision. A finite loss can still have non-finite gradients.
        grad_norm = distributed.unwrap_norm(
            torch.nn.utils.clip_grad_norm_(self.p.wrapped.parameters(), t.grad_clip or float("inf"))
        )
        norm_value = float(grad_norm)
        if not math.isfinite(norm_value):
            opt.zero_grad(set_to_none=True)
            self._diverged(f"non-finite gradient norm ({norm_value}; loss {step_loss:.4g})")
        self.epoch_loss = [self.epoch_loss[0] + step_loss * self.accum, self.epoch_loss[1] + self.accum]
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.step += 1
        window.end_step(step_loss, self.accum, lr, norm_value)
        return bool(agreed[2] > 0)

    def _diverged(self, what: str) -> None:
        """Training diverged before this step's update: name the step and what survives on disk."""
        raise GptossError(
            f"{what} at step {self.step + 1}; no update was applied; {ckpt.newest_finite_text(self.files.checkpoints)}"
        )

    def _end_epoch(self) -> None:
        total, n = self.epoch_loss
        self.say(f"Epoch {self.epoch} completed. Average Loss: {total / max(n, 1):.4f}")
        self.epoch += 1
        self.batch_idx = 0
        self.epoch_loss = [0.0, 0]


def _progress(disable: bool):
    """The training bar on stderr: steps, loss and tokens/s, elapsed and left (plain lines off a terminal)."""
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..progress import progress

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    return progress(*columns, console=console, transient=True, disable=disable, unit="steps")
