"""A loaded gptoss run as an lm-evaluation-harness model: the three request types lm-eval asks of a model.

    loglikelihood          (context, continuation) -> (log p(continuation | context), whether it is greedy)
    loglikelihood_rolling  (text,) -> log p(text) over windows of the model's context, each token once
    generate_until         (context, {until, max_gen_toks, do_sample, temperature, ...}) -> text

Tokenization and the split of a request into tokens are lm-eval's own (TemplateLM: the context and the
continuation are encoded together and split, the empty context becomes the BOS; rolling windows come from
lm-eval's `get_rolling_token_windows`), so a request becomes the same tokens here as in lm-eval's `hf` model
on the exported run. Scoring is evaluate/loglikelihood.py (batched, longest first, logits only at the
continuation); generation is infer/generate.py's batched decoding, greedy unless the task samples.

This module imports lm_eval: only harness.py imports it, after checking that lm-eval is installed.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..config import InferConfig
from ..data.tokenizer import EOS, PAD, bos_id
from ..errors import GptossError
from ..infer.generate import batch_states, generate
from ..run.open import LoadedRun
from .loglikelihood import score_tokens

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for models that do not say


class GptossLM(TemplateLM):
    def __init__(
        self,
        loaded: LoadedRun,
        *,
        batch_size: int,
        progress: Callable[[str, int], Callable[[int], None]] | None = None,
    ):
        """progress(kind, total requests) -> advance(n requests done): a progress display per request type."""
        super().__init__()
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self._batch_size = batch_size
        self._progress = progress or (lambda kind, total: lambda n: None)
        self._eot = self.tokenizer.token_to_id(EOS)
        self._bos = bos_id(self.tokenizer)
        pad = self.tokenizer.token_to_id(PAD)
        self._pad = self._eot if pad is None else pad
        self._device = loaded.device

    # ---- what TemplateLM needs ---------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._bos

    @property
    def max_length(self) -> int:
        return self.model.config.max_context_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"{self.loaded.run.name}/{self.loaded.checkpoint.name}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string).ids  # our tokenizers add no special tokens of their own

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def get_model_info(self) -> dict:
        """What lm-eval records as the model in its results' config."""
        return {
            "model_name": self.tokenizer_name,
            "run": str(self.loaded.run),
            "checkpoint": str(self.loaded.checkpoint),
            "step": self.loaded.step,
            "device": self._device.type,
            "dtype": self.loaded.dtype_name,
            "transforms": list(self.loaded.transforms),
        }

    # ---- log-likelihoods ---------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # our own progress shows the scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, kind: str = "loglikelihood"):
        """[((context, continuation), context ids, continuation ids)] -> [(log-likelihood, is greedy)]."""
        limit = self.max_length
        rows = []
        for _, context, continuation in requests:
            if not continuation:
                raise GptossError("an lm-eval request has an empty continuation: nothing to score")
            if len(continuation) > limit:
                raise GptossError(
                    f"a continuation of {len(continuation)} tokens is longer than the model's context ({limit})"
                )
            # As lm-eval's hf model: the last max_length + 1 tokens; the input is all but the last.
            rows.append(((context + continuation)[-(limit + 1) :], len(continuation)))
        advance = self._progress(kind, len(rows))
        scored = score_tokens(self.model, rows, batch_size=self._batch_size, pad_id=self._pad, on_batch=advance)
        return [(s.total, all(s.greedy)) for s in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Every token of each text scored once, in windows of the model's context after the BOS; all
        windows of all texts are batched together."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(
            owner, self._loglikelihood_tokens(windows, kind="rolling loglikelihood"), strict=True
        ):
            totals[i] += logprob
        return totals

    # ---- generation --------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, where the task asks, sampled) continuations, batched by identical settings, longest
        prompt first; each stops at EOS, at one of `until` or after max_gen_toks tokens."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, kwargs) in enumerate(args):
            groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(i)
        out = [""] * len(args)
        advance = self._progress("generate_until", len(args))
        for members in groups.values():
            params, keep = self._generation_settings(args[members[0]][1])
            encoded = {i: self.tok_encode(args[i][0])[-keep:] for i in members}
            members.sort(key=lambda i: -len(encoded[i]))
            for start in range(0, len(members), self._batch_size):
                batch = members[start : start + self._batch_size]
                for i, text in zip(batch, self._generate([encoded[i] for i in batch], params), strict=True):
                    out[i] = text
                advance(len(batch))
        return out

    def _generation_settings(self, kwargs: dict) -> tuple[InferConfig, int]:
        """A task's generation kwargs -> (the InferConfig, how many context tokens fit before the budget)."""
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = next((kwargs.pop(k) for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in kwargs), None)
        max_gen = int(max_gen or DEFAULT_MAX_GEN_TOKS)
        keep = self.max_length - max_gen
        if keep < 1:
            raise GptossError(
                f"the task asks for {max_gen} new tokens; the model's context is {self.max_length} tokens, "
                "leaving no room for its prompt"
            )
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
        params = InferConfig(
            max_new_tokens=max_gen,
            temperature=temperature,
            top_k=int(kwargs.pop("top_k", 0) or 0),
            top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
            repetition_penalty=1.0,
            seed=1234,
            stop=[s for s in until if s],
        )
        return params, keep

    def _generate(self, prompts: list[list[int]], params: InferConfig) -> list[str]:
        states = batch_states(self.model, prompts, params, eos_id=self._eot, tokenizer=self.tokenizer)
        generate(self.model, prompts, states, pad_id=self._pad)
        return [s.text for s in states]
