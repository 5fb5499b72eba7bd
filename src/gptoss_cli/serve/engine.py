"""The continuous-batching decode loop behind `gptoss serve`: one thread owns the model.

Requests wait in a bounded queue and join the running batch between decode steps. Each loop iteration
1. drops requests whose client went away (their slot is free for the next one at once),
2. prefills at most `prefill_chunk` prompt tokens: the rest of the joining request's prompt, then (while
   tokens are left) the next waiting requests': those whose whole prompts fit together in one right-padded
   forward (slots.py), each in its own slot, their first tokens sampled at once; a longer one in chunks,
3. runs one (R, 1) decode forward over every running request, each at its own position (compiled.py's
   step, when it is faster), and samples each row with that request's settings and its own generator,
so a long prompt delays the others by one chunk per step, not by its whole prefill. A request leaves
as soon as it hits EOS, a stop id or string, its max_tokens or the context. Each request is a
DecodeState of infer/decode.py, the decode core infer and chat use too: the same sampling on the same
logits, its own generator seeded from its seed, so its tokens are those `gptoss infer` gives alone.

Events go back through each request's `emit` callback (called on this thread; the HTTP side hands them
to its event loop). What can fail for one request (its generator and seed, its sampling, its text, its
callback) is done per request, and when the batched forward fails, every row is run again alone: only
the rows that still fail are answered with an error, so one request cannot end the others' generations.

Log-probabilities (serve/logprobs.py) cost nothing unless asked for: `logprobs` adds one to each Token
event (end-of-text and stop ids too); `echo` prefills with every position's logits and sends the prompt's
in a Prompt event; `generate` off only prefills (scores) the prompt.
"""

from __future__ import annotations

import collections
import math
import sys
import threading

import torch
from tokenizers import Tokenizer

from ..errors import GptossError
from ..infer.decode import DecodeState, failure, next_tokens
from ..infer.logprobs import TokenLogprob
from ..infer.sampling import NON_FINITE
from ..model import Transformer
from .compiled import decode_choice
from .logprobs import prompt_logprobs, sampled
from .requests import Done, EngineClosed, Failed, Prompt, QueueFull, Request, Running, Token
from .slots import SlotKVCache, SlotRows


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        eos_id: int | None,
        max_batch: int = 16,
        max_queue: int = 64,
        max_length: int | None = None,
        prefill_chunk: int = 256,
        compile: bool | None = False,
    ):
        """compile: the decode step compiled (True), eager (False), or whichever is faster (None; compiled.py)."""
        cfg = model.config
        self.model, self.tokenizer, self.eos_id = model, tokenizer, eos_id
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_length = min(max_length or cfg.max_context_length, cfg.max_context_length)
        self.device = model.embedding.weight.device
        self.cache = SlotKVCache(cfg, max_batch, self.max_length, model.embedding.weight.dtype, self.device)
        self._compiled, self.decode_choice = decode_choice(model, self.cache, compile)
        self._waiting: collections.deque[Request] = collections.deque()
        self._decoding: list[Running] = []  # in slots 0..D-1
        self._joining: Running | None = None  # being prefilled, in slot D
        self._wake = threading.Condition()
        self._closed = False
        self._stop = False
        # Totals since start, for /health: requests done, cancelled (client gone), failed; the widest step.
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0, "peak_batch": 0}
        self._thread = threading.Thread(target=self._run, name="gptoss-decode", daemon=True)

    # ---- the HTTP side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all or none). Raises QueueFull or EngineClosed."""
        with self._wake:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.extend(requests)
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop: whatever still runs is answered with an error."""
        with self._wake:
            self._closed = self._stop = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def load(self) -> dict[str, int]:
        return {
            "running": len(self._decoding) + (self._joining is not None),
            "waiting": len(self._waiting),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            **self.counts,
        }

    # ---- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stop and not (self._waiting or self._decoding or self._joining):
                        self._wake.wait()
                    if self._stop:
                        break
                try:
                    self._step()
                except Exception as err:  # a bug must not take the server down: fail what ran, go on
                    print(f"serve: decode step failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                    for run in [*self._decoding, *([self._joining] if self._joining else [])]:
                        self._fail(run.request, failure(err))
                    self._decoding, self._joining = [], None
        for run in [*self._decoding, *([self._joining] if self._joining else [])]:
            self._fail(run.request, "the server shut down before this request finished", shutdown=True)
        with self._wake:
            for request in self._waiting:
                self._fail(request, "the server shut down before this request started", shutdown=True)
            self._waiting.clear()

    def _step(self) -> None:
        self._drop_cancelled()
        budget = self.prefill_chunk  # prompt tokens this step may prefill, over one or more joining requests
        while budget > 0:
            if self._joining is None:
                group = self._take_group(budget)
                if len(group) > 1:  # whole prompts, prefilled together: they join the decoding rows at once
                    budget -= self._prefill_group(group)
                    continue
                self._joining = group[0] if group else self._take_one()
                if self._joining is None:
                    break
                self.cache.reset(len(self._decoding))
            budget -= self._prefill_chunk(budget)
        if self._decoding:
            self._decode()

    def _take_one(self) -> Running | None:
        """The next waiting request, started, when a slot is free (its prompt is then prefilled in chunks)."""
        while len(self._decoding) < self.max_batch:
            with self._wake:
                request = self._waiting.popleft() if self._waiting else None
            if request is None:
                return None
            try:  # its generator, penalty mask, text stream: what fails here is this request's alone
                return self._start(request)
            except Exception as err:
                self._fail(request, failure(err))
        return None

    def _take_group(self, budget: int) -> list[Running]:
        """The next waiting requests, in order, that can be prefilled together: a free slot each, whole prompts
        within `budget` tokens in all, at most half of the padded (J, T) chunk padding, and no echo (which
        scores every position's logits)."""
        group: list[Running] = []
        tokens = width = 0
        while len(self._decoding) + len(group) < self.max_batch:
            with self._wake:
                request = self._waiting[0] if self._waiting else None
                n = len(request.prompt) if request is not None else 0
                if not n or request.echo or not request.generate or tokens + n > budget:
                    break
                if (len(group) + 1) * max(width, n) > 2 * (tokens + n):
                    break
                self._waiting.popleft()
            try:
                group.append(self._start(request))
            except Exception as err:
                self._fail(request, failure(err))
                continue
            tokens, width = tokens + n, max(width, n)
        return group

    def _prefill_group(self, group: list[Running]) -> int:
        """Prefill whole prompts into slots D..D+J-1 in one right-padded (J, T) forward and sample their first
        tokens: they become decoding rows D..D+J-1. Returns the prompt tokens prefilled."""
        base = len(self._decoding)
        for slot in range(base, base + len(group)):
            self.cache.reset(slot)
        prompts = [run.request.prompt for run in group]
        width = max(map(len, prompts))
        try:
            tokens = [p + [0] * (width - len(p)) for p in prompts]  # (J, T), padded with any id
            positions = [list(range(len(p))) + [-1] * (width - len(p)) for p in prompts]  # -1: padding
            last = torch.tensor([[len(p) - 1] for p in prompts], device=self.device)  # (J, 1)
            rows = self.cache.select(base, base + len(group), width, padded=True)
            logits = self.model(self._ids(tokens), self._ids(positions), rows, logits_at=last).logits[:, 0]
            lost = {}
        except Exception as err:
            logits, lost = self._forward_one_by_one(err, base, group)
        for run in group:
            run.prefilled = run.pos
        self._decoding += group
        self._sample(base, logits, lost)
        return sum(map(len, prompts))

    def _ids(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _start(self, request: Request) -> Running:
        state = DecodeState.start(
            request.prompt,
            request.params,
            max_length=self.max_length,
            vocab_size=self.model.config.vocab_size,
            device=self.device,
            tokenizer=self.tokenizer,
            stop_ids=request.stop_ids | ({self.eos_id} if self.eos_id is not None else set()),
        )
        return Running(request, state)

    def _drop_cancelled(self) -> None:
        with self._wake:
            gone = sum(r.cancelled for r in self._waiting)
            if gone:
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
                self.counts["cancelled"] += gone
        if self._joining is not None and self._joining.request.cancelled:
            self._joining = None
            self.counts["cancelled"] += 1
        for i in reversed(range(len(self._decoding))):
            if self._decoding[i].request.cancelled:
                self._leave(i)
                self.counts["cancelled"] += 1

    def _leave(self, row: int) -> None:
        """Remove decoding row `row`; the last decoding row and then the joining one move down a slot."""
        last = len(self._decoding) - 1
        if row != last:
            self.cache.move(last, row, self._decoding[last].pos)
            self._decoding[row] = self._decoding[last]
        self._decoding.pop()
        if self._joining is not None:
            self.cache.move(last + 1, last, self._joining.prefilled)

    def _prefill_chunk(self, limit: int) -> int:
        """Prefill up to `limit` more prompt tokens of the joining request; returns how many it took. Once the
        prompt is in, its first token is sampled and it joins the decoding rows."""
        run, slot = self._joining, len(self._decoding)
        prompt = run.request.prompt
        start, end = run.prefilled, min(run.prefilled + limit, len(prompt))
        try:
            tokens = torch.tensor([prompt[start:end]], dtype=torch.long, device=self.device)  # (1, C)
            positions = torch.arange(start, end, device=self.device)[None]  # (1, C)
            logits = self._prefill_logits(run, tokens, positions, self.cache.select(slot, slot + 1, end))  # (1, V)
            run.prefilled = end
            if end < len(prompt):
                return end - start
            if run.request.echo:
                run.request.emit(Prompt(run.prompt_logprobs))
            if not run.request.generate:
                self._joining = None
                self._scored(run)
                return end - start
            (token,), failed = next_tokens(logits, [run.state])
            if failed:
                raise GptossError(failed[0])
            entry = sampled(logits, [run.request.logprobs], [token]).get(0)
        except Exception as err:
            self._joining = None
            self._fail(run.request, failure(err))
            return end - start
        self._joining = None
        self._decoding.append(run)  # slot D becomes decoding row D
        if self._accept_or_fail(run, token, entry):
            self._leave(len(self._decoding) - 1)
        return end - start

    def _prefill_logits(
        self, run: Running, tokens: torch.Tensor, positions: torch.Tensor, rows: SlotRows
    ) -> torch.Tensor:
        """One prefill chunk's forward over its slot's `rows` -> its last position's logits (1, V). With echo
        every position's logits (C, V) are computed, and the prompt tokens they predict are scored."""
        if not run.request.echo:
            return self.model(tokens, positions, rows, last_only=True).logits[:, -1]
        start = run.prefilled
        logits = self.model(tokens, positions, rows).logits[0]  # (C, V) fp32
        scored = prompt_logprobs(logits, run.request.prompt, start, run.request.logprobs or 0)
        if not all(math.isfinite(e.logprob) for e in scored):  # a scored prompt is answered without sampling
            raise GptossError(NON_FINITE)
        run.prompt_logprobs += scored
        return logits[-1:]

    def _scored(self, run: Running) -> None:
        """A request that only scores its prompt (max_tokens 0) is done once it is prefilled."""
        run.request.emit(Done("length", len(run.request.prompt), 0, [], ""))
        self.counts["finished"] += 1

    def _forward(self, start: int, stop: int) -> torch.Tensor:
        """One decode forward over decoding rows start..stop-1 -> their logits (stop - start, V) fp32; all of
        them through the compiled step when there is one."""
        rows = self._decoding[start:stop]
        tokens = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=self.device)  # (R, 1)
        positions = torch.tensor([[r.pos] for r in rows], dtype=torch.long, device=self.device)  # (R, 1)
        end = max(r.pos for r in rows) + 1
        if self._compiled is not None and (start, stop) == (0, len(self._decoding)):
            return self._compiled(tokens, positions, end)
        return self.model(tokens, positions, self.cache.select(start, stop, end)).logits[:, -1]

    def _forward_one_by_one(
        self, err: Exception, base: int = 0, group: list[Running] | None = None
    ) -> tuple[torch.Tensor, dict[int, str]]:
        """After the batched forward failed: each row alone and eagerly, so a failure that belongs to one
        request (or that a smaller batch avoids, like running out of memory) fails only the rows that still
        fail on their own; rewriting a row's keys at the same positions is harmless (slots.py). The decoding
        rows, or with `group` the prompts being prefilled together into slots base.. (each then prefilled
        whole, alone). Returns the logits (R, V) (zeros for failed rows) and {row: message}."""
        rows = self._decoding if group is None else group
        what = "decode step" if group is None else "prefill"
        print(
            f"serve: a {what} of {len(rows)} requests failed ({type(err).__name__}: {err}); running them one by one",
            file=sys.stderr,
            flush=True,
        )
        if group is None and self._compiled is not None:  # a graph gone wrong would fail every step: drop it
            self._compiled = None
            self.decode_choice = "eager (the compiled step failed)"
        logits = torch.zeros(len(rows), self.model.config.vocab_size, device=self.device)
        failed: dict[int, str] = {}
        for i, run in enumerate(rows):
            try:
                if group is None:
                    logits[i] = self._forward(i, i + 1)[0]
                    continue
                prompt = run.request.prompt
                slot = self.cache.select(base + i, base + i + 1, len(prompt))
                positions = torch.arange(len(prompt), device=self.device)[None]
                logits[i] = self.model(self._ids([prompt]), positions, slot, last_only=True).logits[0, -1]
            except Exception as row_err:
                failed[i] = failure(row_err)
        return logits, failed

    def _decode(self) -> None:
        rows = self._decoding
        self.counts["peak_batch"] = max(self.counts["peak_batch"], len(rows))
        try:
            logits, lost = self._forward(0, len(rows)), {}  # (R, V) fp32
        except Exception as err:
            logits, lost = self._forward_one_by_one(err)
        for r in rows:
            r.pos += 1
        self._sample(0, logits, lost)

    def _sample(self, first: int, logits: torch.Tensor, lost: dict[int, str]) -> None:
        """Decoding rows first.. sample from their logits (R, V) fp32 and take their tokens; rows whose forward
        failed (`lost`, by index from `first`) or whose sampling fails are failed; done rows leave."""
        rows = self._decoding[first:]
        picked, failed = next_tokens(logits, [r.state for r in rows])  # a failing row fails alone
        failed |= lost  # rows whose forward failed on their own
        entries = sampled(logits, [None if i in failed else r.request.logprobs for i, r in enumerate(rows)], picked)
        finished = []
        for i, r in enumerate(rows):
            if i in failed:
                self._fail(r.request, failed[i])
                finished.append(i)
            elif self._accept_or_fail(r, picked[i], entries.get(i)):
                finished.append(i)
        for i in reversed(finished):
            self._leave(first + i)

    def _accept_or_fail(self, run: Running, token: int, logprob: TokenLogprob | None = None) -> bool:
        """_accept, with a failure (in detokenising, in the request's own callback) failing only this request."""
        try:
            return self._accept(run, token, logprob)
        except Exception as err:
            self._fail(run.request, failure(err))
            return True

    def _accept(self, run: Running, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Hand one sampled token (and its log-probability, when asked for) to its request; True when the
        request is done."""
        state, request = run.state, run.request
        text = state.accept(token)
        if text or logprob is not None:
            request.emit(Token(text, token, logprob))
        if not state.done:
            run.last = token
            return False
        # OpenAI's finish reasons: stop (EOS, a stop id or string) or length (max_tokens or the context)
        reason = "stop" if state.reason in ("eos", "stop") else "length"
        request.emit(Done(reason, len(request.prompt), len(state.out), state.out, state.text))
        self.counts["finished"] += 1
        return True

    def _fail(self, request: Request, message: str, shutdown: bool = False) -> None:
        self.counts["failed"] += 1
        try:
            request.emit(Failed(message, shutdown))
        except Exception as err:  # nothing more can be told to this request; the others go on
            print(f"serve: request {request.id}: {message}; and its callback failed: {err}", file=sys.stderr)
