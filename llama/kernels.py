"""Hand-written CPU kernels for decoding and prefill attention, and the fallback to torch.

Decoding one token multiplies a few rows of activations by every weight matrix, so its speed is the
speed of reading the weights. torch's bf16 matrix-vector product reads them well below the memory
bandwidth on CPUs; the kernel here streams each weight row once (fp32 accumulation) split over the
OpenMP threads torch uses. It takes fp32 weights too: torch's fp32 product picks its reduction order
by the number of rows (1, 2-3, 4 or more give different roundings), the kernel gives a row the same
result with any 1 to 8 rows, and for few rows is faster. The decode-attention kernel reads each
row's cached keys and values once, in fp32 arithmetic, up to that row's own length (no mask), where
torch's fused attention is built for long query blocks. The prefill-attention kernel scores several
keys per instruction from a regrouped copy of the keys and visits only the keys each token sees
(causal, no mask), in fp32 like the decode kernel. The int8 decode-attention kernel
(`decode_attention_int8`) does the same over an int8 KV cache (`llama.kv_cache.Int8KVCache`),
reading its codes and per-position scales in place. The rotary kernel rotates every head of a chunk
in one pass, bit-identical to the torch operations. Weight-only quantized layers decode with int8
and int4 matrix-vector kernels (`int8_gemv`, `int4_gemv`; `llama.quantized_backends` decides when)
that stream each weight row once at its quantized size. `fused_linear`, `int8_gemv_fused` and
`int4_gemv_fused` multiply several weights sharing the activations (a layer's q/k/v, or gate/up
projections) in one call, each output bit for bit its own call's. `rms_norm` normalizes bf16 rows in
one pass, bit-identical to the torch operations of `llama.model.RMSNorm`.

Every kernel exists in two variants (C++ in `llama/csrc/`, built by `llama.kernel_build`):
"avx512bf16" (bf16 dot-product instructions) and "avx2" (AVX2 and FMA: bf16 widened to fp32 with
shifts). `variant()` names the one in use: the fastest this CPU runs, or the one named by
`CODELLAMA_KERNEL_VARIANT`. Each output is computed by the same operations in the same order
whatever the number of rows in the call, so a row's result never depends on its batch.

`linear(x, weight)` is `F.linear(x, weight)` everywhere: it takes the kernel only for bf16 or
fp32 inputs of at most `MAX_ROWS` rows when a variant is available, and falls back to `F.linear` on GPUs,
other CPUs, other dtypes, with autograd, or when the kernels cannot be built;
`attention_applies`, `int8_attention_applies`, `prefill_attention_applies` and `rotary_applies` say
when `decode_attention`, `decode_attention_int8`, `prefill_attention` and `rotary` may replace the
torch operations. The
kernels are compiled with the system C++ compiler on first use and cached
(`CODELLAMA_KERNEL_CACHE`, default `~/.cache/codellama`); `CODELLAMA_KERNELS=0` or
`set_enabled(False)` turns them off. A build failure is a warning and torch's operations are
used, except with `CI=true` in the environment, where it is an error.
"""

import ctypes
import os
import threading
import warnings
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from llama import kernel_build

# Rows of activations up to which the matrix-vector kernel beats a matrix-matrix product.
MAX_ROWS = 8

_enabled = os.environ.get("CODELLAMA_KERNELS", "1") != "0"
_library: Optional[ctypes.CDLL] = None
_variant: Optional[str] = None
_available: Optional[bool] = None  # None until the first attempt to load a variant
_lock = threading.Lock()

# Status codes of the C entry points (llama/csrc/common.h).
_UNSUPPORTED, _NO_MEMORY, _BAD_SIZES = 1, 2, 3


def set_enabled(enabled: bool) -> None:
    """Use the hand-written kernels where they apply (True) or always torch's own (False)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    """Whether `linear` may use the hand-written kernel (the setting, not the CPU's ability)."""
    return _enabled


def cpu_has_avx512_bf16() -> bool:
    """True on an x86 CPU (Linux) whose flags include avx512_bf16 (and avx512bw/vl for the loads,
    avx512_vnni for the int8 kernel: the "avx512bf16" variant's flags)."""
    return "avx512bf16" in kernel_build.cpu_variants()


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _preferred_variants() -> list:
    """The variants to try, in order: `CODELLAMA_KERNEL_VARIANT` if set, else every variant this
    CPU runs, the fastest first."""
    forced = os.environ.get("CODELLAMA_KERNEL_VARIANT")
    if forced:
        if forced not in kernel_build.VARIANTS:
            raise ValueError(
                f"CODELLAMA_KERNEL_VARIANT={forced!r} is not a kernel variant; use one of "
                f"{', '.join(kernel_build.VARIANTS)}"
            )
        return [forced] if forced in kernel_build.cpu_variants() else []
    return kernel_build.cpu_variants()


def _load(variant: str) -> Optional[ctypes.CDLL]:
    """The built library of `variant`; None with a RuntimeWarning when it cannot be built.

    Raises:
        RuntimeError: instead of the warning when `CI=true`.
    """
    try:
        return kernel_build.load(variant)
    except kernel_build.KernelBuildError as err:
        if _in_ci():
            raise RuntimeError(f"the {variant} kernels could not be built (CI=true): {err}") from err
        warnings.warn(
            f"the {variant} kernels could not be built ({str(err)[:800]}); using torch's operations instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _proven(variant: str, library: ctypes.CDLL) -> bool:
    """Whether `library` ran a test call correctly in a child process; a RuntimeWarning if not
    (the CPU flags promised instructions that this CPU or virtual machine refuses)."""
    refused = kernel_build.prove_library(library)
    if refused is not None:
        warnings.warn(
            f"the {variant} kernels were built but do not run here ({refused}); trying the next variant",
            RuntimeWarning,
            stacklevel=3,
        )
    return refused is None


def kernel_available() -> bool:
    """True if a kernel variant runs on this machine (building it and proving it with a test call
    in a child process on the first call, `llama.kernel_build.prove_library`).

    False on other CPUs, or (with a RuntimeWarning) when the compiler fails or a built variant
    does not run.

    Raises:
        RuntimeError: when the build fails and `CI=true`.
        ValueError: when `CODELLAMA_KERNEL_VARIANT` names no variant.
    """
    global _library, _variant, _available
    if _available is not None:
        return _available
    with _lock:
        if _available is None:
            for name in _preferred_variants():
                library = _load(name)
                if library is not None and _proven(name, library):
                    _library, _variant = library, name
                    break
            _available = _library is not None
    return _available


def variant() -> Optional[str]:
    """The kernel variant in use: "avx512bf16", "avx2", or None when no variant runs here (the CPU
    has neither instruction set, or the build failed). Builds the kernels on the first call."""
    return _variant if kernel_available() else None


def set_variant(name: str) -> None:
    """Use the `name` variant from now on (benchmarks and tests compare the variants).

    Raises:
        ValueError: for an unknown name, or a variant this CPU cannot run.
        RuntimeError: if it cannot be built, or its test call fails here.
    """
    global _library, _variant, _available
    if name not in kernel_build.VARIANTS:
        raise ValueError(f"unknown kernel variant {name!r}; use one of {', '.join(kernel_build.VARIANTS)}")
    if name not in kernel_build.cpu_variants():
        raise ValueError(f"this CPU cannot run the {name} kernels (it runs {kernel_build.cpu_variants()})")
    with _lock:
        try:
            library = kernel_build.load(name)
        except kernel_build.KernelBuildError as err:
            raise RuntimeError(f"the {name} kernels could not be built: {err}") from err
        refused = kernel_build.prove_library(library)
        if refused is not None:
            raise RuntimeError(f"the {name} kernels do not run on this machine: {refused}")
        _library, _variant, _available = library, name, True


def storage_elements(t: torch.Tensor) -> int:
    """Elements of t's storage from its first element to the end: what a kernel may touch (the
    length the entry points check each buffer's extent against)."""
    return t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()


def _run(kernel: str, *args: object, unsupported: str) -> None:
    """Call the compiled `kernel` with `args` and torch's thread count; raise on a bad status.

    Raises:
        ValueError: if the sizes or lengths passed do not fit the buffers (nothing was read).
        RuntimeError: for a shape the kernel is not built for.
        MemoryError: if its scratch space cannot be allocated.
    """
    status = getattr(_library, kernel)(*args, torch.get_num_threads())
    if status == _NO_MEMORY:
        raise MemoryError(f"{kernel}: out of memory for its scratch space")
    if status == _BAD_SIZES:
        raise ValueError(
            f"{kernel}: the sizes, strides or lengths passed do not fit the tensors (e.g. a length "
            "past the cache or below 1); the call was refused before reading anything"
        )
    if status != 0:
        raise RuntimeError(f"{kernel} does not handle {unsupported}")


# The entry point suffix of the matrix-vector and attention kernels per dtype of their operands
# (activations or queries, weights or cache, output: all the same dtype).
_KERNEL_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}


def _gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel on x [..., K] (contiguous; M rows in all) and weight [N, K] (contiguous), both
    bf16 or both fp32: returns [..., N] in their dtype."""
    n_out, n_in = weight.shape
    rows = x.numel() // n_in
    out = torch.empty(rows, n_out, dtype=x.dtype)
    _run(
        f"codellama_gemv_{_KERNEL_DTYPES[x.dtype]}",
        x.data_ptr(),
        storage_elements(x),
        weight.data_ptr(),
        storage_elements(weight),
        out.data_ptr(),
        storage_elements(out),
        rows,
        n_out,
        n_in,
        unsupported=f"{rows} rows",
    )
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n_out)


@torch.library.custom_op("codellama::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _gemv(x, weight)


@_gemv_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _usable_on(*tensors: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> bool:
    """The kernels are on, built for this CPU, and these are CPU tensors of `dtype` without
    autograd."""
    # Plain loops, not generators: this runs before every kernel call of a decode step.
    if not _enabled:
        return False
    for t in tensors:
        if not t.is_cpu or t.dtype != dtype:
            return False
    if torch.is_grad_enabled():
        for t in tensors:
            if t.requires_grad:
                return False
    return _available if _available is not None else _first_use_outside_tracing()


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` would take the hand-written kernel."""
    return (
        weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and x.numel() // max(weight.shape[1], 1) <= MAX_ROWS
        and weight.is_contiguous()
        and x.dtype in _KERNEL_DTYPES
        and _usable_on(x, weight, dtype=x.dtype)
    )


def _first_use_outside_tracing() -> bool:
    # Compiling (a C++ build behind a lock) cannot be traced: a graph traced before the first
    # eager use keeps torch's matmul. Call `kernel_available()` before torch.compile to avoid it.
    return False if torch.compiler.is_compiling() else kernel_available()


# Weight rows widened to fp32 at a time by `linear` on CPUs without a fast bf16 matmul: 512 rows
# of 2048 (4 MiB in fp32) stay in the caches for the matmul that reads them right away.
WIDEN_ROWS = 512


def widens_bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` multiplies many bf16 rows in fp32, `WIDEN_ROWS` weight rows at a
    time: on CPUs whose kernels are the "avx2" variant, where torch's bf16 matmul (no bf16
    instructions) is several times slower than its fp32 one."""
    return (
        weight.dim() == 2 and x.shape[-1] == weight.shape[1] and _usable_on(x, weight) and _variant == "avx2"
    )


def _widened_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).float()
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.bfloat16, device=x.device)
    for first in range(0, weight.shape[0], WIDEN_ROWS):
        chunk = weight[first : first + WIDEN_ROWS]
        out[:, first : first + chunk.shape[0]] = F.linear(rows, chunk.float())
    return out.view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias): x [..., K] times weight [N, K] transposed, -> [..., N].

    Uses the kernel (`variant()`) for a few bf16 or fp32 rows on the CPU (fp32 accumulation, one
    rounding of each output to the dtype, like torch's own matmul); for more bf16 rows on a CPU without
    bf16 instructions, torch's fp32 matmul on weights widened a chunk at a time (the same
    rounding; see `widens_bf16_matmul`); `F.linear` otherwise.
    A quantized weight (`llama.quantization.QuantizedWeight`) multiplies itself.
    """
    if not isinstance(weight, torch.Tensor):
        return weight.linear(x)
    if not kernel_applies(x, weight):
        if widens_bf16_matmul(x, weight):
            return _widened_linear(x, weight)
        return F.linear(x, weight)
    if x.numel() == 0:
        return F.linear(x, weight)
    if torch.compiler.is_compiling():
        out = _gemv_op(x.reshape(-1, x.shape[-1]).contiguous(), weight)
        return out.view(*x.shape[:-1], weight.shape[0])
    return _gemv(x if x.is_contiguous() else x.contiguous(), weight)


# ---------------------------------------------------------------------------------------------
# Several weights multiplied by the same activations in one kernel call
# ---------------------------------------------------------------------------------------------

# Weights one fused call takes (MAX_FUSED in llama/csrc/common.h).
MAX_FUSED = 4
_FUSED_FIELDS = 5  # int64 per weight in a call's table (FUSED_FIELDS in common.h)


def fused_table(
    weights: Sequence[torch.Tensor], rows: Sequence[int], scales: Optional[Sequence[torch.Tensor]] = None
) -> ctypes.Array:
    """The table the fused entry points read (llama/csrc/common.h): per weight its address, the
    elements its storage holds from there, its output rows, and its scales' address and elements.
    The caller keeps the tensors alive as long as the table is used."""
    values: List[int] = []
    for i, weight in enumerate(weights):
        scale = scales[i] if scales is not None else None
        values += [weight.data_ptr(), storage_elements(weight), rows[i]]
        values += [scale.data_ptr(), storage_elements(scale)] if scale is not None else [0, 0]
    return (ctypes.c_int64 * len(values))(*values)


def _split(out: torch.Tensor, x: torch.Tensor, sizes: List[int]) -> List[torch.Tensor]:
    """The [M, sum(sizes)] output of a fused call as one [..., size] view per weight, x's leading shape."""
    return list(out.view(*x.shape[:-1], out.shape[-1]).split(sizes, dim=-1))


def _fused_gemv(x: torch.Tensor, weights: List[torch.Tensor]) -> torch.Tensor:
    """The kernel on x [M, K] and each weight [N_i, K] (contiguous), all bf16 or all fp32:
    returns [M, sum N_i] in their dtype."""
    rows, n_in = x.shape
    sizes = [w.shape[0] for w in weights]
    out = torch.empty(rows, sum(sizes), dtype=x.dtype)
    _run(
        f"codellama_gemv_{_KERNEL_DTYPES[x.dtype]}_fused",
        x.data_ptr(),
        storage_elements(x),
        fused_table(weights, sizes),
        len(weights),
        out.data_ptr(),
        storage_elements(out),
        rows,
        n_in,
        unsupported=f"{rows} rows and {len(weights)} weights",
    )
    return out


@torch.library.custom_op("codellama::gemv_fused", mutates_args=())
def _fused_gemv_op(x: torch.Tensor, weights: List[torch.Tensor]) -> torch.Tensor:
    return _fused_gemv(x, weights)


@_fused_gemv_op.register_fake
def _(x: torch.Tensor, weights: List[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))


def fused_linear_applies(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether `fused_linear(x, weights)` takes one kernel call: 2 to `MAX_FUSED` plain weights,
    each of which `linear(x, weight)` would multiply with the kernel (`kernel_applies`), and
    at least one row."""
    return (
        2 <= len(weights) <= MAX_FUSED
        and all(isinstance(w, torch.Tensor) for w in weights)
        and x.numel() > 0
        and all(kernel_applies(x, w) for w in weights)
    )


def fused_linear(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """`[linear(x, w) for w in weights]` in one kernel call (one parallel region, the activations
    prepared once): each output bit for bit what `linear` gives, a view of one shared buffer.
    Check `fused_linear_applies` first.

    Raises:
        ValueError: if the shapes do not fit each other (nothing was read).
        RuntimeError: if the kernel does not apply.
    """
    weights = list(weights)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if torch.compiler.is_compiling():
        out = _fused_gemv_op(rows, weights)
    else:
        out = _fused_gemv(rows, weights)
    return _split(out, x, [w.shape[0] for w in weights])


# ---------------------------------------------------------------------------------------------
# Weight-only quantized matrix-vector products (`llama.quantization` decides when they are used)
# ---------------------------------------------------------------------------------------------

# Activation dtypes the quantized kernels take (the output has the same dtype).
QUANTIZED_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)


def quantized_kernel_applies(x: torch.Tensor, in_features: int) -> bool:
    """Whether the int8/int4 matrix-vector kernels take activations `x` [..., in_features]: 1 to
    `MAX_ROWS` rows of fp32 or bf16 on the CPU, without autograd, the kernels on and built here."""
    return (
        _enabled
        and x.is_cpu
        and x.shape[-1] == in_features
        and 1 <= x.numel() // max(in_features, 1) <= MAX_ROWS
        and x.dtype in QUANTIZED_ACTIVATION_DTYPES
        and not (x.requires_grad and torch.is_grad_enabled())
        and (_available if _available is not None else _first_use_outside_tracing())
    )


def _gemv_int8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    rows, (n_out, n_in) = x.shape[0], codes.shape
    out = torch.empty(rows, n_out, dtype=x.dtype)
    _run(
        "codellama_gemv_int8",
        x.data_ptr(),
        storage_elements(x),
        int(x.dtype == torch.bfloat16),
        codes.data_ptr(),
        storage_elements(codes),
        scales.data_ptr(),
        storage_elements(scales),
        out.data_ptr(),
        storage_elements(out),
        rows,
        n_out,
        n_in,
        unsupported=f"{rows} rows",
    )
    return out


@torch.library.custom_op("codellama::gemv_int8", mutates_args=())
def _gemv_int8_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return _gemv_int8(x, codes, scales)


@_gemv_int8_op.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])


def _gemv_int4(x: torch.Tensor, packed: torch.Tensor, out_features: int, group_size: int) -> torch.Tensor:
    rows, n_in = x.shape
    out = torch.empty(rows, out_features, dtype=x.dtype)
    _run(
        "codellama_gemv_int4",
        x.data_ptr(),
        storage_elements(x),
        int(x.dtype == torch.bfloat16),
        packed.data_ptr(),
        storage_elements(packed),
        out.data_ptr(),
        storage_elements(out),
        rows,
        out_features,
        n_in,
        group_size,
        unsupported=f"{rows} rows in groups of {group_size}",
    )
    return out


@torch.library.custom_op("codellama::gemv_int4", mutates_args=())
def _gemv_int4_op(x: torch.Tensor, packed: torch.Tensor, out_features: int, group_size: int) -> torch.Tensor:
    return _gemv_int4(x, packed, out_features, group_size)


@_gemv_int4_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, out_features: int, group_size: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def _quantized_rows(x: torch.Tensor, in_features: int, **parts: torch.Tensor) -> torch.Tensor:
    """x as contiguous rows [M, in_features], after checking it and the weight's `parts`
    ({name: (tensor, dtype)}) against what the kernels read."""
    if x.shape[-1] != in_features:
        raise ValueError(f"activations of {x.shape[-1]} features for a weight of {in_features} inputs")
    if x.dtype not in QUANTIZED_ACTIVATION_DTYPES:
        raise ValueError(f"the quantized kernels take fp32 or bf16 activations, not {x.dtype}")
    for name, (tensor, dtype) in parts.items():
        if tensor.dtype != dtype or not tensor.is_contiguous() or not tensor.is_cpu:
            raise ValueError(
                f"the kernels read {name} as a contiguous {dtype} CPU tensor, got {tensor.dtype}"
            )
    return x.reshape(-1, in_features).contiguous()


def int8_gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] (fp32 or bf16) times the int8 weight `codes` [N, K] * `scales` [N, None]
    (bf16, one per output row) transposed -> [..., N] in x's dtype: fp32 products and sums, one
    rounding at the end. Check `quantized_kernel_applies` first.

    Raises:
        ValueError: if the shapes or dtypes do not fit each other (nothing was read).
        RuntimeError: for more than `MAX_ROWS` rows.
    """
    rows = _quantized_rows(x, codes.shape[1], codes=(codes, torch.int8), scales=(scales, torch.bfloat16))
    if torch.compiler.is_compiling():
        out = _gemv_int8_op(rows, codes, scales)
    else:
        out = _gemv_int8(rows, codes, scales)
    return out.view(*x.shape[:-1], codes.shape[0])


def int4_gemv(
    x: torch.Tensor, packed: torch.Tensor, out_features: int, in_features: int, group_size: int
) -> torch.Tensor:
    """x [..., in_features] (fp32 or bf16) times the int4 weight [out_features, in_features]
    packed by `llama.int4_pack.kernel_pack` (groups of `group_size` inputs) transposed ->
    [..., out_features] in x's dtype, in fp32 arithmetic (fp32 activations enter as two bf16
    parts, 16 significant bits). Check `quantized_kernel_applies` first.

    Raises:
        ValueError: if the shapes or dtypes do not fit each other or the group size does not
            divide the inputs (nothing was read).
        RuntimeError: for more than `MAX_ROWS` rows, or a group size other than 32, 64 or 128.
    """
    rows = _quantized_rows(x, in_features, packed=(packed, torch.uint8))
    if torch.compiler.is_compiling():
        out = _gemv_int4_op(rows, packed, out_features, group_size)
    else:
        out = _gemv_int4(rows, packed, out_features, group_size)
    return out.view(*x.shape[:-1], out_features)


def _gemv_int8_fused(x: torch.Tensor, codes: List[torch.Tensor], scales: List[torch.Tensor]) -> torch.Tensor:
    rows, n_in = x.shape
    sizes = [c.shape[0] for c in codes]
    out = torch.empty(rows, sum(sizes), dtype=x.dtype)
    _run(
        "codellama_gemv_int8_fused",
        x.data_ptr(),
        storage_elements(x),
        int(x.dtype == torch.bfloat16),
        fused_table(codes, sizes, scales),
        len(codes),
        out.data_ptr(),
        storage_elements(out),
        rows,
        n_in,
        unsupported=f"{rows} rows and {len(codes)} weights",
    )
    return out


@torch.library.custom_op("codellama::gemv_int8_fused", mutates_args=())
def _gemv_int8_fused_op(
    x: torch.Tensor, codes: List[torch.Tensor], scales: List[torch.Tensor]
) -> torch.Tensor:
    return _gemv_int8_fused(x, codes, scales)


@_gemv_int8_fused_op.register_fake
def _(x: torch.Tensor, codes: List[torch.Tensor], scales: List[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], sum(c.shape[0] for c in codes))


def _gemv_int4_fused(
    x: torch.Tensor, packed: List[torch.Tensor], out_features: List[int], group_size: int
) -> torch.Tensor:
    rows, n_in = x.shape
    out = torch.empty(rows, sum(out_features), dtype=x.dtype)
    _run(
        "codellama_gemv_int4_fused",
        x.data_ptr(),
        storage_elements(x),
        int(x.dtype == torch.bfloat16),
        fused_table(packed, out_features),
        len(packed),
        out.data_ptr(),
        storage_elements(out),
        rows,
        n_in,
        group_size,
        unsupported=f"{rows} rows and {len(packed)} weights in groups of {group_size}",
    )
    return out


@torch.library.custom_op("codellama::gemv_int4_fused", mutates_args=())
def _gemv_int4_fused_op(
    x: torch.Tensor, packed: List[torch.Tensor], out_features: List[int], group_size: int
) -> torch.Tensor:
    return _gemv_int4_fused(x, packed, out_features, group_size)


@_gemv_int4_fused_op.register_fake
def _(x: torch.Tensor, packed: List[torch.Tensor], out_features: List[int], group_size: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], sum(out_features))


def _check_fused_count(count: int) -> None:
    if not 1 <= count <= MAX_FUSED:
        raise ValueError(f"a fused call takes 1 to {MAX_FUSED} weights, not {count}")


def int8_gemv_fused(
    x: torch.Tensor, weights: Sequence[Tuple[torch.Tensor, torch.Tensor]]
) -> List[torch.Tensor]:
    """`[int8_gemv(x, codes, scales) for codes, scales in weights]` in one kernel call, each output
    bit for bit the same (views of one shared buffer). Check `quantized_kernel_applies` first.

    Raises:
        ValueError: for more than `MAX_FUSED` weights, or shapes or dtypes that do not fit (nothing
            was read).
        RuntimeError: for more than `MAX_ROWS` rows.
    """
    _check_fused_count(len(weights))
    n_in = weights[0][0].shape[1]
    for codes, scales in weights:
        if codes.shape[1] != n_in:
            raise ValueError(f"fused int8 weights must share their inputs: {codes.shape[1]} and {n_in}")
        rows = _quantized_rows(x, n_in, codes=(codes, torch.int8), scales=(scales, torch.bfloat16))
    codes, scales = [c for c, _ in weights], [s for _, s in weights]
    if torch.compiler.is_compiling():
        out = _gemv_int8_fused_op(rows, codes, scales)
    else:
        out = _gemv_int8_fused(rows, codes, scales)
    return _split(out, x, [c.shape[0] for c in codes])


def int4_gemv_fused(
    x: torch.Tensor,
    weights: Sequence[Tuple[torch.Tensor, int]],
    in_features: int,
    group_size: int,
) -> List[torch.Tensor]:
    """`[int4_gemv(x, packed, out_features, in_features, group_size) for packed, out_features in
    weights]` in one kernel call, each output bit for bit the same (views of one shared buffer).
    Check `quantized_kernel_applies` first.

    Raises:
        ValueError: for more than `MAX_FUSED` weights, or shapes or dtypes that do not fit (nothing
            was read).
        RuntimeError: for more than `MAX_ROWS` rows, or a group size other than 32, 64 or 128.
    """
    _check_fused_count(len(weights))
    for packed, _ in weights:
        rows = _quantized_rows(x, in_features, packed=(packed, torch.uint8))
    packed, sizes = [p for p, _ in weights], [int(n) for _, n in weights]
    if torch.compiler.is_compiling():
        out = _gemv_int4_fused_op(rows, packed, sizes, group_size)
    else:
        out = _gemv_int4_fused(rows, packed, sizes, group_size)
    return _split(out, x, sizes)


def int4_dequantize(
    packed: torch.Tensor,
    out_features: int,
    in_features: int,
    group_size: int,
    dtype: torch.dtype,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The int4 weight [out_features, in_features] packed by `llama.int4_pack.kernel_pack`, in
    `dtype` (fp32, or bf16: the fp32 value rounded once), written into `out` when given (a
    contiguous tensor of that shape and dtype). Needs `kernel_available()`.

    Raises:
        ValueError: for another dtype, or tensors that do not fit the shape (nothing was read).
    """
    if dtype not in QUANTIZED_ACTIVATION_DTYPES or packed.dtype != torch.uint8 or not packed.is_contiguous():
        raise ValueError(f"the int4 dequantization writes fp32 or bf16 from uint8 codes, not {dtype}")
    if out is None:
        out = torch.empty(out_features, in_features, dtype=dtype)
    if out.dtype != dtype or not out.is_contiguous() or out.shape != (out_features, in_features):
        raise ValueError(f"out must be a contiguous {dtype} tensor [{out_features}, {in_features}]")
    _run(
        "codellama_dequantize_int4",
        packed.data_ptr(),
        storage_elements(packed),
        out.data_ptr(),
        storage_elements(out),
        int(dtype == torch.bfloat16),
        out_features,
        in_features,
        group_size,
        unsupported=f"groups of {group_size}",
    )
    return out


# Head sizes the attention kernels (decode and prefill, 16-bit, fp32 and int8 caches) are built for
# (Code Llama: 128; the demo model: 32); `head_dim_supported` in llama/csrc/common.h says the same.
ATTENTION_HEAD_DIMS = (32, 64, 128)
# Positions per key block of the attention kernels: a paged cache's blocks hold a multiple of it
# (ATTENTION_KEY_BLOCK in llama/csrc/common.h).
ATTENTION_KEY_BLOCK = 64


def _attention_layout_ok(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """A head size the attention kernels are built for, each cached position's head contiguous,
    queries and cache both bf16 or both fp32 CPU tensors the kernels may read."""
    return (
        q.shape[-1] in ATTENTION_HEAD_DIMS
        and cache.stride(-1) == 1
        and cache.stride(-2) == q.shape[-1]
        and q.dtype in _KERNEL_DTYPES
        and _usable_on(q, cache, dtype=q.dtype)
    )


def _check_same_layout(cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
    if cache_k.stride() != cache_v.stride():
        raise ValueError("the key and value caches must have the same layout")


def _check_int8_cache(
    codes_k: torch.Tensor, codes_v: torch.Tensor, scales_k: torch.Tensor, scales_v: torch.Tensor
) -> None:
    _check_same_layout(codes_k, codes_v)
    _check_same_layout(scales_k, scales_v)
    if scales_k.dtype != torch.float32 or scales_k.shape != codes_k.shape[:-1] or scales_k.stride(-1) != 1:
        raise ValueError(
            f"the int8 cache needs fp32 scales {tuple(codes_k.shape[:-1])} with contiguous positions, "
            f"got {scales_k.dtype} {tuple(scales_k.shape)}"
        )


def _block_table(
    block_table: Optional[torch.Tensor], cache: torch.Tensor, dims: int
) -> Tuple[Optional[torch.Tensor], int, int]:
    """The block table argument of the attention kernels, `dims` dimensions ([rows, blocks per
    row] for decode, one row's [blocks] for prefill): (the table as contiguous int64 or None, its
    entries, blocks per row). `cache` is then the blocks [blocks, kv_heads, block_len, D]."""
    if block_table is None:
        return None, 0, 0
    if block_table.dim() != dims or block_table.numel() == 0 or cache.dim() != 4:
        raise ValueError(
            f"a paged cache's blocks are [blocks, kv_heads, block_len, head_dim] and its block table "
            f"{'[rows, blocks per row]' if dims == 2 else '[blocks]'}, got {tuple(cache.shape)} and "
            f"{tuple(block_table.shape)}"
        )
    if cache.shape[-2] % ATTENTION_KEY_BLOCK:
        raise ValueError(
            f"blocks of a paged cache hold a multiple of {ATTENTION_KEY_BLOCK} positions, "
            f"not {cache.shape[-2]}"
        )
    table = block_table.to(torch.int64).contiguous()
    return table, table.numel(), table.shape[-1]


def _pointer(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def attention_applies(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether `decode_attention(q, cache, ...)` would take the hand-written kernel."""
    return _attention_layout_ok(q, cache)


def _decode_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    lengths: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    batch, heads, head_dim = q.shape
    q = q.contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    _check_same_layout(cache_k, cache_v)
    table, table_len, blocks_per_row = _block_table(block_table, cache_k, 2)
    if rows is None:
        rows_ptr, rows_len = None, 0
    else:
        rows = rows.to(torch.int64).contiguous()
        rows_ptr, rows_len = rows.data_ptr(), rows.numel()
    out = torch.empty_like(q)
    _run(
        f"codellama_decode_attention_{_KERNEL_DTYPES[q.dtype]}",
        q.data_ptr(),
        storage_elements(q),
        cache_k.data_ptr(),
        cache_v.data_ptr(),
        min(storage_elements(cache_k), storage_elements(cache_v)),
        out.data_ptr(),
        storage_elements(out),
        lengths.data_ptr(),
        lengths.numel(),
        rows_ptr,
        rows_len,
        _pointer(table),
        table_len,
        blocks_per_row,
        cache_k.shape[0],
        batch,
        heads,
        cache_k.shape[1],
        head_dim,
        cache_k.shape[2],
        cache_k.stride(0),
        cache_k.stride(1),
        head_dim**-0.5,
        unsupported=f"{heads} heads of size {head_dim}",
    )
    return out


@torch.library.custom_op("codellama::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    lengths: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _decode_attention(q, cache_k, cache_v, lengths, rows, block_table)


@_decode_attention_op.register_fake
def _(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    lengths: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return torch.empty_like(q)


def decode_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    lengths: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of one new token per row over that row's cached keys and values, read in place.

    Args:
        q: queries [B, heads, head_dim], bf16 or fp32.
        cache_k, cache_v: caches [R, kv_heads, max_seq_len, head_dim], q's dtype (the query heads
            sharing a kv head are consecutive: head h reads kv head h // (heads / kv_heads)); with
            `block_table`, the blocks of a paged cache [blocks, kv_heads, block_len, head_dim].
        lengths: [B] number of cached positions each row attends to (its new token included).
        rows: [B] the cache row (0 .. R-1) each batch row reads; None reads rows 0 .. B-1.
            The rows are read where they are: nothing is gathered or copied.
        block_table: [R, blocks per row] int64 for a paged cache: position s of cache row r is
            position s % block_len of block block_table[r, s // block_len] (block_len a multiple
            of `ATTENTION_KEY_BLOCK`); the entries of the positions read must name blocks.

    Returns:
        [B, heads, head_dim] in q's dtype: softmax(q k^T / sqrt(head_dim)) v over the first
        `lengths[b]` positions of cache row `rows[b]`, computed in fp32.

    Raises:
        RuntimeError: if the kernel does not apply (check `attention_applies` first).
        ValueError: if a length is outside 1 .. the row's positions, a row outside the cache or a
            block table entry read outside the blocks.
    """
    if torch.compiler.is_compiling():
        return _decode_attention_op(q, cache_k, cache_v, lengths, rows, block_table)
    return _decode_attention(q, cache_k, cache_v, lengths, rows, block_table)


def int8_attention_applies(q: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether `decode_attention_int8(q, codes, ...)` would take the hand-written kernel: bf16
    queries on the CPU, an int8 cache whose positions' heads are contiguous, a head size in
    `ATTENTION_HEAD_DIMS`, the kernels on and built here."""
    return (
        q.shape[-1] in ATTENTION_HEAD_DIMS
        and codes.dtype == torch.int8
        and codes.device.type == "cpu"
        and codes.stride(-1) == 1
        and codes.stride(-2) == q.shape[-1]
        and _usable_on(q)
    )


def _decode_attention_int8(
    q: torch.Tensor,
    codes_k: torch.Tensor,
    codes_v: torch.Tensor,
    scales_k: torch.Tensor,
    scales_v: torch.Tensor,
    lengths: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    batch, heads, head_dim = q.shape
    q = q.contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    _check_int8_cache(codes_k, codes_v, scales_k, scales_v)
    table, table_len, blocks_per_row = _block_table(block_table, codes_k, 2)
    if rows is None:
        rows_ptr, rows_len = None, 0
    else:
        rows = rows.to(torch.int64).contiguous()
        rows_ptr, rows_len = rows.data_ptr(), rows.numel()
    out = torch.empty_like(q)
    _run(
        "codellama_decode_attention_int8",
        q.data_ptr(),
        storage_elements(q),
        codes_k.data_ptr(),
        codes_v.data_ptr(),
        min(storage_elements(codes_k), storage_elements(codes_v)),
        scales_k.data_ptr(),
        scales_v.data_ptr(),
        min(storage_elements(scales_k), storage_elements(scales_v)),
        out.data_ptr(),
        storage_elements(out),
        lengths.data_ptr(),
        lengths.numel(),
        rows_ptr,
        rows_len,
        _pointer(table),
        table_len,
        blocks_per_row,
        codes_k.shape[0],
        batch,
        heads,
        codes_k.shape[1],
        head_dim,
        codes_k.shape[2],
        codes_k.stride(0),
        codes_k.stride(1),
        scales_k.stride(0),
        scales_k.stride(1),
        head_dim**-0.5,
        unsupported=f"{heads} heads of size {head_dim}",
    )
    return out


@torch.library.custom_op("codellama::decode_attention_int8", mutates_args=())
def _decode_attention_int8_op(
    q: torch.Tensor,
    codes_k: torch.Tensor,
    codes_v: torch.Tensor,
    scales_k: torch.Tensor,
    scales_v: torch.Tensor,
    lengths: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _decode_attention_int8(q, codes_k, codes_v, scales_k, scales_v, lengths, rows, block_table)


@_decode_attention_int8_op.register_fake
def _(
    q: torch.Tensor,
    codes_k: torch.Tensor,
    codes_v: torch.Tensor,
    scales_k: torch.Tensor,
    scales_v: torch.Tensor,
    lengths: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return torch.empty_like(q)


def decode_attention_int8(
    q: torch.Tensor,
    codes_k: torch.Tensor,
    codes_v: torch.Tensor,
    scales_k: torch.Tensor,
    scales_v: torch.Tensor,
    lengths: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`decode_attention` over an int8 cache (`llama.kv_cache.Int8KVCache`), read in place.

    Args:
        q: queries [B, heads, head_dim], bf16.
        codes_k, codes_v: int8 codes [R, kv_heads, max_seq_len, head_dim] (with `block_table`: the
            blocks [blocks, kv_heads, block_len, head_dim]).
        scales_k, scales_v: fp32 scales [R, kv_heads, max_seq_len] (blocks: [blocks, kv_heads,
            block_len]): key (value) element d of position s is codes[..., s, d] * scales[..., s].
        lengths, rows, block_table: as for `decode_attention`.

    Returns:
        [B, heads, head_dim] bf16: softmax(q k^T / sqrt(head_dim)) v over the dequantized keys and
        values of the first `lengths[b]` positions of cache row `rows[b]`, computed in fp32 (each
        score is q . codes times the key's scale; each probability is multiplied by the value's
        scale before it weighs the codes).

    Raises:
        RuntimeError: if the kernel does not apply (check `int8_attention_applies` first).
        ValueError: if a length is outside 1 .. max_seq_len, a row outside the cache, or the
            scales do not fit the codes.
    """
    if torch.compiler.is_compiling():
        return _decode_attention_int8_op(q, codes_k, codes_v, scales_k, scales_v, lengths, rows, block_table)
    return _decode_attention_int8(q, codes_k, codes_v, scales_k, scales_v, lengths, rows, block_table)


def prefill_attention_applies(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether `prefill_attention(q, cache, ...)` would take the hand-written kernel: q [L, heads,
    D] and one cache row [kv_heads, max_seq_len, D], both bf16 or both fp32, D in
    `ATTENTION_HEAD_DIMS`, eager only."""
    return (
        q.dim() == 3
        and cache.dim() == 3
        and not torch.compiler.is_compiling()
        and _attention_layout_ok(q, cache)
    )


def prefill_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    start: int,
    block_table: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention of a chunk of one sequence over its cache row.

    Args:
        q: queries [L, heads, head_dim] of the tokens at positions start .. start + L - 1, bf16 or
            fp32.
        cache_k, cache_v: the sequence's cache row [kv_heads, max_seq_len, head_dim], q's dtype, filled
            up to position start + L - 1 (head h reads kv head h // (heads / kv_heads)); with
            `block_table`, the blocks of a paged cache [blocks, kv_heads, block_len, head_dim].
        start: position of the first query.
        block_table: [blocks per row] int64, the row's blocks in a paged cache: position s is
            position s % block_len of block block_table[s // block_len].

    Returns:
        [L, heads, head_dim] in q's dtype: for the token at position p, softmax(q k^T / sqrt(head_dim)) v
        over positions 0 .. p, computed in fp32.

    Raises:
        RuntimeError: if the kernel does not apply (check `prefill_attention_applies` first).
        MemoryError: if its scratch space (per thread: one tile of queries, sums and scores, and one
            block of keys and values in fp32; it does not grow with the context) cannot be allocated.
    """
    length, heads, head_dim = q.shape
    _check_same_layout(cache_k, cache_v)
    table, blocks = _check_prefill_fits(cache_k, start + length, block_table)
    q = q.contiguous()
    out = torch.empty_like(q)
    _run(
        f"codellama_prefill_attention_{_KERNEL_DTYPES[q.dtype]}",
        q.data_ptr(),
        storage_elements(q),
        cache_k.data_ptr(),
        cache_v.data_ptr(),
        min(storage_elements(cache_k), storage_elements(cache_v)),
        out.data_ptr(),
        storage_elements(out),
        _pointer(table),
        0 if table is None else table.numel(),
        blocks,
        cache_k.stride(0) if table is not None else 0,
        start,
        length,
        heads,
        cache_k.shape[-3],
        head_dim,
        cache_k.shape[-2],
        cache_k.stride(-3),
        head_dim**-0.5,
        unsupported=f"{heads} heads of size {head_dim}",
    )
    return out


def _check_prefill_fits(
    cache: torch.Tensor, end: int, block_table: Optional[torch.Tensor]
) -> Tuple[Optional[torch.Tensor], int]:
    """The row's block table for the prefill kernels (None for a cache row) and the blocks of the
    cache (1 for a row); raises ValueError if positions up to `end` do not fit the row."""
    table, entries, _ = _block_table(block_table, cache, 1)
    positions = cache.shape[1] if table is None else entries * cache.shape[-2]
    if end > positions:
        raise ValueError(f"positions up to {end} do not fit a cache row of {positions}")
    return table, 1 if table is None else cache.shape[0]


def prefill_attention_int8_applies(q: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether `prefill_attention_int8(q, codes, ...)` would take the hand-written kernel: q [L,
    heads, D] bf16 and one int8 cache row [kv_heads, max_seq_len, D] on the CPU, D in
    `ATTENTION_HEAD_DIMS`, eager only."""
    return (
        q.dim() == 3
        and codes.dim() == 3
        and not torch.compiler.is_compiling()
        and int8_attention_applies(q, codes)
    )


def prefill_attention_int8(
    q: torch.Tensor,
    codes_k: torch.Tensor,
    codes_v: torch.Tensor,
    scales_k: torch.Tensor,
    scales_v: torch.Tensor,
    start: int,
    block_table: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`prefill_attention` over one row of an int8 cache, read in place (keys and values are
    code x scale, dequantized to fp32 one block at a time inside the kernel).

    Args:
        q: queries [L, heads, head_dim] of the tokens at positions start .. start + L - 1, bf16.
        codes_k, codes_v: the row's codes [kv_heads, max_seq_len, head_dim], int8, filled up to
            position start + L - 1 (with `block_table`: the blocks [blocks, kv_heads, block_len,
            head_dim]).
        scales_k, scales_v: their scales [kv_heads, max_seq_len] (blocks: [blocks, kv_heads,
            block_len]), fp32, positions contiguous.
        start: position of the first query.
        block_table: as for `prefill_attention`.

    Returns:
        [L, heads, head_dim] bf16, as `prefill_attention` on the dequantized cache.

    Raises:
        ValueError: if the scales do not match the codes, or the positions do not fit the cache.
        RuntimeError: if the kernel does not apply (check `prefill_attention_int8_applies`).
        MemoryError: if its scratch space cannot be allocated.
    """
    length, heads, head_dim = q.shape
    _check_int8_cache(codes_k, codes_v, scales_k, scales_v)
    table, blocks = _check_prefill_fits(codes_k, start + length, block_table)
    q = q.contiguous()
    out = torch.empty_like(q)
    _run(
        "codellama_prefill_attention_int8",
        q.data_ptr(),
        storage_elements(q),
        codes_k.data_ptr(),
        codes_v.data_ptr(),
        min(storage_elements(codes_k), storage_elements(codes_v)),
        scales_k.data_ptr(),
        scales_v.data_ptr(),
        min(storage_elements(scales_k), storage_elements(scales_v)),
        out.data_ptr(),
        storage_elements(out),
        _pointer(table),
        0 if table is None else table.numel(),
        blocks,
        codes_k.stride(0) if table is not None else 0,
        start,
        length,
        heads,
        codes_k.shape[-3],
        head_dim,
        codes_k.shape[-2],
        codes_k.stride(-3),
        scales_k.stride(0) if table is not None else 0,
        scales_k.stride(-2),
        head_dim**-0.5,
        unsupported=f"{heads} heads of size {head_dim}",
    )
    return out


def rotary_applies(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether `rotary(x, cos, sin)` would take the hand-written kernel: bf16 `x` [B, L, H, D]
    with one fp32 angle row per token (`cos` [B, L, 1, D/2]), eager only."""
    return (
        x.dim() == 4
        and x.shape[-1] % 32 == 0
        and x.shape[-1] <= 256
        and cos.dtype == torch.float32
        and tuple(cos.shape) == (x.shape[0], x.shape[1], 1, x.shape[-1] // 2)
        and not torch.compiler.is_compiling()
        and _usable_on(x)
    )


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of every head of `x` [B, L, H, D] (bf16) by the angles whose cos/sin
    are [B, L, 1, D/2] (fp32), in fp32 as `model.apply_rotary` does. Returns a new bf16 tensor.
    Check `rotary_applies` first."""
    x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    batch, seqlen, heads, head_dim = x.shape
    _run(
        "codellama_rotary_bf16",
        x.data_ptr(),
        storage_elements(x),
        cos.data_ptr(),
        sin.data_ptr(),
        min(storage_elements(cos), storage_elements(sin)),
        out.data_ptr(),
        storage_elements(out),
        batch * seqlen,
        heads,
        head_dim,
        unsupported=f"heads of {head_dim}",
    )
    return out


# torch splits the sum of one row of this many elements or more over its threads (its parallel
# grain size), in another order: the RMSNorm kernel takes shorter rows only.
RMS_NORM_MAX_DIM = 32768 - 1


def torch_fp32_lanes() -> Optional[int]:
    """Lanes of the fp32 vectors torch's CPU sum adds with on this machine (8 or 16), the order the
    RMSNorm kernel follows to reproduce it bit for bit; None when neither order reproduces it or no
    kernel library is loaded. Found once, by summing probe rows both ways: torch's reported
    capability does not tell (on AVX-512 CPUs it runs its sums with 8 lanes)."""
    return None if _library is None else _probed_lanes()


@lru_cache(maxsize=None)
def _probed_lanes() -> Optional[int]:
    gen = torch.Generator().manual_seed(0)
    for lanes in (8, 16):
        if all(_sums_like_torch(lanes, dim, gen) for dim in (100, 2048, 5120)):
            return lanes
    return None


def _sums_like_torch(lanes: int, dim: int, gen: torch.Generator) -> bool:
    x = (torch.randn(6, dim, generator=gen) * torch.rand(6, 1, generator=gen) * 4).to(torch.bfloat16)
    out, normed = torch.empty_like(x), torch.empty(6, dim)
    weight = torch.ones(dim, dtype=torch.bfloat16)
    args = (x.data_ptr(), x.numel(), weight.data_ptr(), dim, out.data_ptr(), out.numel())
    args += (normed.data_ptr(), normed.numel(), 6, dim, 1e-5, lanes)
    try:
        _run("codellama_rms_norm_bf16", *args, unsupported=f"torch vectors of {lanes} lanes")
    except RuntimeError:
        return False
    xf = x.float()  # the torch formula of llama.model.normalize (which imports this module)
    return torch.equal(normed, xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))


def rms_norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rms_norm(x, weight, eps)` may run: bf16 `x` [..., n] and `weight` [n] on the CPU,
    n up to `RMS_NORM_MAX_DIM`, eager, torch's vector width known."""
    return (
        weight.dim() == 1
        and x.shape[-1] <= RMS_NORM_MAX_DIM
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[0]
        and weight.is_contiguous()
        and not torch.compiler.is_compiling()
        and _usable_on(x, weight)
        and torch_fp32_lanes() is not None
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, normed: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """RMSNorm of the bf16 rows of `x` [..., n] with `weight` [n] (bf16), in one pass per row:
    `bf16(xf * rsqrt(mean(xf^2) + eps)) * weight` with xf = x in fp32, bit for bit the torch
    operations (`llama.model.RMSNorm`), the sum of squares in the order of torch's own sum on this
    CPU (`torch_fp32_lanes`). `normed` (a contiguous fp32 tensor of x's size), when given,
    receives the fp32 values before their rounding to bf16. Check `rms_norm_applies` first.

    Raises:
        ValueError: if `normed` does not fit (nothing was read).
    """
    rows, lanes = x.contiguous(), torch_fp32_lanes()
    out = torch.empty_like(rows)
    if normed is not None and (
        normed.dtype != torch.float32 or normed.numel() != rows.numel() or not normed.is_contiguous()
    ):
        raise ValueError(f"normed must be a contiguous fp32 tensor of {rows.numel()} elements")
    _run(
        "codellama_rms_norm_bf16",
        rows.data_ptr(),
        storage_elements(rows),
        weight.data_ptr(),
        storage_elements(weight),
        out.data_ptr(),
        storage_elements(out),
        None if normed is None else normed.data_ptr(),
        0 if normed is None else storage_elements(normed),
        rows.numel() // max(x.shape[-1], 1),
        x.shape[-1],
        eps,
        lanes,
        unsupported=f"torch vectors of {lanes} lanes",
    )
    return out


def decode_table_fields() -> Tuple[int, int]:
    """The int64 fields of a decode layer's table and of a decode step's table, as the kernel
    library reads them (llama/csrc/decode_layer.h). Needs `kernel_available()`."""
    fields = (ctypes.c_int64 * 2)()
    if _library.codellama_decode_table_fields(fields, 2) != 0:
        raise RuntimeError("codellama_decode_table_fields refused its buffer")
    return int(fields[0]), int(fields[1])


def decode_layer(finish: Optional[ctypes.Array], layer: Optional[ctypes.Array], step: ctypes.Array) -> None:
    """One call of the decode-layer kernel (`llama.fused_decode` builds the tables): with `finish`
    (a layer's table), h += w2(activated) of that layer; then, with `layer`, that layer up to its
    feed-forward's gate and up projections. The step's buffers are updated in place.

    Raises:
        ValueError: if a table's sizes do not fit its buffers or a position is outside the cache
            (for a position: nothing of that layer's cache written).
        RuntimeError: for more than `MAX_ROWS` rows or a shape the kernels are not built for.
    """
    _run(
        "codellama_decode_layer",
        finish,
        layer,
        step,
        torch_fp32_lanes() or 0,
        unsupported="these rows or shapes",
    )


if __name__ == "__main__":  # `python -m llama.kernels`: what this machine runs (llama.kernel_report)
    from llama.kernel_report import main

    raise SystemExit(main())
