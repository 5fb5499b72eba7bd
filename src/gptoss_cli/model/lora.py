"""Low-rank adapters (LoRA, Hu et al. 2021) on a frozen gpt-oss model, experts included.

    y = W x + b + s B A dropout(x)        A (r, in), B (out, r), s = alpha / r; B starts at zero

so an adapted model starts out equal to its base. `add_adapters(model, ...)` puts them on a built model
from outside (transforms.py), in place:

- `LoraLinear` takes the place of an nn.Linear (`attn.qkv`, `attn.out`, `mlp.gate`) and keeps its `weight`
  and `bias` under their names, so a base checkpoint loads into it unchanged; its pair is `lora_A`,
  `lora_B`. The fused qkv projection holds one pair per part, q, k and v (`groups`), as PEFT adapts
  transformers' q_proj / k_proj / v_proj: `lora_A` stacks the three A's (3r, in), `lora_B` the three B's
  by rows (q_dim + 2 kv_dim, r), and the update uses B as the block-diagonal (out, 3r) matrix.
- `ExpertsLora` is one pair per expert for a stacked expert weight, `block.N.mlp.mlp1_lora` /
  `mlp2_lora`: `lora_A` (E, r, in), `lora_B` (E, out, r). The MoE kernels (moe.py) reach an expert weight
  and its adapter together through `LoraExperts`, which computes an expert's rows as
  x W_e^T + s (x A_e^T) B_e^T: the (E, out, in) update is never formed. The base may be dense or packed
  MXFP4 (mxfp4.py `PackedExperts`, decoded as it multiplies, in the backward pass too).

Adapters are created in fp32 on the base weights' device; they compute in the activations' dtype.
`delta_linear` / `delta_experts` give the update as a dense matrix, for merging (export, tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")
PROJECTIONS = ("qkv", "out", "router", "mlp1", "mlp2")


def is_adapter(name: str) -> bool:
    """Whether the tensor `name` (a state-dict name) is an adapter's A or B."""
    return name.endswith(ADAPTER_SUFFIXES)


def delta_linear(a: torch.Tensor, b: torch.Tensor, groups: Sequence[int], scaling: float) -> torch.Tensor:
    """s B A as one (out, in) matrix in fp32: A (G r, in), B (out, r) whose row groups each pair with their
    own r rows of A."""
    b = torch.block_diag(*b.float().split(list(groups))) if len(groups) > 1 else b.float()
    return scaling * (b @ a.float())


def delta_experts(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s B_e A_e for the experts given: A (..., r, in), B (..., out, r) -> (..., out, in) fp32."""
    return scaling * (b.float() @ a.float())


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training) if p and training else x


class LoraLinear(nn.Module):
    """A frozen linear layer plus a low-rank update: F.linear(x, weight, bias) + s B A dropout(x)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, groups: Sequence[int] = ()):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the base's own tensors, names unchanged
        self.register_parameter("bias", base.bias)
        self.groups = tuple(groups) or (base.out_features,)
        self.rank, self.scaling, self.dropout = rank, alpha / rank, dropout
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(len(self.groups) * rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))

    def extra_repr(self) -> str:
        parts = f", groups={self.groups}" if len(self.groups) > 1 else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}{parts}"

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s B A dropout(x): (..., in) -> (..., out), in x's dtype."""
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        if len(self.groups) > 1:
            b = torch.block_diag(*b.split(list(self.groups)))  # (out, G r): each part reads its own r columns
        h = F.linear(_dropout(x, self.dropout, self.training), a) * self.scaling  # (..., G r): scaled while small
        return F.linear(h, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.delta(x)

    def merged_weight(self) -> torch.Tensor:
        """W + s B A in W's dtype (the sum taken in fp32)."""
        return (self.weight.float() + delta_linear(self.lora_A, self.lora_B, self.groups, self.scaling)).to(
            self.weight.dtype
        )


class ExpertsLora(nn.Module):
    """One low-rank pair per expert for a stacked (E, out, in) expert weight."""

    def __init__(self, experts: int, out: int, inp: int, rank: int, alpha: float, dropout: float, device=None):
        super().__init__()
        self.rank, self.scaling, self.dropout = rank, alpha / rank, dropout
        self.lora_A = nn.Parameter(torch.zeros(experts, rank, inp, device=device))  # (E, r, in)
        self.lora_B = nn.Parameter(torch.zeros(experts, out, rank, device=device))  # (E, out, r)

    def extra_repr(self) -> str:
        e, out, r = self.lora_B.shape
        return f"experts={e}, out={out}, in={self.lora_A.shape[-1]}, rank={r}, scaling={self.scaling:g}"


class LoraExperts:
    """An expert weight (a stacked (E, out, in) tensor or PackedExperts) and its ExpertsLora, as the MoE
    kernels reach it: the accesses PackedExperts has (`shape`, `linear`, `decode`, `dense`) plus
    `grouped`. Made for one forward; the adapters are cast to `dtype` once and split by expert once (the
    backward of indexing a stacked tensor by expert builds a full-size zero gradient per expert)."""

    def __init__(self, base, lora: ExpertsLora, dtype: torch.dtype):
        self.base, self.lora = base, lora
        self.scaling = lora.scaling
        self._a, self._b = lora.lora_A.to(dtype), lora.lora_B.to(dtype)
        self._a_e, self._b_e = self._a.unbind(0), self._b.unbind(0)
        self._base_e = base.unbind(0) if isinstance(base, torch.Tensor) else None

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    def linear(self, e: int, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (n, in) -> x W_e^T + bias + s (x A_e^T) B_e^T (n, out)."""
        y = F.linear(x, self._base_e[e], bias) if self._base_e is not None else self.base.linear(e, x, bias)
        h = F.linear(_dropout(x, self.lora.dropout, self.lora.training), self._a_e[e]) * self.scaling  # (n, r)
        return torch.addmm(y, h, self._b_e[e].t())

    def decode(self, idx, dtype: torch.dtype) -> torch.Tensor:
        """The experts idx picks, merged: (..., out, in) in `dtype` (a decode step's few experts)."""
        base = self.base[idx].to(dtype) if self._base_e is not None else self.base.decode(idx, dtype)
        return base + delta_experts(self._a[idx], self._b[idx], self.scaling).to(dtype)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """Every expert merged: (E, out, in) in `dtype` (only for the compiled large-batch decode)."""
        base = self.base.to(dtype) if self._base_e is not None else self.base.dense(dtype)
        return base + delta_experts(self._a, self._b, self.scaling).to(dtype)

    def grouped(self, x: torch.Tensor, offs: torch.Tensor, base_t: torch.Tensor) -> torch.Tensor:
        """torch._grouped_mm over rows sorted by expert: x base_t + s (x A^T) B^T, with base_t the
        (E, in, out) base; the update as two grouped products through rank r."""
        dtype = base_t.dtype
        h = torch._grouped_mm(_dropout(x, self.lora.dropout, self.lora.training), self._a.to(dtype).mT, offs=offs)
        y = torch._grouped_mm(x, base_t, offs=offs)
        return y + torch._grouped_mm(h * self.scaling, self._b.to(dtype).mT, offs=offs)


# ---- putting adapters on a model -------------------------------------------------------------------


def add_adapters(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    projections: Iterable[str],
    layers: Iterable[int] | None = None,
) -> list[str]:
    """Adapters of `rank` on `projections` (of PROJECTIONS) of the blocks `layers` (None: all), zero (init_adapters
    draws A); every other parameter frozen. In place; returns the names of the adapted base weights."""
    projections = set(projections)
    unknown = projections - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)} (known: {', '.join(PROJECTIONS)})")
    model.requires_grad_(False)
    blocks = model.block
    chosen = range(len(blocks)) if layers is None else sorted(layers)
    cfg = model.config
    adapted = []
    for i in chosen:
        attn, mlp = blocks[i].attn, blocks[i].mlp
        linears = (
            ("qkv", attn, "qkv", (cfg.q_dim, cfg.kv_dim, cfg.kv_dim)),
            ("out", attn, "out", ()),
            ("router", mlp, "gate", ()),
        )
        for target, parent, attr, groups in linears:
            if target in projections and not isinstance(getattr(parent, attr), LoraLinear):
                setattr(parent, attr, LoraLinear(getattr(parent, attr), rank, alpha, dropout, groups))
                adapted.append(f"block.{i}.{'attn' if parent is attn else 'mlp'}.{attr}.weight")
        for target in ("mlp1", "mlp2"):
            weight = getattr(mlp, f"{target}_weight")
            if target in projections and getattr(mlp, f"{target}_lora") is None:
                e, out, inp = weight.shape
                device = weight.device if isinstance(weight, torch.Tensor) else weight.blocks.device
                setattr(mlp, f"{target}_lora", ExpertsLora(e, out, inp, rank, alpha, dropout, device))
                adapted.append(f"block.{i}.mlp.{target}_weight")
    return adapted


def adapter_modules(model: nn.Module) -> list[tuple[str, LoraLinear | ExpertsLora]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoraLinear, ExpertsLora))]


@torch.no_grad()
def init_adapters(model: nn.Module, generator: torch.Generator) -> None:
    """A uniform in +-1/sqrt(in) (nn.Linear's and PEFT's default), B zero: the update starts at zero."""
    for _, module in adapter_modules(model):
        bound = 1 / math.sqrt(module.lora_A.shape[-1])
        draw = torch.rand(module.lora_A.shape, generator=generator, dtype=torch.float32)
        module.lora_A.copy_(draw.mul_(2 * bound).sub_(bound))
        module.lora_B.zero_()


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by name (what a LoRA run's checkpoint holds)."""
    return {n: p for n, p in model.named_parameters() if is_adapter(n)}
