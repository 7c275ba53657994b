"""Weight-only quantization of linear layers: the stored representation, and multiplying by it.

Two schemes, both stored in a plain, device-independent layout:

- **int8**: one scale per output row. `codes` int8 [N, K] in -127..127, `scales` bf16 [N];
  weight = codes * scale.
- **int4**: one scale and one zero per group of `group_size` consecutive inputs of a row.
  `codes` uint8 [N, K/2] (input 2j in the low nibble of byte j, 2j+1 in the high nibble), values
  0..15; `scales` and `zeros` bf16 [N, K/group_size]; weight = (code - 8) * scale + zero (the
  zero is the weight value of the middle code, as torch's int4 kernels define it).

Codes are computed from the bf16-rounded scales and zeros, so dequantizing reproduces exactly
what was quantized against. `QuantizedWeight` holds one rank's part of a layer in the form its
backend reads (`llama.quantized_backends`: one table per device and scheme); `linear` multiplies
by it.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llama import alignment, int4_pack, kernels, quantized_backends
from llama.layout import QUANTIZED_PARTS

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
STORAGE_DTYPE = torch.bfloat16  # scales and zeros
INT8_MAX = 127
INT4_MID = int4_pack.INT4_MID  # code of the group's zero
INT4_MAX = 15
# Rows quantized at a time: bounds the fp32 temporaries to a few tens of MB for any layer.
_ROW_BLOCK = 1024


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: `mode` "int8" or "int4", and the int4 group size (None for int8)."""

    mode: str
    group_size: Optional[int] = None

    def __str__(self) -> str:
        return self.mode if self.group_size is None else f"{self.mode} with group size {self.group_size}"


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


unpack_int4 = int4_pack.unpack_plain


def dequantize(
    parts: Dict[str, torch.Tensor], scheme: Scheme, dtype: torch.dtype, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The weight [N, K] in `dtype` that the stored `parts` stand for (written into `out` when
    given: a scratch buffer of that shape and dtype saves an allocation per call)."""
    codes = parts["weight"]
    if scheme.mode == "int4":
        codes = int4_pack.unpack_plain(codes)
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

    `backend` (`llama.quantized_backends.choose`) decides the form kept, once, at load: for the
    hand-written int4 kernel the codes, scales and zeros are packed together row by row
    (`llama.int4_pack.kernel_pack`); for torch's int4 kernels the codes are packed by torch's own
    converter for this device; both pad the rows to a multiple of 64 and keep only that form, so
    the memory stays at 4 bits a weight. Otherwise (int8 for every backend) the stored parts are
    kept. Every tensor kept is contiguous and starts at a 64-byte boundary, whatever its offset
    in the file, and the large ones are on huge pages where the CPU's system has them
    (`llama.alignment.place_weight`).
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
        self.backend = quantized_backends.choose(device.type, scheme.mode, in_features, torch_ops)
        self.packed = scheme.mode == "int4" and self.backend.int4_layout is not None
        self.kernel_packed = self.packed and self.backend.int4_layout == "kernel"
        # How to read torch's packed codes back (None: unknown here, ask the kernel; see `_values`).
        torch_packed = self.packed and not self.kernel_packed
        self.layout = int4_pack.cpu_layout() if torch_packed and device.type == "cpu" else None
        if self.kernel_packed:
            codes = int4_pack.kernel_pack(parts["weight"], parts["scales"], parts["zeros"], scheme.group_size)
            self.register_buffer("codes", alignment.place_weight(codes), persistent=False)
        elif self.packed:
            rows = int4_pack.padded_rows(self.out_features)
            values = F.pad(int4_pack.unpack_plain(parts["weight"]), (0, 0, 0, rows - self.out_features))
            values[self.out_features :] = INT4_MID
            if device.type == "cpu":
                codes = int4_pack.cpu_pack(values)
            else:
                codes = int4_pack.cuda_pack(values, device)
            pairs = int4_pack.scales_and_zeros(parts["scales"], parts["zeros"], rows).to(device)
            self.register_buffer("codes", alignment.place_weight(codes), persistent=False)
            self.register_buffer("scales_and_zeros", alignment.place_weight(pairs), persistent=False)
        else:
            for name, part in (
                ("codes", parts["weight"]),
                *((k, parts[k]) for k in QUANTIZED_PARTS if k in parts),
            ):
                self.register_buffer(name, alignment.place_weight(part.to(device)), persistent=False)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def numel(self) -> int:
        return self.out_features * self.in_features

    def _kernel_parts(self) -> Dict[str, torch.Tensor]:
        codes, scales, zeros = int4_pack.kernel_unpack(
            self.codes, self.out_features, self.in_features, self.scheme.group_size
        )
        return {"weight": codes, "scales": scales, "zeros": zeros}

    def _values(self) -> torch.Tensor:
        """The int4 values [padded rows, in_features] (uint8 0..15) of torch's packed codes: read back
        through the known layout, or, where the packing is not known here, multiplied out of the
        kernel itself (the identity times the weight with every scale 1 and zero 8 gives the
        values exactly; slow, for inspection only: `linear` never needs it then)."""
        rows = self.scales_and_zeros.shape[1]
        if self.layout is not None:
            return self.layout.unpack(self.codes, rows, self.in_features)
        unit = torch.empty_like(self.scales_and_zeros)
        unit[..., 0], unit[..., 1] = 1, INT4_MID
        values = torch.empty(rows, self.in_features, dtype=torch.uint8, device=self.codes.device)
        for first in range(0, self.in_features, 256):
            eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.codes.device)[
                first : first + 256
            ]
            values[:, first : first + eye.shape[0]] = self._int4_op(eye, unit).T.to(torch.uint8)
        return values

    def _int4_op(self, x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        if self.codes.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.codes, self.scheme.group_size, pairs)
        return torch.ops.aten._weight_int4pack_mm(x, self.codes, self.scheme.group_size, pairs)

    def parts(self) -> Dict[str, torch.Tensor]:
        """The stored parts this weight was built from, in the stored layout."""
        if self.kernel_packed:
            return self._kernel_parts()
        if not self.packed:
            parts = {"weight": self.codes, "scales": self.scales}
            return parts if self.scheme.mode == "int8" else {**parts, "zeros": self.zeros}
        pairs = self.scales_and_zeros.transpose(0, 1)[: self.out_features]
        return {
            "weight": int4_pack.pack_plain(self._values()[: self.out_features]),
            "scales": pairs[..., 0].contiguous(),
            "zeros": pairs[..., 1].contiguous(),
        }

    def dequantize(self, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight [N, K] in `dtype` (written into `out` when given)."""
        if self.kernel_packed:
            fast = dtype in kernels.QUANTIZED_ACTIVATION_DTYPES and not torch.compiler.is_compiling()
            if fast and kernels.enabled() and kernels.kernel_available():
                return kernels.int4_dequantize(
                    self.codes, self.out_features, self.in_features, self.scheme.group_size, dtype, out
                )
            return dequantize(self._kernel_parts(), self.scheme, dtype, out)
        if not self.packed:
            return dequantize(
                {"weight": self.codes, "scales": self.scales, **self._zeros()}, self.scheme, dtype, out
            )
        values = self._values()[: self.out_features]
        pairs = self.scales_and_zeros.transpose(0, 1)[: self.out_features]
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.codes.device)
        out.copy_(values)
        grouped = out.view(self.out_features, -1, self.scheme.group_size)
        grouped.sub_(INT4_MID).mul_(pairs[..., 0, None].to(dtype)).add_(pairs[..., 1, None].to(dtype))
        return out

    def _zeros(self) -> Dict[str, torch.Tensor]:
        return {"zeros": self.zeros} if self.scheme.mode == "int4" else {}

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether `linear(x, self)` takes the backend's hand-written kernel
        (`llama.quantized_backends.uses_kernel`, `llama.kernels.quantized_kernel_applies`)."""
        rows = x.numel() // max(self.in_features, 1)
        if not quantized_backends.uses_kernel(self.backend, rows):
            return False
        if rows > kernels.MAX_ROWS:  # taken in passes: ask about one row of the same kind
            x = x.reshape(-1, self.in_features)[:1]
        return kernels.quantized_kernel_applies(x, self.in_features)

    def uses_op(self, x: torch.Tensor) -> bool:
        """Whether `linear(x, self)` takes the backend's torch weight-only operator (see `path`)."""
        return self.path(x) == "op"

    def path(self, x: torch.Tensor) -> str:
        """How `linear(x, self)` multiplies: "kernel" (`uses_kernel`), "op" (torch's weight-only
        operator: `llama.quantized_backends.uses_op`; torch-packed codes whose layout is not
        known here always take it) or "dequantize" (the whole weight, then `F.linear`)."""
        if self.uses_kernel(x):
            return "kernel"
        rows = x.numel() // max(self.in_features, 1)
        if self.packed and not self.kernel_packed and self.layout is None:
            return "op" if rows > 0 else "dequantize"
        op = quantized_backends.uses_op(self.backend, rows, x.dtype, x.device.type)
        return "op" if op else "dequantize"

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """`F.linear(x, weight)`: see the module-level `linear`."""
        return linear(x, self)


_scratch: Dict[tuple, torch.Tensor] = {}


def _scratch_buffer(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer for a dequantized weight: allocating (and page-faulting) a fresh one per
    call costs more than the dequantization itself on the CPU."""
    key = (dtype, device, torch.is_inference_mode_enabled())  # an inference tensor is read-only outside
    buffer = _scratch.get(key)
    numel = shape[0] * shape[1]
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x [..., K] times the quantized weight [N, K] transposed -> [..., N] in x's dtype.

    Takes the path `QuantizedWeight.path` names: the hand-written kernel for a few rows ( activations and
    output in x's dtype, more rows than `kernels.MAX_ROWS` in passes), else the weight's backend
    operator (torch's weight-only kernels,
    which read the weights once at their quantized size and take bf16 activations: others are
    rounded to bf16 for them and the result converted back), else dequantizes into x's dtype
    (into a reused buffer) and runs `F.linear`, at the matrix-product speed of that dtype.
    """
    path = weight.path(x)
    if path == "kernel":
        return _kernel_linear(x, weight)
    if path == "op":
        flat = x.reshape(-1, weight.in_features).to(torch.bfloat16)
        if weight.packed:
            out = weight._int4_op(flat, weight.scales_and_zeros)[:, : weight.out_features]
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat, weight.codes, weight.scales)
        return out.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)
    if torch.compiler.is_compiling():
        return F.linear(x, weight.dequantize(x.dtype))
    return F.linear(x, weight.dequantize(x.dtype, out=_scratch_buffer(weight.shape, x.dtype, x.device)))


def fused_linear_applies(x: torch.Tensor, weights: Sequence[object]) -> bool:
    """Whether `fused_linear(x, weights)` takes one kernel call: 2 to `kernels.MAX_FUSED`
    quantized weights of one scheme, backend and input size, which `linear` would multiply by
    `x` with the hand-written kernel (`QuantizedWeight.path`), at most `kernels.MAX_ROWS` rows."""
    if not 2 <= len(weights) <= kernels.MAX_FUSED or not all(isinstance(w, QuantizedWeight) for w in weights):
        return False
    first = weights[0]
    same = all(
        w.scheme == first.scheme
        and w.backend == first.backend
        and w.in_features == first.in_features
        and w.kernel_packed == first.kernel_packed
        for w in weights
    )
    return same and x.numel() // max(first.in_features, 1) <= kernels.MAX_ROWS and first.path(x) == "kernel"


def fused_linear(x: torch.Tensor, weights: Sequence[QuantizedWeight]) -> List[torch.Tensor]:
    """`[linear(x, w) for w in weights]` in one call of the int8 or int4 kernel, each output bit
    for bit the same (views of one shared buffer). Check `fused_linear_applies` first.

    Raises:
        ValueError: if the weights or activations do not fit the kernel (nothing was read).
    """
    first = weights[0]
    if first.scheme.mode == "int8":
        return kernels.int8_gemv_fused(x, [(w.codes, w.scales) for w in weights])
    return kernels.int4_gemv_fused(
        x, [(w.codes, w.out_features) for w in weights], first.in_features, first.scheme.group_size
    )


def _kernel_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    rows = x.numel() // weight.in_features
    if rows > kernels.MAX_ROWS:  # in passes: each row's result is the same as alone
        flat = x.reshape(rows, weight.in_features)
        passes = [
            _kernel_linear(flat[i : i + kernels.MAX_ROWS], weight) for i in range(0, rows, kernels.MAX_ROWS)
        ]
        return torch.cat(passes).view(*x.shape[:-1], weight.out_features)
    if weight.scheme.mode == "int8":
        return kernels.int8_gemv(x, weight.codes, weight.scales)
    return kernels.int4_gemv(
        x, weight.codes, weight.out_features, weight.in_features, weight.scheme.group_size
    )
