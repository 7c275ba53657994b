"""Which operation multiplies by a quantized weight, per (device type, scheme): one table.

`TABLE` holds the choices; `choose` applies them, with the checks that can only be made on the
running machine (torch's CPU int4 converter and kernel round-trip, `llama.int4_pack`). A choice
that falls back from the table's operation to dequantizing the whole weight per call says so in a
warning, once per process and reason, and in `python -m llama.kernels`.

Measured on an AVX2 CPU (benchmarks/quantized_linear.py, benchmarks/RESULTS.md): torch's CPU
weight-only kernels beat dequantize + fp32 matmul up to 64 activation rows, and for bf16
activations at any row count on CPUs without bf16 instructions. The CUDA entries are not
measured here (no GPU): they avoid a whole-weight dequantization per call, which on a GPU costs a
full write and read of the weight in 16 bits for every matrix product.
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

    `op` (a torch operator name, None for none) is used for calls of at most `max_rows` rows of
    activations (None: any number), and on CPUs without bf16 instructions for bf16 activations of
    any number of rows; every other call dequantizes the weight into the activations' dtype and
    runs `F.linear`. `packing` is what loading does to the stored parts, once.
    """

    name: str
    op: Optional[str]
    packing: str
    max_rows: Optional[int] = None

    @property
    def dequantizes(self) -> bool:
        """Whether every call dequantizes the whole weight (no weight-only operator)."""
        return self.op is None


DEQUANTIZE = Backend("dequantize", None, "stored parts kept as they are")

TABLE: Dict[Tuple[str, str], Backend] = {
    ("cpu", "int8"): Backend(
        "torch-int8pack-cpu",
        "aten._weight_int8pack_mm",
        "int8 codes [N, K] and bf16 scales as stored, contiguous and 64-byte aligned",
        CPU_OP_MAX_ROWS,
    ),
    ("cpu", "int4"): Backend(
        "torch-int4pack-cpu",
        "aten._weight_int4pack_mm_for_cpu",
        "codes packed by aten._convert_weight_to_int4pack_for_cpu (this CPU's layout), rows padded to 64",
        CPU_OP_MAX_ROWS,
    ),
    ("cuda", "int8"): Backend(
        "torch-int8pack-cuda",
        "aten._weight_int8pack_mm",
        "int8 codes [N, K] and bf16 scales copied to the GPU as stored",
    ),
    ("cuda", "int4"): Backend(
        "torch-int4pack-cuda",
        "aten._weight_int4pack_mm",
        "codes packed by aten._convert_weight_to_int4pack (CUDA tiles), rows padded to 64",
    ),
}


_warned: Set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=3)


def fallback_reason(device_type: str, mode: str, in_features: Optional[int] = None) -> Optional[str]:
    """Why `choose` would not take `TABLE`'s operation for this device and scheme (None: it would).
    On the CPU this runs the int4 round trip once per process."""
    if (device_type, mode) not in TABLE:
        return f"no weight-only {mode} operator for {device_type} devices"
    if device_type == "cpu" and mode == "int4":
        usable, found = int4_pack.cpu_round_trip()
        if not usable:
            return f"torch's CPU int4 kernel is not usable on this CPU ({found})"
    if device_type == "cuda" and mode == "int4" and in_features is not None:
        if int4_pack.cuda_inner_k_tiles(in_features) is None:
            return f"CUDA's int4 packing needs a multiple of 32 inputs per layer, not {in_features}"
    return None


def choose(device_type: str, mode: str, in_features: Optional[int] = None, torch_ops: bool = True) -> Backend:
    """The backend for a `mode` ("int8"/"int4") weight of `in_features` inputs on a `device_type`
    ("cpu", "cuda", ...) device: `TABLE`'s entry, or `DEQUANTIZE` when `torch_ops` is off (the
    hand-written kernels are turned off) or the entry cannot run here; that fallback warns, once
    per reason."""
    if not torch_ops:
        return DEQUANTIZE
    reason = fallback_reason(device_type, mode, in_features)
    if reason is not None:
        _warn_once(
            f"{mode} linear layers on {device_type} dequantize their whole weight on every call: {reason}"
        )
        return DEQUANTIZE
    return TABLE[(device_type, mode)]


def uses_op(backend: Backend, rows: int, dtype: torch.dtype, device_type: str) -> bool:
    """Whether a call with `rows` rows of `dtype` activations takes `backend.op` (else it
    dequantizes): up to `max_rows` rows, and any number of bf16 rows on a CPU without bf16
    instructions, where torch's bf16 matmul is several times slower than the weight-only kernels."""
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
        reason = fallback_reason(device_type, mode)
        entry = TABLE.get((device_type, mode), DEQUANTIZE)
        if reason is not None:
            lines.append(f"{mode}: dequantize the whole weight per call (FALLBACK: {reason})")
            continue
        rows = "any number of rows" if entry.max_rows is None else f"up to {entry.max_rows} rows"
        if entry.max_rows is not None and uses_op(entry, entry.max_rows + 1, torch.bfloat16, device_type):
            rows += " (any number of bf16 rows: no bf16 instructions here)"
        lines.append(f"{mode}: {entry.op} for {rows}; load: {entry.packing}")
    return lines
