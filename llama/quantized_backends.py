"""Which operation multiplies by a quantized weight, per (device type, scheme): one table.

`TABLE` holds the choices, the preferred first; `choose` takes the first that runs here, with
the checks that can only be made on the running machine (a hand-written kernel variant built and
proven on this CPU, `llama.kernels`; torch's CPU int4 converter and kernel round-trip,
`llama.int4_pack`). A choice that falls back to dequantizing the whole weight per call says so
in a warning, once per process and reason, and in `python -m llama.kernels`.

On the CPU, decoding (1 to `kernels.MAX_ROWS` rows of activations) multiplies with the
hand-written int8/int4 matrix-vector kernels, which stream each weight row once at its quantized
size (benchmarks/quantized_linear.py). More rows take torch's weight-only kernels (int8: the
same stored codes) up to `CPU_OP_MAX_ROWS` rows, then dequantize. torch's int4 kernel needs
torch's own packing, so an int4 weight packed for the hand-written kernel keeps that kernel, in
passes of `kernels.MAX_ROWS` rows, up to `CPU_OP_MAX_ROWS` rows instead (keeping both packings
would double its memory). Measured on an AVX2 CPU: torch's CPU weight-only kernels beat
dequantize + fp32 matmul up to 64 activation rows, and for bf16 activations at any row count on
CPUs without bf16 instructions. The CUDA entries are not measured here (no GPU): they avoid a
whole-weight dequantization per call, which on a GPU costs a full write and read of the weight in
16 bits for every matrix product.
"""

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import torch

from llama import int4_pack, kernels

# Rows of activations up to which torch's CPU weight-only kernels beat dequantizing then an fp32
# F.linear on an AVX2 CPU (benchmarks/quantized_linear.py: faster up to 64 rows, slower from 96).
CPU_OP_MAX_ROWS = 64


@dataclass(frozen=True)
class Backend:
    """How a quantized linear layer multiplies.

    `kernel` ("int8"/"int4", None for none) names the hand-written matrix-vector kernel
    (`llama.kernels.int8_gemv` / `int4_gemv`), used for calls of at most `kernel_max_rows` rows
    (in passes of `kernels.MAX_ROWS`) when it applies to the activations
    (`kernels.quantized_kernel_applies`). `op` (a torch operator name, None for none) is used for
    other calls of at most `max_rows` rows (None: any number), and on CPUs without bf16
    instructions for bf16 activations of any number of rows; every other call dequantizes the
    weight into the activations' dtype and runs `F.linear`. `packing` is what loading does to the
    stored parts, once: `int4_layout` names the form int4 codes are packed in, "kernel"
    (`int4_pack.kernel_pack`), "torch" (torch's converter for the device) or None (kept as stored).
    """

    name: str
    op: Optional[str]
    packing: str
    max_rows: Optional[int] = None
    kernel: Optional[str] = None
    kernel_max_rows: int = 0
    int4_layout: Optional[str] = None

    @property
    def dequantizes(self) -> bool:
        """Whether every call dequantizes the whole weight (no kernel, no weight-only operator)."""
        return self.op is None and self.kernel is None


DEQUANTIZE = Backend("dequantize", None, "stored parts kept as they are")

_INT8_STORED = "int8 codes [N, K] and bf16 scales as stored, contiguous and 64-byte aligned"
TORCH_CPU_INT8 = Backend("torch-int8pack-cpu", "aten._weight_int8pack_mm", _INT8_STORED, CPU_OP_MAX_ROWS)
TORCH_CPU_INT4 = Backend(
    "torch-int4pack-cpu",
    "aten._weight_int4pack_mm_for_cpu",
    "codes packed by aten._convert_weight_to_int4pack_for_cpu (this CPU's layout), rows padded to 64",
    CPU_OP_MAX_ROWS,
    int4_layout="torch",
)

TABLE: Dict[Tuple[str, str], Tuple[Backend, ...]] = {
    ("cpu", "int8"): (
        Backend(
            "codellama-int8-cpu",
            "aten._weight_int8pack_mm",
            _INT8_STORED,
            CPU_OP_MAX_ROWS,
            kernel="int8",
            kernel_max_rows=kernels.MAX_ROWS,
        ),
        TORCH_CPU_INT8,
    ),
    ("cpu", "int4"): (
        Backend(
            "codellama-int4-cpu",
            None,
            "codes, scales and zeros packed by int4_pack.kernel_pack (one sequential read per row), "
            "rows padded to 64",
            kernel="int4",
            kernel_max_rows=CPU_OP_MAX_ROWS,
            int4_layout="kernel",
        ),
        TORCH_CPU_INT4,
    ),
    ("cuda", "int8"): (
        Backend(
            "torch-int8pack-cuda",
            "aten._weight_int8pack_mm",
            "int8 codes [N, K] and bf16 scales copied to the GPU as stored",
        ),
    ),
    ("cuda", "int4"): (
        Backend(
            "torch-int4pack-cuda",
            "aten._weight_int4pack_mm",
            "codes packed by aten._convert_weight_to_int4pack (CUDA tiles), rows padded to 64",
            int4_layout="torch",
        ),
    ),
}


_warned: Set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=3)


def unusable_reason(backend: Backend, device_type: str, in_features: Optional[int] = None) -> Optional[str]:
    """Why `backend` cannot run here (None: it can). Builds the kernels, or runs torch's CPU int4
    round trip, once per process."""
    if backend.kernel is not None:
        if not kernels.enabled():
            return "the hand-written kernels are turned off"
        if device_type != "cpu" or not kernels.kernel_available():
            return "no hand-written kernel variant runs on this CPU"
        return None
    if backend.op == "aten._weight_int4pack_mm_for_cpu":
        usable, found = int4_pack.cpu_round_trip()
        if not usable:
            return f"torch's CPU int4 kernel is not usable on this CPU ({found})"
    if backend.op == "aten._weight_int4pack_mm" and in_features is not None:
        if int4_pack.cuda_inner_k_tiles(in_features) is None:
            return f"CUDA's int4 packing needs a multiple of 32 inputs per layer, not {in_features}"
    return None


def _first_usable(device_type: str, mode: str, in_features: Optional[int]) -> Tuple[Optional[Backend], str]:
    entries = TABLE.get((device_type, mode), ())
    if not entries:
        return None, f"no weight-only {mode} operator for {device_type} devices"
    reasons = []
    for entry in entries:
        reason = unusable_reason(entry, device_type, in_features)
        if reason is None:
            return entry, ""
        reasons.append(reason)
    return None, "; ".join(reasons)


def fallback_reason(device_type: str, mode: str, in_features: Optional[int] = None) -> Optional[str]:
    """Why `choose` would take no entry of `TABLE` for this device and scheme and dequantize
    instead (None: it takes one)."""
    entry, reason = _first_usable(device_type, mode, in_features)
    return None if entry is not None else reason


def choose(device_type: str, mode: str, in_features: Optional[int] = None, torch_ops: bool = True) -> Backend:
    """The backend for a `mode` ("int8"/"int4") weight of `in_features` inputs on a `device_type`
    ("cpu", "cuda", ...) device: the first entry of `TABLE` that runs here, or `DEQUANTIZE` when
    `torch_ops` is off (the hand-written kernels are turned off) or none runs here; that fallback
    warns, once per reason."""
    if not torch_ops:
        return DEQUANTIZE
    entry, reason = _first_usable(device_type, mode, in_features)
    if entry is None:
        _warn_once(
            f"{mode} linear layers on {device_type} dequantize their whole weight on every call: {reason}"
        )
        return DEQUANTIZE
    return entry


def uses_kernel(backend: Backend, rows: int) -> bool:
    """Whether a call with `rows` rows of activations is for `backend.kernel` (if the kernel
    applies to the activations, `kernels.quantized_kernel_applies`)."""
    return backend.kernel is not None and 1 <= rows <= backend.kernel_max_rows


def uses_op(backend: Backend, rows: int, dtype: torch.dtype, device_type: str) -> bool:
    """Whether a call with `rows` rows of `dtype` activations that the kernel does not take takes
    `backend.op` (else it dequantizes): up to `max_rows` rows, and any number of bf16 rows on a
    CPU without bf16 instructions, where torch's bf16 matmul is several times slower than the
    weight-only kernels."""
    if backend.op is None or rows <= 0:
        return False
    if backend.max_rows is None or rows <= backend.max_rows:
        return True
    return device_type == "cpu" and dtype == torch.bfloat16 and not kernels.cpu_has_avx512_bf16()


def describe(device_type: str = "cpu") -> List[str]:
    """One line per scheme: the backend `choose` takes on `device_type` here, and when it
    dequantizes instead."""
    lines = []
    for mode in ("int8", "int4"):
        entry, reason = _first_usable(device_type, mode, None)
        if entry is None:
            lines.append(f"{mode}: dequantize the whole weight per call (FALLBACK: {reason})")
            continue
        parts = []
        if entry.kernel is not None:
            most = entry.kernel_max_rows
            passes = f" in passes of {kernels.MAX_ROWS}" if most > kernels.MAX_ROWS else ""
            parts.append(f"codellama {entry.kernel} kernel ({kernels.variant()}) for 1-{most} rows{passes}")
        if entry.op is not None:
            rows = "any number of rows" if entry.max_rows is None else f"up to {entry.max_rows} rows"
            if entry.max_rows is not None and uses_op(entry, entry.max_rows + 1, torch.bfloat16, device_type):
                rows += " (any number of bf16 rows: no bf16 instructions here)"
            parts.append(f"{entry.op} for {'other calls of ' if entry.kernel else ''}{rows}")
        if entry.op is None or entry.max_rows is not None:
            parts.append("dequantize the whole weight for more rows")
        lines.append(f"{mode}: {', '.join(parts)}; load: {entry.packing}")
    return lines
