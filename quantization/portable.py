"""Torch-only weight-only quantization for devices where bitsandbytes is missing or broken.

`Int8Linear` and `Int4Linear` subclass `torch.nn.Linear` so that peft wraps them as ordinary Linear
base layers (peft dispatches on `isinstance(m, nn.Linear)` and reads `in_features`, `out_features` and
`weight`). Their `weight` is a frozen integer Parameter; peft leaves adapters in their own float dtype
when the base weight is integer, so LoRA trains in fp32 on top of a 4- or 8-bit base.

The matmul dequantizes the weight to the compute dtype on the fly, in forward and again in backward,
and autograd keeps only the packed weight alive: a dequantized copy would cost as much memory as a
bf16 model. Dequantizing a 1536x576 int4 weight costs ~0.7 ms against ~6 ms for its bf16 matmul with
1,024 tokens on a 2-core AMX CPU, so the portable path runs close to bf16 speed.

Int4 layout and error, measured on SmolLM2-135M's projection weights (relative Frobenius error):
asymmetric groups (scale + offset, 16 levels) 8.1%, symmetric absmax groups 11.4%, so groups are
asymmetric. Per-channel symmetric int8 is 0.85%.
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = [
    "Int4Linear",
    "Int8Linear",
    "dequantize_int4",
    "dequantize_int8",
    "quantize_int4",
    "quantize_int8",
    "quantize_linears_",
]

# Int4 scales and offsets are stored in bf16: its 8 exponent bits never overflow on outlier groups
# (fp16 could), its rounding (~0.2%) is far below int4's error, and it halves their overhead
# to 1 bit per weight at group size 32 compared to fp32.
# Groups of 32 (the GGUF Q4_0/Q4_1 block size): on SmolLM2, whose weights come from a Q4_1 GGUF, they land
# on the original 16-level grid, 0.4% relative error against 8% with groups of 64.
INT4_SCALE_DTYPE = torch.bfloat16


# --- quantize / dequantize (pure functions, tested on small tensors) -------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a (out, in) float weight to int8 with one symmetric scale per output row.

    Returns (q, scales): q is int8 (out, in) in [-127, 127], scales is fp32 (out,), and
    `q * scales[:, None]` approximates the weight. All-zero rows get a tiny scale, not a division by 0.
    """
    w = weight.detach().to(torch.float32, copy=True)  # a private copy: rounded in place below
    low, high = torch.aminmax(w, dim=1)  # no |w| temporary: one fewer weight-sized allocation
    scales = torch.maximum(-low, high).clamp_min(1e-12) / 127.0  # (out,)
    q = w.div_(scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rebuild the (out, in) weight in `dtype` from `quantize_int8`'s output."""
    # int8 values are exact in bf16/fp16 (|q| <= 127 < 2**8), so one rounding happens, at the multiply.
    return q.to(dtype) * scales.to(dtype)[:, None]


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a (out, in) float weight to 4 bits in groups of `group_size` along `in`.

    Each group stores 16 levels between its min and max: w ~= q * scale + offset, q in [0, 15].
    Returns (packed, scale, offset):
      packed: uint8 (out, n_groups, group_size // 2); the low nibble holds the group's first half and
        the high nibble its second half, so unpacking is a concatenation, not an interleave.
      scale, offset: bf16 (out, n_groups, 1).
    `in` is zero-padded up to a multiple of `group_size`; the caller keeps `in` to cut the padding off.
    Raises ValueError for an odd or non-positive group size.
    """
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even number, got {group_size}")
    out_features, in_features = weight.shape
    n_groups = -(-in_features // group_size)
    w = weight.detach().to(torch.float32, copy=True)  # a private copy: rounded in place below
    if n_groups * group_size != in_features:
        w = nn.functional.pad(w, (0, n_groups * group_size - in_features))
    w = w.view(out_features, n_groups, group_size)
    low, high = torch.aminmax(w, dim=-1, keepdim=True)  # (out, n_groups, 1) each
    scale = ((high - low) / 15.0).clamp_min(1e-12)
    # Round the scale and offset to their storage dtype first so that the levels chosen here are the
    # levels dequantization will reproduce.
    scale = scale.to(INT4_SCALE_DTYPE).float().clamp_min(1e-12)
    low = low.to(INT4_SCALE_DTYPE).float()
    q = w.sub_(low).div_(scale).round_().clamp_(0, 15).to(torch.uint8)
    half = group_size // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return packed.contiguous(), scale.to(INT4_SCALE_DTYPE), low.to(INT4_SCALE_DTYPE)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rebuild the (out, in_features) weight in `dtype` from `quantize_int4`'s output."""
    q = torch.cat([packed & 0xF, packed >> 4], dim=-1).to(dtype)  # (out, n_groups, group_size)
    # In-place mul_/add_, not addcmul: addcmul with broadcast bf16 operands is 3x slower on CPU
    # (1.8 vs 0.57 ms for a 1536x576 weight), and this runs twice per layer per training step.
    w = q.mul_(scale.to(dtype)).add_(offset.to(dtype)).view(packed.shape[0], -1)
    return w if w.shape[1] == in_features else w[:, :in_features]


# --- the autograd function: keep only packed weights for backward --------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmul runs in: the autocast dtype when autocast is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W.T where W is rebuilt from its quantized form by `layer.dequantize(dtype)`.

    Saves the layer (which owns the packed weight), never the dequantized W, and returns no gradient
    for the weight: the base is frozen, LoRA trains beside it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: _QuantizedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).T

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None


class _QuantizedLinear(nn.Linear):
    """Shared plumbing for the quantized Linear layers: construction without a float weight, forward."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        # Skip nn.Linear.__init__: it would allocate (and random-init) a full float weight.
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The (out_features, in_features) weight in `dtype`."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in the compute dtype (see `_compute_dtype`)."""
        x = x.to(_compute_dtype(x))
        y = _DequantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def reset_parameters(self) -> None:
        # nn.Linear would re-init the weight randomly; a quantized weight is never re-initialised.
        pass


class Int8Linear(_QuantizedLinear):
    """Linear layer with an int8 weight and one fp32 scale per output channel (~1 byte per weight)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(q.shape[1], q.shape[0], bias)
        self.weight = nn.Parameter(q, requires_grad=False)  # int8 (out, in)
        self.register_buffer("weight_scales", scales.float())  # (out,)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize an existing float nn.Linear (its weight is read, not modified)."""
        return cls(*quantize_int8(linear.weight), bias=linear.bias)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scales, dtype)


class Int4Linear(_QuantizedLinear):
    """Linear layer with 4-bit asymmetric groupwise weights, two per uint8 (~5 bits per weight at g=32).

    `weight` is uint8 (out, n_groups, group_size // 2); `weight_scale` and `weight_offset` are bf16
    (out, n_groups, 1).
    """

    def __init__(
        self,
        packed: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        in_features: int,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__(in_features, packed.shape[0], bias)
        self.group_size = packed.shape[2] * 2
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_offset", offset)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        """Quantize an existing float nn.Linear (its weight is read, not modified)."""
        packed, scale, offset = quantize_int4(linear.weight, group_size)
        return cls(packed, scale, offset, linear.in_features, bias=linear.bias)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int4(self.weight, self.weight_scale, self.weight_offset, self.in_features, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


# --- whole-model replacement --------------------------------------------------------------------


def _is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    """True when any dotted component of `name` (or a dotted suffix) equals an entry of `skip`."""
    return any(re.search(rf"(^|\.){re.escape(s)}$", name) for s in skip)


def quantize_linears_(
    model: nn.Module,
    bits: int,
    group_size: int = 32,
    skip: tuple[str, ...] = ("lm_head",),
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Replace every plain nn.Linear in `model` (in place) by an Int8Linear or Int4Linear; return `model`.

    `bits` is 8 or 4; `group_size` applies to 4 bits. Modules whose name ends with an entry of `skip`
    (default: the lm_head, tied to the embeddings in SmolLM2-style models) stay float. Every other
    float parameter (embeddings, norms, skipped heads, biases) is cast to `compute_dtype`.
    Each original Linear is dropped right after its replacement is built, so peak memory grows by one
    layer, not by a second copy of the model. Raises ValueError for other `bits`.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    targets = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not _is_skipped(name, skip)  # exact type: not peft/bnb layers
    ]
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        if bits == 8:
            new = Int8Linear.from_linear(linear)
        else:
            new = Int4Linear.from_linear(linear, group_size)
        setattr(parent, child_name, new)
        del linear  # the last reference: its float weight is freed here, before the next layer
    _cast_float_parameters_(model, compute_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _cast_float_parameters_(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast float parameters to `dtype`; buffers stay as loaded (rotary `inv_freq` must stay fp32)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
