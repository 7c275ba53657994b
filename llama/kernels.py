"""Hand-written CPU kernels (AVX512-BF16) for decoding and prefill attention, and the fallback to torch.

Decoding one token multiplies a few rows of activations by every weight matrix, so its speed is
the speed of reading the weights. torch's bf16 matrix-vector product reads them well below the
memory bandwidth on CPUs; the kernel here streams each weight row once with AVX512-BF16 dot
products (fp32 accumulation) split over the OpenMP threads torch uses. The decode-attention
kernel reads each row's cached keys and values once, in fp32 arithmetic, up to that row's own
length (no mask), where torch's fused attention is built for long query blocks. The
prefill-attention kernel scores 16 keys per instruction from a regrouped copy of the keys and
visits only the keys each token sees (causal, no mask), in fp32 like the decode kernel. The
rotary kernel rotates every head of a chunk in one pass, bit-identical to the torch operations.

`linear(x, weight)` is `F.linear(x, weight)` everywhere: it takes the kernel only for bf16 inputs
of at most `MAX_ROWS` rows on a CPU that has AVX512-BF16, and falls back to `F.linear` on GPUs,
other CPUs, other dtypes, with autograd, or when the kernel cannot be compiled;
`attention_applies`, `prefill_attention_applies` and `rotary_applies` say when
`decode_attention`, `prefill_attention` and `rotary` may replace the torch operations. The
kernels are compiled with the system C++ compiler on first use and cached
(`CODELLAMA_KERNEL_CACHE`, default `~/.cache/codellama`); `CODELLAMA_KERNELS=0` or
`set_enabled(False)` turns them off.
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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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
// prefetches the weights PF elements (tens of KiB) ahead into L2, which keeps memory busy when
// several rows of x make the loop compute-heavy and the hardware prefetchers fall behind.
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
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(wr + r * K + k + PF), _MM_HINT_T1);
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
    case 3: gemv<3, 4, 1, 32768>(x, w, y, N, K, threads); return 0;
    case 4: gemv<4, 4, 1, 32768>(x, w, y, N, K, threads); return 0;
    case 5: gemv<5, 2, 1, 32768>(x, w, y, N, K, threads); return 0;
    case 6: gemv<6, 2, 1, 32768>(x, w, y, N, K, threads); return 0;
    case 7: gemv<7, 2, 1, 32768>(x, w, y, N, K, threads); return 0;
    case 8: gemv<8, 2, 1, 32768>(x, w, y, N, K, threads); return 0;
    default: return 1;
  }
}

// e^x for the softmax (x <= 0 after subtracting the row maximum): 2^n * 2^f with |f| <= 1/2,
// 2^f by its degree-6 Taylor polynomial (relative error below 2e-7).
static inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
// 16 bf16 values widened to fp32 (exact: bf16 is the top half of an fp32).
static inline __m512 bf16x16_to_ps(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// fp32 -> bf16 for 16 values, rounding to nearest even like to_bf16 (NaN stays NaN).
static inline __m256i ps_to_bf16x16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet_nan);
  return _mm512_cvtepi32_epi16(rounded);
}
static inline void store_bf16(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, ps_to_bf16x16(v)); }

// The first min(left, 16) lanes.
static inline __mmask16 first_lanes16(int64_t left) {
  return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

// Softmax of row[0, n) in place (fp32); row[n, width) becomes 0.
static void softmax_row(float* row, int64_t n, int64_t width) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 16 <= n; s += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(row + s));
  float m = _mm512_reduce_max_ps(mx);
  for (; s < n; ++s) m = row[s] > m ? row[s] : m;
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (s = 0; s < n; s += 16) {
    const __mmask16 mask = first_lanes16(n - s);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + s), mv));
    _mm512_mask_storeu_ps(row + s, mask, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
  for (s = 0; s < n; s += 16) {
    const __mmask16 mask = first_lanes16(n - s);
    _mm512_mask_storeu_ps(row + s, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + s), inv));
  }
  for (s = n; s < width; ++s) row[s] = 0.0f;
}

// out[i] = sum_s p[i * ld + s] v[s] over s < len, for `rows` rows of probabilities (fp32), written
// as bf16 rows of D. A few rows at a time, so the accumulators stay in registers.
template <int D>
static void weighted_values(const float* p, int64_t ld, int64_t rows, const uint16_t* v, int64_t len,
                            uint16_t* const* out) {
  constexpr int G = D >= 128 ? 2 : 4;
  for (int64_t r0 = 0; r0 < rows; r0 += G) {
    const int g = rows - r0 < G ? (int)(rows - r0) : G;
    __m512 acc[G][D / 16];
    for (int i = 0; i < G; ++i)
      for (int j = 0; j < D / 16; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < len; ++s) {
      __m512 vv[D / 16];
      for (int j = 0; j < D / 16; ++j) vv[j] = bf16x16_to_ps(v + s * D + 16 * j);
      for (int i = 0; i < G; ++i) {
        if (i >= g) break;
        const __m512 w = _mm512_set1_ps(p[(r0 + i) * ld + s]);
        for (int j = 0; j < D / 16; ++j) acc[i][j] = _mm512_fmadd_ps(w, vv[j], acc[i][j]);
      }
    }
    for (int i = 0; i < g; ++i)
      for (int j = 0; j < D / 16; ++j) store_bf16(out[r0 + i] + 16 * j, acc[i][j]);
  }
}

// One kv head of one row: `rep` query heads q[rep, D] attend to keys/values [len, D].
template <int D>
static void attend_head(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, int64_t rep,
                        int64_t len, float scale, float* scores) {
  // Scores (fp32 dot products of bf16 values), scaled.
  for (int64_t s = 0; s < len; ++s) {
    const uint16_t* ks = k + s * D;
    __m512bh kv[D / 32];
    for (int j = 0; j < D / 32; ++j) kv[j] = (__m512bh)_mm512_loadu_si512(ks + 32 * j);
    for (int64_t r = 0; r < rep; ++r) {
      __m512 acc = _mm512_setzero_ps();
      for (int j = 0; j < D / 32; ++j)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + r * D + 32 * j), kv[j]);
      scores[r * len + s] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  uint16_t* rows[64];
  for (int64_t r0 = 0; r0 < rep; r0 += 64) {
    const int64_t n = rep - r0 < 64 ? rep - r0 : 64;
    for (int64_t r = 0; r < n; ++r) {
      softmax_row(scores + (r0 + r) * len, len, len);
      rows[r] = out + (r0 + r) * D;
    }
    weighted_values<D>(scores + r0 * len, len, n, v, len, rows);
  }
}

// out[b, h] = softmax(q[b, h] . K[b, h / rep, :lens[b]] * scale) V[b, h / rep, :lens[b]] for one new
// token per row. q/out [B, H, D] contiguous bf16; key/value element (b, g, s, d) sits at
// b * row_stride + g * head_stride + s * D + d. Returns 0, 1 for an unsupported head size, or 2 when
// the scratch memory for the scores cannot be allocated.
extern "C" int codellama_decode_attention_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v,
                                               uint16_t* out, const int64_t* lens, int64_t B, int64_t H,
                                               int64_t KVH, int64_t D, int64_t row_stride,
                                               int64_t head_stride, float scale, int threads) {
  if ((D != 64 && D != 128) || KVH <= 0 || H % KVH != 0) return 1;
  const int64_t rep = H / KVH;
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = lens[b] > longest ? lens[b] : longest;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    float* scores = (float*)malloc(sizeof(float) * rep * (longest + 16));
    if (!scores) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * KVH; ++task) {
      if (!scores) continue;
      const int64_t b = task / KVH, g = task % KVH;
      const uint16_t* kb = k + b * row_stride + g * head_stride;
      const uint16_t* vb = v + b * row_stride + g * head_stride;
      const int64_t first = (b * H + g * rep) * D;
      if (D == 64) attend_head<64>(q + first, kb, vb, out + first, rep, lens[b], scale, scores);
      else attend_head<128>(q + first, kb, vb, out + first, rep, lens[b], scale, scores);
    }
    free(scores);
  }
  return failed ? 2 : 0;
}

// Keys [len, D] of one kv head regrouped for the prefill scores: block b of 16 keys holds, for
// each pair p of head dimensions, the 16 keys' (2p, 2p+1) elements side by side (one 32-bit
// lane per key), so one dot-product instruction scores 16 keys at once. Keys past len are 0.
template <int D>
static void pack_keys(const uint16_t* k, int64_t len, uint32_t* packed) {
  const uint32_t* pairs = (const uint32_t*)k;
  for (int64_t b = 0; b < (len + 15) / 16; ++b)
    for (int p = 0; p < D / 2; ++p)
      for (int j = 0; j < 16; ++j) {
        const int64_t s = b * 16 + j;
        packed[(b * (D / 2) + p) * 16 + j] = s < len ? pairs[s * (D / 2) + p] : 0u;
      }
}

// Scores of 8 query rows against the first `blocks` blocks of packed keys, scaled:
// scores[r * ld + s] = scale * q[r] . key[s]. Each row's query pairs are broadcast to all lanes.
template <int D>
static void score_rows(const uint16_t* const* q, const uint32_t* packed, int64_t blocks, float scale,
                       float* scores, int64_t ld) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_ps();
    for (int p = 0; p < D / 2; ++p) {
      const __m512bh kz = (__m512bh)_mm512_loadu_si512(packed + (b * (D / 2) + p) * 16);
      for (int r = 0; r < 8; ++r) {
        uint32_t pair;
        memcpy(&pair, q[r] + 2 * p, 4);
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)pair), kz);
      }
    }
    for (int r = 0; r < 8; ++r) _mm512_storeu_ps(scores + r * ld + b * 16, _mm512_mul_ps(acc[r], sv));
  }
}

// Causal attention of a prompt chunk of one cache row: the query of token i (position start + i)
// and head h attends to positions 0 .. start + i of kv head h / rep. q/out [len, H, D] contiguous
// bf16; key/value element (g, s, d) sits at g * head_stride + s * D + d and positions up to
// start + len - 1 are filled. fp32 scores, softmax and weighted sum, as in the decode kernel.
// Returns 0, 1 for an unsupported head size, or 2 when scratch memory cannot be allocated.
extern "C" int codellama_prefill_attention_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v,
                                                uint16_t* out, int64_t start, int64_t len, int64_t H,
                                                int64_t KVH, int64_t D, int64_t head_stride, float scale,
                                                int threads) {
  if ((D != 64 && D != 128) || KVH <= 0 || H % KVH != 0) return 1;
  if (len <= 0) return 0;
  const int64_t rep = H / KVH, keys = start + len, blocks = (keys + 15) / 16;
  const int64_t per_head = blocks * 16 * D / 2;  // packed 32-bit pairs per kv head
  uint32_t* packed = (uint32_t*)malloc(sizeof(uint32_t) * per_head * KVH);
  if (!packed) return 2;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t g = 0; g < KVH; ++g) {
    if (D == 64) pack_keys<64>(k + g * head_stride, keys, packed + g * per_head);
    else pack_keys<128>(k + g * head_stride, keys, packed + g * per_head);
  }
  // Rows are (token, head in group) pairs, token-major; a task is 8 consecutive rows of one kv
  // head, which see at most 8 different lengths.
  const int64_t rows = len * rep, groups = (rows + 7) / 8;
  const int64_t ld = blocks * 16;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    float* scores = (float*)malloc(sizeof(float) * 8 * ld);
    if (!scores) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < KVH * groups; ++task) {
      if (!scores) continue;
      // Later tokens see more keys: hand out the longest tasks first.
      const int64_t g = task % KVH, first = (groups - 1 - task / KVH) * 8;
      const uint16_t* qrow[8];
      uint16_t* orow[8];
      int64_t seen[8], most = 0;
      for (int r = 0; r < 8; ++r) {  // a short last task repeats its last row
        const int64_t row = first + r < rows ? first + r : rows - 1;
        const int64_t token = row / rep, head = g * rep + row % rep;
        qrow[r] = q + (token * H + head) * D;
        orow[r] = out + (token * H + head) * D;
        seen[r] = start + token + 1;
        most = seen[r] > most ? seen[r] : most;
      }
      if (D == 64) score_rows<64>(qrow, packed + g * per_head, (most + 15) / 16, scale, scores, ld);
      else score_rows<128>(qrow, packed + g * per_head, (most + 15) / 16, scale, scores, ld);
      for (int r = 0; r < 8; ++r) softmax_row(scores + r * ld, seen[r], most);
      const int64_t n = rows - first < 8 ? rows - first : 8;
      const uint16_t* vg = v + g * head_stride;
      if (D == 64) weighted_values<64>(scores, ld, n, vg, most, orow);
      else weighted_values<128>(scores, ld, n, vg, most, orow);
    }
    free(scores);
  }
  free(packed);
  return failed ? 2 : 0;
}

// Rotary embedding of adjacent pairs: for token t and every head, (a, b) = x[t, h, 2i .. 2i+1]
// becomes (a cos - b sin, a sin + b cos) with cos/sin[t, i] fp32, each product and sum rounded
// to fp32 as torch does (no fused multiply-add), then to bf16. x/out [T, H, D] contiguous.
extern "C" int codellama_rotary_bf16(const uint16_t* x, const float* cos, const float* sin, uint16_t* out,
                                     int64_t tokens, int64_t heads, int64_t D, int threads) {
  if (D % 32 != 0 || D > 256) return 1;
#pragma omp parallel for num_threads(tokens > 1 ? threads : 1) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    float c2[256], s2[256];  // cos per element, and sin with the sign each element of a pair needs
    for (int64_t i = 0; i < D / 2; ++i) {
      c2[2 * i] = c2[2 * i + 1] = cos[t * (D / 2) + i];
      s2[2 * i] = -sin[t * (D / 2) + i];
      s2[2 * i + 1] = sin[t * (D / 2) + i];
    }
    for (int64_t h = 0; h < heads; ++h) {
      const uint16_t* xh = x + (t * heads + h) * D;
      uint16_t* oh = out + (t * heads + h) * D;
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 v = bf16x16_to_ps(xh + d);
        const __m512 swapped = _mm512_permute_ps(v, 0xB1);  // (b, a) in every pair
        const __m512 straight = _mm512_mul_ps(v, _mm512_loadu_ps(c2 + d));
        store_bf16(oh + d, _mm512_add_ps(straight, _mm512_mul_ps(swapped, _mm512_loadu_ps(s2 + d))));
      }
    }
  }
  return 0;
}
"""

_FLAGS = [
    "-O3",
    "-ffp-contract=off",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-fopenmp",
    "-shared",
    "-fPIC",
]

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
    target = _cache_dir() / f"kernels_bf16_{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source, built = Path(tmp) / "kernels_bf16.cpp", Path(tmp) / "kernels_bf16.so"
            source.write_text(_SOURCE)
            subprocess.run(
                [compiler, *_FLAGS, str(source), "-o", str(built)], check=True, capture_output=True
            )
            os.replace(built, target)  # atomic: concurrent processes never load half a file
    library = ctypes.CDLL(str(target))
    gemv = library.codellama_gemv_bf16
    gemv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    gemv.restype = ctypes.c_int
    attention = library.codellama_decode_attention_bf16
    attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int]
    attention.restype = ctypes.c_int
    prefill = library.codellama_prefill_attention_bf16
    prefill.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int]
    prefill.restype = ctypes.c_int
    rotary = library.codellama_rotary_bf16
    rotary.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    rotary.restype = ctypes.c_int
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


def _run(kernel: str, *args: object, unsupported: str) -> None:
    """Call the compiled `kernel` with `args` and torch's thread count; raise on a bad status."""
    status = getattr(_library, kernel)(*args, torch.get_num_threads())
    if status == 2:
        raise MemoryError(f"{kernel}: out of memory for its scratch space")
    if status != 0:
        raise RuntimeError(f"{kernel} does not handle {unsupported}")


def _gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel on x [M, K] (contiguous) and weight [N, K] (contiguous): returns [M, N] bf16."""
    rows, n_out, n_in = x.shape[0], weight.shape[0], weight.shape[1]
    out = torch.empty(rows, n_out, dtype=torch.bfloat16)
    _run(
        "codellama_gemv_bf16",
        x.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        rows,
        n_out,
        n_in,
        unsupported=f"{rows} rows",
    )
    return out


@torch.library.custom_op("codellama::gemv_bf16", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _gemv(x, weight)


@_gemv_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _usable_on(*tensors: torch.Tensor) -> bool:
    """The kernels are on, built for this CPU, and these are bf16 CPU tensors without autograd."""
    return (
        _enabled
        and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and (_available if _available is not None else _first_use_outside_tracing())
    )


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` would take the hand-written kernel."""
    return (
        weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and x.numel() // max(weight.shape[1], 1) <= MAX_ROWS
        and weight.is_contiguous()
        and _usable_on(x, weight)
    )


def _first_use_outside_tracing() -> bool:
    # Compiling (a C++ build behind a lock) cannot be traced: a graph traced before the first
    # eager use keeps torch's matmul. Call `kernel_available()` before torch.compile to avoid it.
    return False if torch.compiler.is_compiling() else kernel_available()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias): x [..., K] times weight [N, K] transposed, -> [..., N].

    Uses the AVX512-BF16 kernel for a few bf16 rows on the CPU (fp32 accumulation, one bf16
    rounding of each output, like torch's own bf16 matmul), `F.linear` otherwise. A quantized
    weight (`llama.quantization.QuantizedWeight`) multiplies itself.
    """
    if not isinstance(weight, torch.Tensor):
        return weight.linear(x)
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


# Head sizes the decode-attention kernel is built for (Code Llama: 128).
ATTENTION_HEAD_DIMS = (64, 128)


def _attention_layout_ok(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """A head size the attention kernels are built for, each cached position's head contiguous."""
    return (
        q.shape[-1] in ATTENTION_HEAD_DIMS
        and cache.stride(-1) == 1
        and cache.stride(-2) == q.shape[-1]
        and _usable_on(q, cache)
    )


def _check_same_layout(cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
    if cache_k.stride() != cache_v.stride():
        raise ValueError("the key and value caches must have the same layout")


def attention_applies(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether `decode_attention(q, cache, ...)` would take the hand-written kernel."""
    return _attention_layout_ok(q, cache)


def _decode_attention(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    batch, heads, head_dim = q.shape
    q = q.contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    _check_same_layout(cache_k, cache_v)
    out = torch.empty_like(q)
    _run(
        "codellama_decode_attention_bf16",
        q.data_ptr(),
        cache_k.data_ptr(),
        cache_v.data_ptr(),
        out.data_ptr(),
        lengths.data_ptr(),
        batch,
        heads,
        cache_k.shape[1],
        head_dim,
        cache_k.stride(0),
        cache_k.stride(1),
        head_dim**-0.5,
        unsupported=f"{heads} heads of size {head_dim}",
    )
    return out


@torch.library.custom_op("codellama::decode_attention_bf16", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    return _decode_attention(q, cache_k, cache_v, lengths)


@_decode_attention_op.register_fake
def _(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def decode_attention(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Attention of one new token per row over that row's cached keys and values.

    Args:
        q: queries [B, heads, head_dim], bf16.
        cache_k, cache_v: the rows' caches [B, kv_heads, max_seq_len, head_dim], bf16 (the
            query heads sharing a kv head are consecutive: head h reads kv head h // (heads /
            kv_heads)).
        lengths: [B] number of cached positions each row attends to (its new token included).

    Returns:
        [B, heads, head_dim] bf16: softmax(q k^T / sqrt(head_dim)) v over each row's first
        `lengths[b]` positions, computed in fp32.

    Raises:
        RuntimeError: if the kernel does not apply (check `attention_applies` first).
    """
    if torch.compiler.is_compiling():
        return _decode_attention_op(q, cache_k, cache_v, lengths)
    return _decode_attention(q, cache_k, cache_v, lengths)


def prefill_attention_applies(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether `prefill_attention(q, cache, ...)` would take the hand-written kernel: q [L, heads,
    D] and one cache row [kv_heads, max_seq_len, D], bf16, D in `ATTENTION_HEAD_DIMS`, eager only."""
    return (
        q.dim() == 3
        and cache.dim() == 3
        and not torch.compiler.is_compiling()
        and _attention_layout_ok(q, cache)
    )


def prefill_attention(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int
) -> torch.Tensor:
    """Causal attention of a chunk of one sequence over its cache row.

    Args:
        q: queries [L, heads, head_dim] of the tokens at positions start .. start + L - 1, bf16.
        cache_k, cache_v: the sequence's cache row [kv_heads, max_seq_len, head_dim], bf16, filled
            up to position start + L - 1 (head h reads kv head h // (heads / kv_heads)).
        start: position of the first query.

    Returns:
        [L, heads, head_dim] bf16: for the token at position p, softmax(q k^T / sqrt(head_dim)) v
        over positions 0 .. p, computed in fp32.

    Raises:
        RuntimeError: if the kernel does not apply (check `prefill_attention_applies` first).
        MemoryError: if its scratch space (the keys regrouped, scores) cannot be allocated.
    """
    length, heads, head_dim = q.shape
    _check_same_layout(cache_k, cache_v)
    if start + length > cache_k.shape[1]:
        raise ValueError(f"positions up to {start + length} do not fit a cache of {cache_k.shape[1]}")
    q = q.contiguous()
    out = torch.empty_like(q)
    _run(
        "codellama_prefill_attention_bf16",
        q.data_ptr(),
        cache_k.data_ptr(),
        cache_v.data_ptr(),
        out.data_ptr(),
        start,
        length,
        heads,
        cache_k.shape[0],
        head_dim,
        cache_k.stride(0),
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
        cos.data_ptr(),
        sin.data_ptr(),
        out.data_ptr(),
        batch * seqlen,
        heads,
        head_dim,
        unsupported=f"heads of {head_dim}",
    )
    return out
