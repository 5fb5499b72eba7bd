"""The unembedding and the next-token cross-entropy in one pass over chunks of rows.

The plain loss, `F.cross_entropy(x @ w.T, targets)`, materialises the (N, V) fp32 logits, then
log_softmax's (N, V) output, then in backward their (N, V) gradient: each N*V*4 bytes (65 MB at
2048 tokens x 8000 vocab), each written by one op and read back by the next. Here each chunk of rows
computes its logits, its loss and the gradient of that loss with respect to its logits while they are
still in cache, and turns the gradient at once into its rows of dX and its share of dW. Backward only
scales the two by the incoming gradient. The peak is one chunk of logits instead of three (N, V) tensors.

The math is the plain loss's (mean over targets != ignore_index; logits computed in the compute
dtype and then promoted to fp32, as `unembedding(x).float()` does); tests compare both.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # as F.cross_entropy


COPY_MAX_BYTES = 256 << 20  # the largest unembedding the CPU path copies transposed


def chunk_rows(vocab_size: int, device_type: str) -> int:
    """Rows per chunk: ~4 MB of fp32 logits on CPU (cache-sized), ~64 MB elsewhere (big matmuls)."""
    elements = 2**20 if device_type == "cpu" else 2**24
    return max(32, elements // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, compute_dtype, rows, want_dx, want_dw):
        # x (N, H), weight (V, H), targets (N,) int64. Returns the summed loss, the number of targets that
        # are the argmax and the number of counted targets, all () tensors: no host sync, also on CUDA.
        n = x.shape[0]
        valid = targets != IGNORE_INDEX  # (N,)
        safe = targets.masked_fill(~valid, 0)[:, None]  # (N, 1) a gather index for every row
        w = weight.to(compute_dtype)
        # (H, V) for the logits' matmul: on CPU a contiguous copy (one pass over the weight) makes every
        # chunk's matmul faster (docs/performance.md); GPU GEMMs take the transposed view as it is. A large
        # unembedding is not copied: gpt-oss-20b's (1.1 GB in bf16) would be a LoRA step's largest transient.
        small = w.numel() * w.element_size() <= COPY_MAX_BYTES
        w_t = w.t().contiguous() if x.device.type == "cpu" and small else w.t()
        acc = torch.promote_types(compute_dtype, torch.float32)  # logits and loss: fp32 (fp64 in tests)
        loss_sum = torch.zeros((), dtype=acc, device=x.device)
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        dx = torch.empty_like(x) if want_dx else None
        # dW becomes weight.grad as it is. The first chunk writes it, the others add to it: zero-filling
        # a fresh (V, H) buffer is one more pass over it (docs/performance.md).
        dw = (torch.empty_like(weight) if n else torch.zeros_like(weight)) if want_dw else None
        buf = torch.empty(min(rows, n), weight.shape[0], dtype=acc, device=x.device)  # reused by every chunk
        with torch.autocast(x.device.type, enabled=False):  # dtypes are chosen here, explicitly
            for s in range(0, n, rows):
                xc = x[s : s + rows].to(compute_dtype)  # (c, H)
                tc, vc = safe[s : s + rows], valid[s : s + rows]  # (c, 1), (c,)
                logits = buf[: xc.shape[0]]  # (c, V); a fresh (c, V) per chunk would page-fault on CPU
                if compute_dtype == acc:
                    torch.mm(xc, w_t, out=logits)
                else:
                    logits.copy_(xc @ w_t)
                # The softmax by hand, in place. Its row max also gives the accuracy (a target whose logit
                # is the max; argmax is much slower on CPU and differs only on exact ties).
                top = logits.amax(-1)  # (c,)
                target = logits.gather(1, tc)[:, 0]  # (c,)
                correct += ((target >= top) & vc).sum()
                probs = logits.sub_(top[:, None]).exp_()  # (c, V) unnormalised
                total = probs.sum(-1)  # (c,)
                loss_sum += ((top + total.log() - target) * vc).sum()  # logsumexp - target logit
                if not (want_dx or want_dw):
                    continue
                # d(summed loss)/d logits = softmax - one_hot(target), zero on an ignored row
                probs.mul_((vc / total)[:, None])
                probs.scatter_add_(1, tc, -vc[:, None].to(acc))
                grad = probs.to(compute_dtype)  # no copy in fp32
                if want_dx:
                    if dx.dtype == compute_dtype:
                        torch.mm(grad, w, out=dx[s : s + rows])  # (c, H)
                    else:
                        dx[s : s + rows] = grad @ w
                if want_dw:
                    first = 0.0 if s == 0 else 1.0  # beta = 0: the empty buffer is not read
                    if compute_dtype == dw.dtype:
                        dw.addmm_(grad.T, xc, beta=first)  # (V, H) accumulated in place, rounded once per chunk
                    elif s == 0:  # autocast over fp32 weights: a bf16 product per chunk, summed in fp32
                        dw.copy_(grad.T @ xc)
                    else:
                        dw += (grad.T @ xc).to(dw.dtype)
        count = valid.sum()
        ctx.grads = (dx, dw)
        ctx.mark_non_differentiable(correct, count)
        return loss_sum, correct, count

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct, _grad_count):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused cross-entropy can be backpropagated once (its buffers are "
                "scaled in place); use train.fused_loss=false for retain_graph"
            )
        dx, dw = ctx.grads
        ctx.grads = None  # the buffers are scaled in place and handed over
        return (
            None if dx is None else dx.mul_(grad_loss.to(dx.dtype)),
            None if dw is None else dw.mul_(grad_loss.to(dw.dtype)),
            None,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, H), weight (V, H), targets (N,) -> (mean cross-entropy of x @ weight.T, argmax accuracy).

    Gradients flow to x and weight (a tied weight gets its unembedding share, added by autograd). Under
    autocast the matmuls run in the autocast dtype, as nn.Linear would. Targets equal to IGNORE_INDEX are
    ignored, as in F.cross_entropy.
    """
    device = x.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    grad = torch.is_grad_enabled()
    loss_sum, correct, count = _LinearCrossEntropy.apply(
        x,
        weight,
        targets,
        compute,
        rows or chunk_rows(weight.shape[0], device),
        grad and x.requires_grad,
        grad and weight.requires_grad,
    )
    return loss_sum / count, correct / count
