"""A bf16 matrix-vector kernel for decoding on CPUs with AVX512-BF16, and the fallback to torch.

Decoding one token multiplies a few rows of activations by every weight matrix, so its speed is
the speed of reading the weights. torch's bf16 matrix-vector product reads them well below the
memory bandwidth on CPUs; the kernel here streams each weight row once with AVX512-BF16 dot
products (fp32 accumulation) split over the OpenMP threads torch uses.

`linear(x, weight)` is `F.linear(x, weight)` everywhere: it takes the kernel only for bf16 inputs
of at most `MAX_ROWS` rows on a CPU that has AVX512-BF16, and falls back to `F.linear` on GPUs,
other CPUs, other dtypes, with autograd, or when the kernel cannot be compiled. The kernel is
compiled with the system C++ compiler on first use and cached (`CODELLAMA_KERNEL_CACHE`, default
`~/.cache/codellama`); `CODELLAMA_KERNELS=0` or `set_enabled(False)` turns it off.
"""

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

# Rows of activations up to which the matrix-vector kernel beats a matrix-matrix product.
MAX_ROWS = 8

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

// Round-to-nearest-even fp32 -> bf16, as torch does (NaN stays NaN).
static inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// y[m, n .. n+R) = x[m, :] . w[n .. n+R, :] for all M rows of x: each weight row is read once.
// U independent accumulators per (m, r) hide the latency of the dot-product instruction; PF > 0
// prefetches the weights PF elements ahead, which helps when several rows of x make the loop
// compute-heavy and the hardware prefetchers fall behind.
template <int M, int R, int U, int PF>
static inline void rows_block(const uint16_t* __restrict x, const uint16_t* __restrict w, int64_t K,
                              uint16_t* __restrict y, int64_t N, int64_t n) {
  __m512 acc[M][R][U];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[m][r][u] = _mm512_setzero_ps();
  const uint16_t* wr = w + n * K;
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
    if (PF > 0)
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(wr + r * K + k + PF), _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      __m512bh wv[R];
      for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(wr + r * K + k + 32 * u);
      for (int m = 0; m < M; ++m) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * u);
        for (int r = 0; r < R; ++r) acc[m][r][u] = _mm512_dpbf16_ps(acc[m][r][u], xv, wv[r]);
      }
    }
  }
  for (; k < K; k += 32) {
    const int64_t left = K - k;
    const __mmask32 mask = left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1ull << left) - 1);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr + r * K + k);
    for (int m = 0; m < M; ++m) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r][0] = _mm512_dpbf16_ps(acc[m][r][0], xv, wv[r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      __m512 sum = acc[m][r][0];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[m][r][u]);
      y[m * N + n + r] = to_bf16(_mm512_reduce_add_ps(sum));
    }
}

template <int M, int R, int U, int PF>
static void gemv(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t N, int64_t K, int threads) {
  const int64_t blocks = N / R;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) rows_block<M, R, U, PF>(x, w, K, y, N, b * R);
  for (int64_t n = blocks * R; n < N; ++n) rows_block<M, 1, 1, 0>(x, w, K, y, N, n);
}

// y[M, N] = x[M, K] @ w[N, K]^T, all bf16 and contiguous. Returns 0, or 1 for an unsupported M.
// One or two rows: stream one weight row at a time (a single sequential read per thread, which
// the hardware prefetchers follow best). More rows: share each x load between several weight
// rows, within the 32 vector registers.
extern "C" int codellama_gemv_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t M, int64_t N,
                                   int64_t K, int threads) {
  switch (M) {
    case 1: gemv<1, 1, 2, 0>(x, w, y, N, K, threads); return 0;
    case 2: gemv<2, 1, 2, 0>(x, w, y, N, K, threads); return 0;
    case 3: gemv<3, 6, 1, 8192>(x, w, y, N, K, threads); return 0;
    case 4: gemv<4, 6, 1, 8192>(x, w, y, N, K, threads); return 0;
    case 5: gemv<5, 2, 1, 8192>(x, w, y, N, K, threads); return 0;
    case 6: gemv<6, 2, 1, 8192>(x, w, y, N, K, threads); return 0;
    case 7: gemv<7, 2, 1, 8192>(x, w, y, N, K, threads); return 0;
    case 8: gemv<8, 2, 1, 8192>(x, w, y, N, K, threads); return 0;
    default: return 1;
  }
}
"""

_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]

_enabled = os.environ.get("CODELLAMA_KERNELS", "1") != "0"
_library: Optional[ctypes.CDLL] = None
_available: Optional[bool] = None  # None until the first attempt to load the kernel
_lock = threading.Lock()


def set_enabled(enabled: bool) -> None:
    """Use the hand-written kernels where they apply (True) or always torch's own (False)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    """Whether `linear` may use the hand-written kernel (the setting, not the CPU's ability)."""
    return _enabled


def cpu_has_avx512_bf16() -> bool:
    """True on an x86 CPU (Linux) whose flags include avx512_bf16 (and avx512bw for the loads)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx512_bf16", "avx512bw", "avx512f"} <= flags
    except OSError:
        pass
    return False


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "codellama"
    return Path(os.environ.get("CODELLAMA_KERNEL_CACHE", default))


def _compile() -> ctypes.CDLL:
    compiler = os.environ.get("CXX", "g++")
    digest = hashlib.sha256((_SOURCE + " ".join([compiler] + _FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"gemv_bf16_{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source, built = Path(tmp) / "gemv_bf16.cpp", Path(tmp) / "gemv_bf16.so"
            source.write_text(_SOURCE)
            subprocess.run(
                [compiler, *_FLAGS, str(source), "-o", str(built)], check=True, capture_output=True
            )
            os.replace(built, target)  # atomic: concurrent processes never load half a file
    library = ctypes.CDLL(str(target))
    function = library.codellama_gemv_bf16
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    function.restype = ctypes.c_int
    return library


def kernel_available() -> bool:
    """True if the AVX512-BF16 kernel runs on this machine (compiling it on the first call).

    False on other CPUs, or (with a RuntimeWarning) when the compiler fails.
    """
    global _library, _available
    if _available is not None:
        return _available
    with _lock:
        if _available is None:
            if cpu_has_avx512_bf16():
                try:
                    _library = _compile()
                except (OSError, subprocess.CalledProcessError) as err:
                    detail = getattr(err, "stderr", b"") or b""
                    warnings.warn(
                        f"the AVX512-BF16 decode kernel could not be built ({err} "
                        f"{detail.decode(errors='replace')[:500]}); using torch's matmul instead",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            _available = _library is not None
    return _available


def _gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel on x [M, K] (contiguous) and weight [N, K] (contiguous): returns [M, N] bf16."""
    rows, n_out, n_in = x.shape[0], weight.shape[0], weight.shape[1]
    out = torch.empty(rows, n_out, dtype=torch.bfloat16)
    status = _library.codellama_gemv_bf16(
        x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, n_out, n_in, torch.get_num_threads()
    )
    if status != 0:
        raise RuntimeError(f"the bf16 decode kernel does not handle {rows} rows")
    return out


@torch.library.custom_op("codellama::gemv_bf16", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _gemv(x, weight)


@_gemv_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` would take the hand-written kernel."""
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and x.numel() // max(weight.shape[1], 1) <= MAX_ROWS
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and (_available if _available is not None else _first_use_outside_tracing())
    )


def _first_use_outside_tracing() -> bool:
    # Compiling (a C++ build behind a lock) cannot be traced: a graph traced before the first
    # eager use keeps torch's matmul. Call `kernel_available()` before torch.compile to avoid it.
    return False if torch.compiler.is_compiling() else kernel_available()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias): x [..., K] times weight [N, K] transposed, -> [..., N].

    Uses the AVX512-BF16 kernel for a few bf16 rows on the CPU (fp32 accumulation, one bf16
    rounding of each output, like torch's own bf16 matmul), `F.linear` otherwise.
    """
    if not kernel_applies(x, weight):
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if rows.shape[0] == 0:
        return F.linear(x, weight)
    if torch.compiler.is_compiling():
        out = _gemv_op(rows, weight)
    else:
        out = _gemv(rows, weight)
    return out.view(*x.shape[:-1], weight.shape[0])
