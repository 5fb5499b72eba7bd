"""MXFP4 expert weights: the format's math and the packed experts the MoE block multiplies by.

The released gpt-oss checkpoints quantise only the MoE matrices (openai/gpt-oss `gpt_oss/torch/weights.py`;
transformers `integrations/mxfp4.py` reads the same layout). A weight of logical shape (E, rows, cols),
out x in as ours, is stored as

    blocks  uint8 (E, rows, cols/32, 16)   two FP4 (e2m1) codes per byte, low nibble first
    scales  uint8 (E, rows, cols/32)       one shared power-of-two exponent (E8M0) per 32 values, bias 127

and decodes to value = FP4_VALUES[code] * 2^(scale - 127), exactly in bf16 and fp32. `quantize` is the
conversion of the OCP Microscaling Formats (MX) v1.0 specification (section 6.3): the block's shared
exponent is floor(log2(max |v|)) - 2 (2 being the largest e2m1 exponent), and each v / 2^shared is rounded
to the nearest e2m1 value, ties to even, saturating at +-6.

`pack_experts(model)` swaps every MLPBlock's stacked mlp1/mlp2 parameters for `PackedExperts` modules whose
buffers are named `blocks` and `scales`, so a packed state dict reads `block.N.mlp.mlp1_weight.blocks`, the
names of openai's `original/` files. On a meta-device model it is a structural transform (buffers to load
a packed checkpoint into); on a real model it quantises the weights it holds.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

# e2m1 code -> value; codes 8..15 are the negatives of 0..7 (code 8 is -0).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
SCALE_BIAS = 127
EMAX_ELEM = 2  # the largest e2m1 exponent: 6 = 1.5 * 2^2
PACKED = ("mlp1_weight", "mlp2_weight")  # the MLPBlock attributes pack_experts swaps
SUFFIXES = (".blocks", ".scales")  # a packed weight's tensors in a state dict
# byte -> (value of its low nibble, value of its high nibble): one lookup decodes two codes.
_PAIRS = tuple((FP4_VALUES[b & 0x0F], FP4_VALUES[b >> 4]) for b in range(256))
# E8M0 scale byte -> 2^(s - 127); 255 (NaN in the specification) decodes to 2^128 = inf, as an ldexp would.
_SCALES = tuple(2.0 ** (s - SCALE_BIAS) for s in range(256))
# e2m1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 and the midpoints between neighbours (quantize).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)  # midpoints whose upper neighbour has the even code
DECODE_CHUNK_BYTES = 8 << 20  # decoded rows per step of PackedExperts.linear (docs/performance.md)
_SCALED_PAIRS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_WORDS = {2: torch.int32, 4: torch.int64}  # a value pair of bf16 / fp32 as one integer word


def _check(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"expected uint8 blocks and scales, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair up "
            f"(expected blocks = scales + ({BLOCK // 2},))"
        )


def _decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., G, 16) codes, (..., G) scales -> (..., G*32): one table lookup per byte, one multiply per value.
    Every e2m1 value times a power of two is exact in bf16 (2 mantissa bits) and fp32."""
    pairs = torch.tensor(_PAIRS, dtype=dtype, device=blocks.device)  # (256, 2)
    factors = torch.tensor(_SCALES, dtype=dtype, device=blocks.device)  # (256,)
    values = F.embedding(blocks.int(), pairs).flatten(-2)  # (..., G, 16, 2) -> (..., G, 32)
    return values.mul_(factors[scales.int()].unsqueeze(-1)).flatten(-2)


def _scaled_pairs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(scale byte * 256 + code byte) -> the byte's two values times the scale: (65536, 2) in `dtype`, exact
    (built in fp32, where every e2m1 value times 2^-127..2^127 is exact), made once per dtype and device."""
    key = (dtype, device)
    if key not in _SCALED_PAIRS:
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            _SCALED_PAIRS[key] = _build_scaled_pairs(dtype, device)
    return _SCALED_PAIRS[key]


def _build_scaled_pairs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    pairs = torch.tensor(_PAIRS, dtype=torch.float32, device=device)  # (256, 2)
    factors = torch.tensor(_SCALES, dtype=torch.float32, device=device)  # (256,)
    return (factors[:, None, None] * pairs).flatten(0, 1).to(dtype)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks (..., G, 16) uint8, scales (..., G) uint8 -> (..., G*32) in `dtype`, exactly."""
    _check(blocks, scales)
    if blocks.dim() > 3:  # one leading slice (expert) at a time: the int32 codes are 4x the packed bytes
        return torch.stack([dequantize(b, s, dtype) for b, s in zip(blocks, scales, strict=True)])
    return _decode(blocks, scales, dtype)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., cols) float -> (blocks (..., cols/32, 16), scales (..., cols/32)) uint8, by the OCP MX rule."""
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"{weight.shape[-1]} columns are not a multiple of {BLOCK}")
    if weight.dim() > 2:  # one leading slice at a time bounds the fp32 temporaries
        pairs = [quantize(w) for w in weight]
        return torch.stack([b for b, _ in pairs]), torch.stack([s for _, s in pairs])
    v = weight.float().unflatten(-1, (-1, BLOCK))  # (..., G, 32)
    amax = v.abs().amax(-1)  # (..., G)
    _, exponent = torch.frexp(amax)  # amax = m 2^e with m in [0.5, 1): floor(log2 amax) = e - 1
    # The scale byte holds -127..127; a block of zeros (frexp's exponent 0) takes the smallest scale.
    shared = torch.where(amax > 0, exponent - 1 - EMAX_ELEM, -SCALE_BIAS).clamp(-SCALE_BIAS, SCALE_BIAS)
    scaled = torch.ldexp(v, -shared.unsqueeze(-1).float()).abs()  # exact: a power-of-two scaling
    mids = torch.tensor(_MIDPOINTS, device=v.device)
    codes = torch.bucketize(scaled, mids)  # midpoints strictly below: a tie rounds down, to the even code ...
    for tie in _TIES_UP:  # ... unless the upper neighbour is the even one
        codes += scaled == tie
    codes = codes.clamp(max=7) | (torch.signbit(v).long() << 3)  # above 6 saturates (bucketize says 7 already)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)  # low nibble = even position
    return packed, (shared + SCALE_BIAS).to(torch.uint8)


_SCRATCH = threading.local()  # this thread's buffers for PackedExperts.rows, by (device, word dtype)


def _scratch(device: torch.device, word: torch.dtype, n: int, groups: int):
    """Buffers for one chunk of n rows of G groups: the scale bytes (n, G) and the lookup index (n, G, 16)
    in int32, the looked-up words (n * G * 16,). Kept from call to call and grown when too small: a LoRA
    step decodes every expert chunk by chunk three times, and a fresh set of buffers per chunk fragments
    the heap that glibc keeps (docs/performance.md)."""
    size = n * groups * (BLOCK // 2)
    cache = _SCRATCH.__dict__.setdefault("bufs", {})
    bufs = cache.get((device, word))
    if bufs is None or bufs[1].numel() < size:
        with torch.inference_mode(False):  # usable in and out of inference mode
            bufs = cache[(device, word)] = (
                torch.empty(size // (BLOCK // 2), dtype=torch.int32, device=device),
                torch.empty(size, dtype=torch.int32, device=device),
                torch.empty(size, dtype=word, device=device),
            )
    high, index, values = bufs
    return high[: n * groups].view(n, groups), index[:size].view(n, groups, BLOCK // 2), values[:size]


class PackedExperts(nn.Module):
    """(E, rows, cols) expert matrices kept as MXFP4 `blocks` and `scales` buffers, decoded as they are used.

    The MoE kernels (moe.py) reach them through three accesses: `linear(e, x, bias)` multiplies by one
    expert, decoding a few rows at a time so the decoded weight never leaves the cache and never exists
    whole; `decode(idx, dtype)` decodes the experts `idx` picks (the compiled decode step gathers them); `dense()`
    decodes all of them (grouped_mm only). Decoding is exact, so each equals the dense path's product up to
    the order of the sums.
    """

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        _check(blocks, scales)
        self.register_buffer("blocks", blocks)  # (E, rows, G, 16) uint8
        self.register_buffer("scales", scales)  # (E, rows, G) uint8

    @property
    def shape(self) -> torch.Size:
        e, rows, groups = self.scales.shape
        return torch.Size((e, rows, groups * BLOCK))

    def extra_repr(self) -> str:
        return f"mxfp4 {tuple(self.shape)}"

    def decode(self, idx, dtype: torch.dtype) -> torch.Tensor:
        """The experts `idx` (an int or an index tensor) picks, decoded: (..., rows, cols) in `dtype`."""
        return _decode(self.blocks[idx], self.scales[idx], dtype)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """Every expert decoded: (E, rows, cols) in `dtype` (E times one expert's memory)."""
        return dequantize(self.blocks, self.scales, dtype)

    def rows(self, e: int, dtype: torch.dtype, device: torch.device):
        """Expert e decoded a chunk of rows at a time: (first row, (step, cols) in `dtype`), ~8 MiB each.
        Each chunk is valid until the next one is asked for: the chunks share one scratch buffer."""
        rows, cols = self.shape[1:]
        # Chunks of equal size (5760 rows: 4 x 1440, not 3 x 1456 + 1392): fewer distinct matmul shapes, each
        # a oneDNN kernel compiled and cached on a CPU (docs/performance.md).
        chunks = -(-rows // max(1, DECODE_CHUNK_BYTES // (cols * dtype.itemsize)))
        step = -(-rows // chunks)
        table = _scaled_pairs(dtype, device)
        word = _WORDS.get(dtype.itemsize)
        words = None if word is None else table.view(word).view(-1)  # (65536,)
        groups = cols // BLOCK
        for r in range(0, rows, step):
            n = min(step, rows - r)
            if word is None or torch.compiler.is_compiling():
                index = (self.scales[e, r : r + n].int() << 8).unsqueeze(-1) | self.blocks[e, r : r + n]
                w = F.embedding(index, table) if word is None else words[index].view(dtype)
                yield r, w.view(n, cols)
                continue
            # One lookup per byte gives both of its values already scaled: (n, G, 16) -> (n, cols). The pair
            # as one machine word: a flat gather, several times faster than embedding's rows.
            high, index, values = _scratch(device, word, n, groups)
            high.copy_(self.scales[e, r : r + n]).bitwise_left_shift_(8)  # (n, G) int32
            torch.bitwise_or(high.unsqueeze(-1), self.blocks[e, r : r + n], out=index)
            torch.index_select(words, 0, index.view(-1), out=values)
            yield r, values.view(dtype).view(n, cols)

    def linear(self, e: int, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (n, cols) -> x @ W_e^T + bias (n, rows) in x's dtype, W_e decoded a chunk of rows at a time.
        Differentiable in x and bias (LoRA trains through a frozen packed base): the backward decodes W_e
        again instead of keeping it, so training holds no decoded expert."""
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _PackedLinear.apply(x, bias, self, e)
        return self._product(e, x, bias)

    def _product(self, e: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = x.new_empty(x.shape[0], self.shape[1])
        for r, w in self.rows(e, x.dtype, x.device):
            if bias is None:
                torch.mm(x, w.t(), out=out[:, r : r + w.shape[0]])
            else:
                torch.addmm(bias[r : r + w.shape[0]], x, w.t(), out=out[:, r : r + w.shape[0]])
        return out

    def _product_t(self, e: int, dy: torch.Tensor) -> torch.Tensor:
        """dy (n, rows) -> dy @ W_e (n, cols): the input gradient, chunk by chunk of W_e's rows."""
        dx = dy.new_zeros(dy.shape[0], self.shape[2])
        for r, w in self.rows(e, dy.dtype, dy.device):
            dx.addmm_(dy[:, r : r + w.shape[0]], w)
        return dx


class _PackedLinear(torch.autograd.Function):
    """x W_e^T + bias through a packed expert, saving nothing but a reference to the packed weight."""

    @staticmethod
    def forward(ctx, x, bias, packed: PackedExperts, e: int):
        ctx.packed, ctx.e = packed, e
        return packed._product(e, x, bias)

    @staticmethod
    def backward(ctx, dy):
        dx = ctx.packed._product_t(ctx.e, dy.contiguous()) if ctx.needs_input_grad[0] else None
        dbias = dy.sum(0) if ctx.needs_input_grad[1] else None
        return dx, dbias, None, None


def pack_experts(model: nn.Module) -> nn.Module:
    """Swap every MLPBlock's mlp1_weight / mlp2_weight parameter for PackedExperts (in place; returns model).

    On the meta device the buffers are empty shapes to load a packed checkpoint into; otherwise the current
    weights are quantised (`quantize`), which rounds them. Already packed blocks are left as they are.
    """
    from .moe import MLPBlock

    for block in model.modules():
        if not isinstance(block, MLPBlock):
            continue
        for name in PACKED:
            weight = block._parameters.get(name)
            if weight is None:
                continue
            e, rows, cols = weight.shape
            if cols % BLOCK:
                raise ValueError(f"{name}: {cols} columns are not a multiple of {BLOCK}, so it cannot be MXFP4")
            if weight.device.type == "meta":
                blocks = torch.empty(e, rows, cols // BLOCK, BLOCK // 2, dtype=torch.uint8, device="meta")
                scales = torch.empty(e, rows, cols // BLOCK, dtype=torch.uint8, device="meta")
            else:
                blocks, scales = quantize(weight.detach())
            del block._parameters[name]
            setattr(block, name, PackedExperts(blocks, scales))
    return model


def packed_bytes(rows: int, cols: int) -> int:
    """Bytes of one expert matrix in MXFP4: half a byte per value plus one scale byte per 32."""
    return rows * math.ceil(cols / 2) + rows * math.ceil(cols / BLOCK)
