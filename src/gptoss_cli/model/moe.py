"""The gpt-oss mixture-of-experts block: fp32 top-k router, clamped interleaved SwiGLU experts.

    t = norm(x); logits = gate(t)                       (B*T, E), fp32
    vals, idx = topk(logits, k); w = softmax(vals)      softmax over the k chosen logits only
    h = mlp1_weight[e] @ t + mlp1_bias[e]               (2I,), columns interleaved: even = gate, odd = linear
    a = clamp(glu, max=L) * sigmoid(1.702 glu) * (clamp(lin, -L, L) + 1)
    y = sum_e w_e * (mlp2_weight[e] @ a + mlp2_bias[e])  the bias is added before weighting

Only the routed (token, expert) pairs are computed: the N*k assignments are sorted by expert, each expert
multiplies its contiguous slice, and the results are scattered back. Three interchangeable kernels
(`ModelConfig.moe_backend`): `loop` (plain autograd, the reference), `fused_loop` (the same loop as one
autograd node with a hand-written backward: the CPU default) and `grouped_mm` (one `torch._grouped_mm`
per projection, no host sync: the CUDA bf16 default). Decoding a few tokens without gradients skips the
sort: each token runs its k experts directly. Expert weights are stacked 3-D parameters, so DDP and FSDP2
see every expert on every rank.

The expert matrices may instead be packed MXFP4 (mxfp4.py, `pack_experts`), or carry low-rank adapters
(lora.py: `mlp1_lora` / `mlp2_lora`, one pair per expert): the same kernels then reach each expert through
`_per_expert`/`_linear`/`_gather`/`_stacked`, which decode a packed expert as it is used and add an
expert's low-rank update through its rank-r pair, never as an (E, out, in) delta. `loop` is their backend
(`fused_loop`'s strided views and hand-written backward need plain dense weights); `grouped_mm` takes
adapters as two more grouped products, and decodes a packed layer's experts all at once, so it runs on
packed experts only when asked for.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .lora import ExpertsLora, LoraExperts, LoraLinear
from .norm import RMSNorm

SWIGLU_ALPHA = 1.702
# On CPU in bf16/fp16 `loop` pads each expert's rows to a multiple of this: oneDNN compiles and caches a
# kernel per matmul shape, and the per-expert row counts otherwise make a new shape at almost every call
# (slow, and the cache of up to 1024 kernels grows by gigabytes; docs/performance.md).
ROW_BUCKET = 32
PADDED_ROWS = 32  # a decode step pads every expert's rows to the busiest one's up to this many (_experts_padded)


class RouterStats(NamedTuple):
    aux_loss: torch.Tensor  # () Switch load-balancing loss over all experts, 1.0 when balanced (0 in eval mode)
    z_loss: torch.Tensor  # () mean squared logsumexp of the router logits (0 in eval mode)
    counts: torch.Tensor  # (E,) token-slots routed to each expert


def swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    """h (M, 2I) interleaved [gate0, lin0, gate1, lin1, ...] -> (M, I)."""
    return swiglu_halves(h[..., ::2], h[..., 1::2], limit)


def swiglu_halves(glu: torch.Tensor, lin: torch.Tensor, limit: float) -> torch.Tensor:
    """The gate and linear halves (M, I) each -> (M, I)."""
    glu = glu.clamp(max=limit)  # the gate is clamped from above only
    lin = lin.clamp(min=-limit, max=limit)
    return glu * torch.sigmoid(SWIGLU_ALPHA * glu) * (lin + 1)


# ---- the expert weights as the kernels reach them: a stacked (E, out, in) tensor or PackedExperts ----


def _per_expert(w):
    """What `_linear` indexes by expert: a stacked tensor unbound once (the backward of indexing `w[e]`
    builds a zero (E, out, in) gradient per expert and adds them all up), or the packed weight itself."""
    return w.unbind(0) if isinstance(w, torch.Tensor) else w


def _linear(x, ws, e: int, bias):
    """x (n, in) -> x @ W_e^T + bias (n, out): a slice of the stacked weight, or a packed expert decoded
    as it multiplies."""
    return F.linear(x, ws[e], bias) if isinstance(ws, (tuple, list)) else ws.linear(e, x, bias)


def _gather(w, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The experts idx (...) picks: (..., out, in), decoded in `dtype` when packed."""
    return w[idx] if isinstance(w, torch.Tensor) else w.decode(idx, dtype)


def _stacked(w, dtype: torch.dtype) -> torch.Tensor:
    """All experts as one (E, out, in) tensor in `dtype` (a packed weight: every expert decoded)."""
    return w.to(dtype) if isinstance(w, torch.Tensor) else w.dense(dtype)


def _grouped_linear(x: torch.Tensor, w, offs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (M, in) sorted by expert -> (M, out) through torch._grouped_mm; an adapted weight adds its update."""
    base_t = _stacked(w.base if isinstance(w, LoraExperts) else w, dtype).transpose(-2, -1)  # (E, in, out)
    return w.grouped(x, offs, base_t) if isinstance(w, LoraExperts) else torch._grouped_mm(x, base_t, offs=offs)


def _experts_loop(xs, counts, w1, b1, w2, b2, limit):
    """xs (M, H) sorted by expert; counts (E,). One matmul pair per expert slice (one host sync).

    The reference for the other backends: plain autograd. Packed experts take this path too.
    """
    w1s, b1s, w2s, b2s = _per_expert(w1), b1.unbind(0), _per_expert(w2), b2.unbind(0)
    bucket = ROW_BUCKET if xs.device.type == "cpu" and xs.dtype in (torch.bfloat16, torch.float16) else 1
    outs = []
    for e, chunk in enumerate(torch.split(xs, counts.tolist())):
        n = chunk.shape[0]
        if not n:  # decode routes few tokens: skip idle experts (their rows get zero gradient)
            continue
        if n % bucket:  # zero rows: their outputs are dropped, so they add nothing to any gradient
            chunk = F.pad(chunk, (0, 0, 0, bucket - n % bucket))
        h = _linear(chunk, w1s, e, b1s[e])  # (n_e, 2I)
        outs.append(_linear(swiglu(h, limit), w2s, e, b2s[e])[:n])  # (n_e, H)
    return torch.cat(outs)


class _FusedExperts(torch.autograd.Function):
    """All experts over rows sorted by expert as one autograd node, its backward written out by hand.

    Same math as _experts_loop, in fewer CPU passes over memory: each expert's rows go through both
    projections and SwiGLU while they are still in cache; the gate and linear rows of mlp1 are multiplied
    as two strided views of the weight (no copy), so SwiGLU reads contiguous halves; the forward also
    keeps the two SwiGLU derivatives, so the backward is two multiplications plus the matmuls; gradients
    are written straight into stacked (E, ...) tensors. Saved per routed row: x (H) and a, d a/d glu,
    d a/d lin (I each).
    """

    @staticmethod
    def forward(ctx, xs, w1, b1, w2, b2, counts: list[int], limit: float):
        inter = w2.shape[-1]
        ys = xs.new_empty(xs.shape[0], w2.shape[1])
        saved = []  # per expert that received rows: a, d a/d glu, d a/d lin, each (n_e, I), all scaled by alpha
        # With u = alpha * clamp(glu) the gate is g sigmoid(alpha g) = silu(u) / alpha: one fused op, whose
        # derivative torch also has (silu_backward). The 1/alpha is folded into the matmuls (alpha=).
        # The "+ 1" of the linear half is folded into its bias.
        for e, r in _slices(counts):
            w1e, b1e = w1[e].view(inter, 2, -1), b1[e].view(inter, 2)  # rows [gate0, lin0, gate1, ...]
            glu = torch.addmm(b1e[:, 0], xs[r], w1e[:, 0].t())  # (n_e, I)
            lin1 = torch.addmm(b1e[:, 1] + 1, xs[r], w1e[:, 1].t())  # lin + 1
            u = glu.clamp(max=limit).mul_(SWIGLU_ALPHA)
            su = F.silu(u)  # alpha * g * sigmoid(alpha g)
            l1 = lin1.clamp(min=1 - limit, max=1 + limit)  # clamp(lin) + 1
            a = su * l1  # alpha * (the SwiGLU output)
            torch.addmm(b2[e], a, w2[e].t(), alpha=1 / SWIGLU_ALPHA, out=ys[r])
            # d a/d glu = l1 (s + alpha g s (1 - s)), s = sigmoid(alpha g): silu_backward(l1, u), exactly.
            # d a/d lin = g s (kept as alpha g s = su). A clamped input passes no gradient: the masks are
            # comparisons written as 0/1 floats, much cheaper on CPU than bool masks and masked_fill
            # (docs/performance.md).
            d_glu = torch.ops.aten.silu_backward(l1, u).mul_(torch.le(glu, limit, out=u))  # u is done
            d_lin = su.mul_(torch.eq(l1, lin1, out=lin1))  # su, lin1 are done too
            saved += [a, d_glu, d_lin]
        # Through save_for_backward, so activation checkpointing and saved-tensor hooks see them all.
        ctx.save_for_backward(xs, w1, w2, *saved)
        ctx.counts = counts
        return ys

    @staticmethod
    def backward(ctx, dy):
        xs, w1, w2, *saved = ctx.saved_tensors
        n_exp, inter = w2.shape[0], w2.shape[-1]
        inv_alpha = 1 / SWIGLU_ALPHA  # a and d a/d lin were saved alpha times too large
        dy = dy.contiguous()
        dw1, db1, dw2, db2 = (torch.empty_like(p) for p in (w1, w1[:, :, 0], w2, w2[:, :, 0]))
        # mlp1's rows interleave gate and linear: matmuls write each half straight into a strided view.
        dw1_halves, db1_halves = dw1.view(n_exp, inter, 2, -1), db1.view(n_exp, inter, 2)
        dxs = torch.empty_like(xs)
        idle = set(range(n_exp))
        per_expert = zip(saved[0::3], saved[1::3], saved[2::3], strict=True)
        for (e, r), (a, d_glu, d_lin) in zip(_slices(ctx.counts), per_expert, strict=True):
            idle.discard(e)
            dw2[e].addmm_(dy[r].t(), a, beta=0, alpha=inv_alpha)  # (H, I); beta=0: the empty memory is not read
            torch.sum(dy[r], 0, out=db2[e])
            da = dy[r] @ w2[e]  # (n_e, I)
            dglu, dlin = da * d_glu, da.mul_(d_lin)  # dlin alpha times too large
            for half, dpre, scale in ((0, dglu, 1.0), (1, dlin, inv_alpha)):
                dw1_halves[e, :, half].addmm_(dpre.t(), xs[r], beta=0, alpha=scale)  # (I, H)
                torch.sum(dpre, 0, out=db1_halves[e, :, half])
            db1_halves[e, :, 1].mul_(inv_alpha)
            w1e = w1[e].view(inter, 2, -1)
            torch.mm(dglu, w1e[:, 0], out=dxs[r])  # (n_e, H)
            dxs[r].addmm_(dlin, w1e[:, 1], alpha=inv_alpha)
        for e in idle:  # experts that received no rows get zero gradients
            for grad in (dw1, db1, dw2, db2):
                grad[e].zero_()
        return dxs, dw1, db1, dw2, db2, None, None


def _experts_fused_inference(xs, counts: list[int], w1, b1, w2, b2, limit):
    """_FusedExperts.forward without autograd: nothing saved for a backward."""
    inter = w2.shape[-1]
    ys = xs.new_empty(xs.shape[0], w2.shape[1])
    for e, r in _slices(counts):
        w1e, b1e = w1[e].view(inter, 2, -1), b1[e].view(inter, 2)
        glu = torch.addmm(b1e[:, 0], xs[r], w1e[:, 0].t())
        lin = torch.addmm(b1e[:, 1], xs[r], w1e[:, 1].t())
        torch.addmm(b2[e], swiglu_halves(glu, lin, limit), w2[e].t(), out=ys[r])
    return ys


def _experts_per_token(tokens, top_idx, weights, w1, b1, w2, b2, limit):
    """tokens (N, H), top_idx / weights (N, k) -> (N, H) fp32: sum_j w_j expert_j(token), token by token."""
    if torch.compiler.is_compiling():
        # Traced (a compiled decode step): the expert ids stay tensors, so there is no host sync and no
        # graph break (a break roughly doubles the compiled step's time per token; docs/performance.md).
        # Products and sums rather than einsum: inductor then fuses the gather of the chosen experts into
        # the reduction, reading their rows in place (einsum lowers to a bmm over a gathered copy). At every
        # batch size this beat running all experts densely on every row (docs/performance.md).
        dt = tokens.dtype
        h = (tokens[:, None, None, :] * _gather(w1, top_idx, dt)).sum(-1) + b1[top_idx]  # (N, k, 2I)
        y = (swiglu(h, limit)[:, :, None, :] * _gather(w2, top_idx, dt)).sum(-1) + b2[top_idx]  # (N, k, H)
        return (y.float() * weights[..., None]).sum(1)
    w1s, w2s = _per_expert(w1), _per_expert(w2)
    out = []
    for n, experts in enumerate(top_idx.tolist()):  # the one host sync
        row = tokens[n : n + 1]
        ys = torch.cat([_linear(swiglu(_linear(row, w1s, e, b1[e]), limit), w2s, e, b2[e]) for e in experts])  # (k, H)
        out.append(weights[n : n + 1] @ ys.float())  # (1, H): the weighted sum, in fp32 as the sorted path
    return out[0] if len(out) == 1 else torch.cat(out)


def _experts_padded(tokens, top_idx, weights, counts, w1, b1, w2, b2, limit):
    """A decode step of many rows without gradients: (N, H) -> (N, H) fp32. The N*k (token, expert) pairs
    go into one zero-padded (E, C, H) batch, C = the most rows one expert got, and each projection is one
    bmm over all experts, instead of a loop of matmuls per expert (at 16 rows of a small model the loop's
    per-call overhead was most of the MoE's time; docs/performance.md). Routing is uneven (at 16 rows of 2
    experts among 8 the busiest expert gets 8 to 16 rows), but at up to PADDED_ROWS rows an expert's
    product costs about what reading its weights does, so padded rows are almost free. None when an expert
    got more: the caller then loops."""
    n_exp, hidden = w1.shape[0], tokens.shape[1]
    flat = top_idx.reshape(-1)  # (N*k,)
    most = int(counts.max())  # the one host sync
    if most > PADDED_ROWS:
        return None
    order = torch.argsort(flat, stable=True)
    expert = flat[order]  # (N*k,) sorted
    row = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[expert]
    xs = tokens.new_zeros(n_exp, most, hidden)
    xs[expert, row] = tokens[order // top_idx.shape[1]]
    h = torch.baddbmm(b1[:, None], xs, w1.transpose(1, 2))  # (E, C, 2I)
    y = torch.baddbmm(b2[:, None], swiglu(h, limit), w2.transpose(1, 2))  # (E, C, H)
    per_slot = tokens.new_empty(flat.numel(), hidden).index_copy_(0, order, y[expert, row])
    return torch.bmm(weights[:, None, :], per_slot.view(*top_idx.shape, hidden).float()).squeeze(1)


def _count(flat: torch.Tensor, n_exp: int) -> torch.Tensor:
    """(N*k,) expert ids -> (E,) assignments per expert, without a host sync on CUDA or a graph break."""
    if flat.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.bincount(flat, minlength=n_exp)
    # bincount reads the largest id on the host to size its output; a comparison table does not.
    return (flat[:, None] == torch.arange(n_exp, device=flat.device)).sum(0)


def _slices(counts: list[int]):
    """(expert, row slice) for every expert that received rows."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def _experts_grouped(xs, counts, expert_sorted, w1, b1, w2, b2, limit):
    """Same contract through torch._grouped_mm: offsets stay on the device, so no host sync."""
    dtype = torch.get_autocast_dtype(xs.device.type) if torch.is_autocast_enabled(xs.device.type) else xs.dtype
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = _grouped_linear(xs.to(dtype), w1, offs, dtype)  # (M, 2I)
    h = h + b1.to(dtype)[expert_sorted]
    a = swiglu(h, limit)
    y = _grouped_linear(a, w2, offs, dtype)  # (M, H)
    return y + b2.to(dtype)[expert_sorted]


def pick_backend(
    backend: str, x: torch.Tensor, hidden: int, inter: int, packed: bool = False, adapted: bool = False
) -> str:
    """The MoE kernel for this input: `backend` itself unless it is auto. Packed experts run `loop`, each
    expert decoded as it multiplies, unless grouped_mm is asked for by name; adapted ones (LoRA) run `loop`
    where `fused_loop` would."""
    if packed:
        return "grouped_mm" if backend == "grouped_mm" else "loop"
    if adapted and backend == "fused_loop":
        return "loop"
    if backend != "auto":
        return backend
    autocast = torch.is_autocast_enabled(x.device.type)
    if x.device.type == "cuda" and hasattr(torch, "_grouped_mm"):
        bf16 = x.dtype == torch.bfloat16 or (autocast and torch.get_autocast_dtype("cuda") == torch.bfloat16)
        if bf16 and hidden % 8 == 0 and inter % 8 == 0:  # the fast kernel wants 16-byte aligned rows
            return "grouped_mm"
    # On CPU grouped_mm is a loop of mm calls (docs/performance.md); the fused loop computes in the
    # input's dtype with out= matmuls, which autocast does not cover.
    return "loop" if autocast or adapted else "fused_loop"


class MLPBlock(nn.Module):
    """x + MoE(norm(x)). Weight names follow openai/gpt-oss (`block.i.mlp.*`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = e
        self.experts_per_token = config.experts_per_token
        self.swiglu_limit = config.swiglu_limit
        self.intermediate_size = i
        self.backend = config.moe_backend
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.gate = nn.Linear(h, e, bias=config.router_bias)
        self.mlp1_weight = nn.Parameter(torch.empty(e, 2 * i, h))  # (E, 2I, H), out x in
        self.mlp1_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.mlp2_weight = nn.Parameter(torch.empty(e, h, i))  # (E, H, I)
        self.mlp2_bias = nn.Parameter(torch.zeros(e, h))
        self.mlp1_lora: ExpertsLora | None = None  # low-rank adapters, one pair per expert (lora.py)
        self.mlp2_lora: ExpertsLora | None = None

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, experts_per_token={self.experts_per_token}, "
            f"mlp1_weight={tuple(self.mlp1_weight.shape)}, mlp2_weight={tuple(self.mlp2_weight.shape)}, "
            f"swiglu_limit={self.swiglu_limit}"
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        """x (B, T, H) -> (x + moe, router statistics)."""
        b, t, hidden = x.shape
        k, n_exp = self.experts_per_token, self.num_experts
        tokens = self.norm(x).reshape(b * t, hidden)  # (N, H)
        # The router runs in fp32: bf16 logits create ties that pick the wrong experts.
        bias = None if self.gate.bias is None else self.gate.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(tokens.float(), self.gate.weight.float(), bias)  # (N, E)
            if isinstance(self.gate, LoraLinear):
                logits = logits + self.gate.delta(tokens.float())
        top_vals, top_idx = torch.topk(logits, k, dim=-1, sorted=True)  # (N, k)
        weights = torch.softmax(top_vals, dim=-1)  # (N, k), fp32

        flat = top_idx.reshape(-1)  # (N*k,) expert of each assignment
        counts = _count(flat, n_exp)  # (E,)
        w1, w2 = self.mlp1_weight, self.mlp2_weight
        if self.mlp1_lora is not None:
            w1 = LoraExperts(w1, self.mlp1_lora, tokens.dtype)
        if self.mlp2_lora is not None:
            w2 = LoraExperts(w2, self.mlp2_lora, tokens.dtype)
        params = (w1, self.mlp1_bias, w2, self.mlp2_bias)
        packed = not isinstance(self.mlp1_weight, torch.Tensor)
        adapted = not isinstance(w1, torch.Tensor) or not isinstance(w2, torch.Tensor)
        backend = pick_backend(self.backend, tokens, hidden, self.intermediate_size, packed, adapted)
        # A compiled forward is a decode step. A packed expert costs a decode per use, and the per-token path
        # repeats an expert for every token that picks it, so eagerly it only takes one token.
        few = torch.compiler.is_compiling() or flat.numel() <= (k if packed else n_exp)
        y = None  # (N, H) fp32 when decoding skips the sort
        if backend != "grouped_mm" and not torch.is_grad_enabled():
            if few:
                # Decoding a few tokens: every expert sees at most a row or two, so sorting, gathering and
                # scattering back cost more than they group. Each token runs its k experts directly.
                y = _experts_per_token(tokens, top_idx, weights, *params, self.swiglu_limit)
            elif t == 1 and backend == "fused_loop":  # a decode step of many rows
                y = _experts_padded(tokens, top_idx, weights, counts, *params, self.swiglu_limit)
        if y is not None:
            zero = logits.new_zeros(())
            return x + y.to(x.dtype).view(b, t, hidden), RouterStats(zero, zero, counts)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        # (N*k, H) token rows in expert order. index_select's backward (index_add_) is faster than indexing's
        # on CPU (docs/performance.md); on CUDA it would use atomics, so indexing keeps the backward deterministic.
        xs = tokens.index_select(0, order // k) if tokens.device.type == "cpu" else tokens[order // k]
        if backend == "grouped_mm":
            ys = _experts_grouped(xs, counts, flat[order], *params, self.swiglu_limit)
        elif backend == "fused_loop" and torch.is_grad_enabled() and self.mlp1_weight.requires_grad:
            ys = _FusedExperts.apply(xs, *params, counts.tolist(), self.swiglu_limit)
        elif backend == "fused_loop":
            ys = _experts_fused_inference(xs, counts.tolist(), *params, self.swiglu_limit)
        else:
            ys = _experts_loop(xs, counts, *params, self.swiglu_limit)
        # Scatter back to assignment order (deterministic, unlike index_add_) and weight per token.
        per_slot = torch.empty_like(ys).index_copy_(0, order, ys).view(b * t, k, hidden)  # in place: no clone
        # The k-way weighted sum as a batched (1, k) x (k, H) product: fwd+bwd faster on CPU than
        # multiply-and-sum (docs/performance.md), and deterministic.
        with torch.autocast(x.device.type, enabled=False):  # fp32, as the router weights
            y = torch.bmm(weights[:, None, :], per_slot.float()).squeeze(1).to(x.dtype)  # (N, H)

        if not self.training:  # the losses only matter for training; decoding skips their softmax
            zero = logits.new_zeros(())
            return x + y.view(b, t, hidden), RouterStats(zero, zero, counts)
        # Switch-style balance: E * sum_e (fraction of assignments to e) * (mean router prob of e).
        probs = torch.softmax(logits, dim=-1)
        fraction = counts.float() / flat.numel()
        aux = n_exp * (fraction * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return x + y.view(b, t, hidden), RouterStats(aux, z, counts)
