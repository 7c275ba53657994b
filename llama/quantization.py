"""Weight-only quantization of linear layers: the stored representation, and multiplying by it.

Two schemes, both stored in a plain, device-independent layout:

- **int8**: one scale per output row. `codes` int8 [N, K] in -127..127, `scales` bf16 [N];
  weight = codes * scale.
- **int4**: one scale and one zero per group of `group_size` consecutive inputs of a row.
  `codes` uint8 [N, K/2] (input 2j in the low nibble of byte j, 2j+1 in the high nibble), values
  0..15; `scales` and `zeros` bf16 [N, K/group_size]; weight = (code - 8) * scale + zero (the
  zero is the weight value of the middle code, as torch's int4 kernels define it).

Codes are computed from the bf16-rounded scales and zeros, so dequantizing reproduces exactly
what was quantized against. `QuantizedWeight` holds one rank's part of a layer; `linear` is the
one place that chooses how to multiply by it (see `linear` for the measured choice).
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
STORAGE_DTYPE = torch.bfloat16  # scales and zeros
INT8_MAX = 127
INT4_MID = 8  # code of the group's zero
INT4_MAX = 15
# Activation rows up to which torch's int8 weight-only op beats dequantizing then F.linear on
# the CPU (benchmarks/quantized_linear.py; beyond it the matrix product dominates).
INT8_OP_MAX_ROWS = 16
# torch's CPU int4 packing needs the output rows in multiples of this.
INT4_OP_ROW_MULTIPLE = 16
# Rows quantized at a time: bounds the fp32 temporaries to a few tens of MB for any layer.
_ROW_BLOCK = 1024


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: `mode` "int8" or "int4", and the int4 group size (None for int8)."""

    mode: str
    group_size: Optional[int] = None

    def __str__(self) -> str:
        return self.mode if self.group_size is None else f"{self.mode} (group size {self.group_size})"


def make_scheme(mode: str, group_size: Optional[int] = None) -> Scheme:
    """The scheme for `mode` ("int8" or "int4") and, for int4, `group_size` (default 64).

    Raises:
        ValueError: for another mode, a group size other than 32, 64 or 128, or a group size
            given for int8 (which has one scale per output row).
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "int8":
        if group_size is not None:
            raise ValueError("int8 has one scale per output row and takes no group size: drop the group size")
        return Scheme("int8")
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(
            f"int4 group size {group_size!r} is not supported: use one of {', '.join(map(str, GROUP_SIZES))}"
        )
    return Scheme("int4", int(group_size))


def check_groups(key: str, in_features: int, scheme: Scheme, world_size: int, split_inputs: bool) -> None:
    """Check that `scheme`'s groups tile the inputs of the linear weight `key` as each rank holds
    them (`split_inputs`: a row-parallel layer, whose `in_features` are split over the ranks).

    Raises:
        ValueError: naming the tensor, the group size and the share that it does not divide.
    """
    if scheme.group_size is None:
        return
    split = split_inputs and world_size > 1
    share = in_features // world_size if split else in_features
    if share % scheme.group_size == 0:
        return
    fits = [str(g) for g in GROUP_SIZES if share % g == 0]
    fix = f"use group size {' or '.join(fits)}" if fits else "use int8"
    if split:
        raise ValueError(
            f"int4 group size {scheme.group_size} does not divide the inputs of {key} on each rank: it has "
            f"{in_features} input columns, {share} on each of {world_size} model-parallel ranks. "
            f"{fix.capitalize()}, or another number of model-parallel ranks"
        )
    raise ValueError(
        f"int4 group size {scheme.group_size} does not divide the {in_features} input columns of {key}: {fix}"
    )


def int8_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-row int8 scales [N] (bf16) of a whole weight [N, K]: the row's largest magnitude / 127."""
    scales = torch.empty(weight.shape[0], dtype=STORAGE_DTYPE)
    for start in range(0, weight.shape[0], _ROW_BLOCK):
        block = weight[start : start + _ROW_BLOCK].float()
        scales[start : start + _ROW_BLOCK] = (block.abs().amax(dim=1) / INT8_MAX).clamp_min(1e-12)
    return scales


def quantize(
    weight: torch.Tensor, scheme: Scheme, row_scales: Optional[torch.Tensor] = None
) -> Dict[str, torch.Tensor]:
    """The stored parts of `weight` [N, K] under `scheme`: {"weight": codes, "scales": ..., and
    "zeros" for int4}, on the CPU.

    `row_scales` (int8 only) are the scales of the whole rows when `weight` holds only some of a
    row's columns (a row-parallel layer's rank part), so that every rank quantizes against the
    scales of the whole checkpoint.

    Raises:
        ValueError: if `weight` is not 2-D or K is not a multiple of the group size.
    """
    if weight.dim() != 2:
        raise ValueError(f"only 2-D linear weights are quantized, got shape {tuple(weight.shape)}")
    weight = weight.cpu()
    rows, cols = weight.shape
    if scheme.mode == "int8":
        scales = int8_scales(weight) if row_scales is None else row_scales.to(STORAGE_DTYPE)
        codes = torch.empty(rows, cols, dtype=torch.int8)
        for start in range(0, rows, _ROW_BLOCK):
            block = weight[start : start + _ROW_BLOCK].float()
            scale = scales[start : start + _ROW_BLOCK].float()[:, None]
            codes[start : start + _ROW_BLOCK] = (block / scale).round().clamp(-INT8_MAX, INT8_MAX)
        return {"weight": codes, "scales": scales}
    group = scheme.group_size
    if cols % group != 0 or cols % 2 != 0:
        raise ValueError(f"cannot quantize a weight of {cols} inputs in groups of {group}")
    codes = torch.empty(rows, cols // 2, dtype=torch.uint8)
    scales = torch.empty(rows, cols // group, dtype=STORAGE_DTYPE)
    zeros = torch.empty(rows, cols // group, dtype=STORAGE_DTYPE)
    for start in range(0, rows, _ROW_BLOCK):
        block = weight[start : start + _ROW_BLOCK].float().unflatten(1, (-1, group))
        low, high = block.amin(dim=2), block.amax(dim=2)
        scale = ((high - low) / INT4_MAX).clamp_min(1e-8).to(STORAGE_DTYPE)
        zero = (low + INT4_MID * scale.float()).to(STORAGE_DTYPE)
        q = ((block - zero.float()[..., None]) / scale.float()[..., None]).round() + INT4_MID
        q = q.clamp(0, INT4_MAX).to(torch.uint8).flatten(1)
        codes[start : start + _ROW_BLOCK] = q[:, 0::2] | (q[:, 1::2] << 4)
        scales[start : start + _ROW_BLOCK], zeros[start : start + _ROW_BLOCK] = scale, zero
    return {"weight": codes, "scales": scales, "zeros": zeros}


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [N, K/2] (two per byte, low nibble first) -> uint8 [N, K] values 0..15."""
    return torch.stack((codes & 0x0F, codes >> 4), dim=-1).flatten(-2)


def dequantize(
    parts: Dict[str, torch.Tensor], scheme: Scheme, dtype: torch.dtype, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The weight [N, K] in `dtype` that the stored `parts` stand for (written into `out` when
    given: a scratch buffer of that shape and dtype saves an allocation per call)."""
    codes = parts["weight"]
    if scheme.mode == "int4":
        codes = unpack_int4(codes)
    if out is None:
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    out.copy_(codes)
    if scheme.mode == "int8":
        return out.mul_(parts["scales"].to(dtype)[:, None])
    grouped = out.view(out.shape[0], -1, scheme.group_size)
    grouped.sub_(INT4_MID).mul_(parts["scales"].to(dtype)[..., None]).add_(
        parts["zeros"].to(dtype)[..., None]
    )
    return out


class QuantizedWeight(nn.Module):
    """One rank's part of a quantized linear weight [out_features, in_features], in place of the
    layer's `weight` parameter: `llama.kernels.linear(x, weight)` calls its `linear`.

    On the CPU with `torch_ops`, int4 weights are kept only in the packed form of torch's CPU
    int4 kernel (repacked from the plain codes at load, so the memory stays at 4 bits a weight);
    every other case keeps the plain parts.
    """

    def __init__(
        self,
        parts: Dict[str, torch.Tensor],
        scheme: Scheme,
        in_features: int,
        device: torch.device,
        torch_ops: bool = True,
    ):
        super().__init__()
        self.scheme = scheme
        self.out_features, self.in_features = parts["weight"].shape[0], in_features
        self.torch_ops = torch_ops and device.type == "cpu"
        self.register_buffer("int4_packed", None, persistent=False)
        self.register_buffer("int4_scales_and_zeros", None, persistent=False)
        self._part_names: tuple = ()
        if self.torch_ops and scheme.mode == "int4" and self.out_features % INT4_OP_ROW_MULTIPLE == 0:
            values = unpack_int4(parts["weight"]).to(torch.int32)
            self.int4_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
            self.int4_scales_and_zeros = torch.stack(
                (parts["scales"].t(), parts["zeros"].t()), dim=-1
            ).contiguous()
            return
        self._part_names = tuple(parts)
        for name, tensor in parts.items():
            self.register_buffer(name, tensor.to(device).contiguous(), persistent=False)

    @property
    def parts(self) -> Dict[str, torch.Tensor]:
        """The plain stored parts ({} when only torch's packed int4 form is kept)."""
        return {name: getattr(self, name) for name in self._part_names}

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def numel(self) -> int:
        return self.out_features * self.in_features

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype` (only for weights that keep their plain parts)."""
        if not self.parts:
            raise RuntimeError("this weight is held only in torch's packed int4 form")
        return dequantize(self.parts, self.scheme, dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """`F.linear(x, weight)`: see the module-level `linear`."""
        return linear(x, self)


_scratch: Dict[tuple, torch.Tensor] = {}


def _scratch_buffer(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer for a dequantized weight: allocating (and page-faulting) a fresh one per
    call costs more than the dequantization itself on the CPU."""
    key = (dtype, device)
    buffer = _scratch.get(key)
    numel = shape[0] * shape[1]
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x [..., K] times the quantized weight [N, K] transposed -> [..., N] in x's dtype.

    The choice, measured on an AVX2 CPU (benchmarks/quantized_linear.py):
    - int4 on the CPU: torch's `_weight_int4pack_mm_for_cpu` on bf16 activations, for any
      number of rows (its weight-only kernel; the only form the weight is kept in);
    - int8 on the CPU, up to `INT8_OP_MAX_ROWS` rows: torch's `_weight_int8pack_mm` on bf16
      activations;
    - everything else (more rows, GPUs, torch ops off): dequantize into x's dtype, then
      `F.linear` (the plain path, identical on every device).
    torch's weight-only kernels are fast only for bf16 activations, so fp32 activations are
    rounded to bf16 for them and the result returned in fp32.
    """
    rows = x.numel() // max(weight.in_features, 1)
    flat = x.reshape(-1, weight.in_features)
    if weight.int4_packed is not None:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat.to(torch.bfloat16),
            weight.int4_packed,
            weight.scheme.group_size,
            weight.int4_scales_and_zeros,
        )
        return out.to(x.dtype).view(*x.shape[:-1], weight.out_features)
    if weight.torch_ops and weight.scheme.mode == "int8" and 0 < rows <= INT8_OP_MAX_ROWS:
        out = torch.ops.aten._weight_int8pack_mm(
            flat.to(torch.bfloat16), weight.parts["weight"], weight.parts["scales"]
        )
        return out.to(x.dtype).view(*x.shape[:-1], weight.out_features)
    if torch.compiler.is_compiling():
        return F.linear(x, weight.dequantize(x.dtype))
    buffer = _scratch_buffer(weight.shape, x.dtype, x.device)
    return F.linear(x, dequantize(weight.parts, weight.scheme, x.dtype, out=buffer))
