"""Log-probabilities of tokens under the model: the one definition that the server's `logprobs`/`echo` and
`gptoss eval --tasks`' log-likelihoods share.

    log_probs(logits)                   (..., V) logits -> (..., V) log-softmax, in fp32 at least
    token_logprobs(logits, tokens, k)   (N, V) logits, N chosen ids -> each id's log-probability and the k
                                        most likely ids with theirs, on the host

A log-probability is that of the model's own next-token distribution, log_softmax(logits): the raw
model, before temperature, top-k, top-p or the repetition penalty reshape it for sampling. That is what
a log-likelihood evaluation needs (lm-evaluation-harness compares it with `transformers`' log_softmax),
what the OpenAI API reports, and it does not change with the sampling settings of the request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the k most likely ids and their log-probabilities, best first


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension in fp32 (fp64 logits stay fp64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int = 0) -> list[TokenLogprob]:
    """logits (N, V), one row per token in `tokens` -> N TokenLogprobs with the `top` most likely
    alternatives each (0: none), computed on the logits' device and copied to the host once per tensor."""
    if not tokens:
        return []
    lp = log_probs(logits)  # (N, V)
    ids = torch.tensor(tokens, dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, ids[:, None])[:, 0]  # (N,)
    k = min(top, lp.shape[-1])
    if k == 0:
        return [TokenLogprob(t, v) for t, v in zip(tokens, chosen.tolist(), strict=True)]
    values, best = lp.topk(k, dim=-1)  # (N, k) each, most likely first
    return [
        TokenLogprob(t, v, tuple(zip(b, w, strict=True)))
        for t, v, b, w in zip(tokens, chosen.tolist(), best.tolist(), values.tolist(), strict=True)
    ]
