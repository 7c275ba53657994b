// The CPU kernels for x86-64 with AVX512-BF16 (Intel Cooper Lake / Sapphire Rapids and later, AMD
// Zen 4 and later). Built by llama/kernel_build.py with -mavx512f -mavx512bw -mavx512vl -mavx512bf16
// -mavx512vnni (every CPU with AVX512-BF16 has AVX512-VNNI);
// kernels_avx2.cpp holds the same entry points for CPUs with AVX2 and FMA only.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

// y[m, n .. n+R) = x[m, :] . w[n .. n+R, :] for all M rows of x: each weight row is read once.
// U independent accumulators per (m, r) hide the latency of the dot-product instruction (U = 2
// for every row count, so each output is the same sum, in the same order, whatever M is); PF > 0
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
static void gemv(const uint16_t* x, const FusedWeights& fw, uint16_t* y, int64_t K, int threads) {
  for_each_block<R>(
      fw, threads,
      [&](int i, int64_t n) {
        rows_block<M, R, U, PF>(x, (const uint16_t*)fw.w[i], K, y + fw.offset[i], fw.total, n);
      },
      [&](int i, int64_t n) { rows_block<M, 1, 2, 0>(x, (const uint16_t*)fw.w[i], K, y + fw.offset[i], fw.total, n); });
}

// y[M, N0 + N1 + ...] = x[M, K] @ [w0; w1; ...]^T for the weights of `table` (common.h), all bf16
// and contiguous. Returns STATUS_OK, STATUS_UNSUPPORTED for M outside 1..8, or STATUS_BAD_SIZES
// when the sizes do not fit the buffers. One or two rows: stream one weight row at a time (a
// single sequential read per thread, which the hardware prefetchers follow best). More rows:
// share each x load between several weight rows, within the 32 vector registers (M * R * 2
// accumulators + R weight vectors + 1).
extern "C" int codellama_gemv_bf16_fused(const uint16_t* x, int64_t x_len, const int64_t* table, int64_t count,
                                         uint16_t* y, int64_t y_len, int64_t M, int64_t K, int threads) {
  FusedWeights fw;
  const int status = read_fused(table, count, 0, x_len, y_len, M, K, K, &fw);
  if (status != STATUS_OK) return status;
  switch (M) {
    case 1: gemv<1, 1, 2, 0>(x, fw, y, K, threads); break;
    case 2: gemv<2, 1, 2, 0>(x, fw, y, K, threads); break;
    case 3: gemv<3, 4, 2, 32768>(x, fw, y, K, threads); break;
    case 4: gemv<4, 3, 2, 32768>(x, fw, y, K, threads); break;
    case 5: gemv<5, 2, 2, 32768>(x, fw, y, K, threads); break;
    case 6: gemv<6, 2, 2, 32768>(x, fw, y, K, threads); break;
    case 7: gemv<7, 2, 2, 32768>(x, fw, y, K, threads); break;
    default: gemv<8, 1, 2, 32768>(x, fw, y, K, threads); break;
  }
  return STATUS_OK;
}

// The same products on fp32 activations and weights: each output is one accumulator of 16 lanes
// fed 16 weights at a time (the last K % 16 by a masked load of the same shape), then summed by
// _mm512_reduce_add_ps, whatever M and R are. PF as in rows_block.
template <int M, int R, int PF>
static inline void rows_block_f32(const float* __restrict x, const float* __restrict w, int64_t K,
                                  float* __restrict y, int64_t N, int64_t n) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const float* wr = w + n * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (PF > 0)  // 16 floats: one 64-byte line per step
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(wr + r * K + k + PF), _MM_HINT_T1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(wr + r * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, wr + r * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int M, int R, int PF>
static void gemv_f32(const float* x, const FusedWeights& fw, float* y, int64_t K, int threads) {
  for_each_block<R>(
      fw, threads,
      [&](int i, int64_t n) { rows_block_f32<M, R, PF>(x, (const float*)fw.w[i], K, y + fw.offset[i], fw.total, n); },
      [&](int i, int64_t n) { rows_block_f32<M, 1, 0>(x, (const float*)fw.w[i], K, y + fw.offset[i], fw.total, n); });
}

// codellama_gemv_bf16_fused for fp32 activations, weights and outputs (the same table, statuses
// and row counts). Register budget: M * R accumulators + R weight vectors + 1.
extern "C" int codellama_gemv_f32_fused(const float* x, int64_t x_len, const int64_t* table, int64_t count,
                                        float* y, int64_t y_len, int64_t M, int64_t K, int threads) {
  FusedWeights fw;
  const int status = read_fused(table, count, 0, x_len, y_len, M, K, K, &fw);
  if (status != STATUS_OK) return status;
  switch (M) {
    case 1: gemv_f32<1, 4, 0>(x, fw, y, K, threads); break;
    case 2: gemv_f32<2, 4, 0>(x, fw, y, K, threads); break;
    case 3: gemv_f32<3, 4, 16384>(x, fw, y, K, threads); break;
    case 4: gemv_f32<4, 4, 16384>(x, fw, y, K, threads); break;
    case 5: gemv_f32<5, 4, 16384>(x, fw, y, K, threads); break;
    case 6: gemv_f32<6, 4, 16384>(x, fw, y, K, threads); break;
    case 7: gemv_f32<7, 3, 16384>(x, fw, y, K, threads); break;
    default: gemv_f32<8, 3, 16384>(x, fw, y, K, threads); break;
  }
  return STATUS_OK;
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

// The vector operations of tiled_attention.h on 16 fp32 lanes.
struct Avx512Ops {
  using vec = __m512;
  static constexpr int W = 16;
  static constexpr int kRowBlock = 8;  // rows sharing each key or value load in the tiles
  static inline vec zero() { return _mm512_setzero_ps(); }
  static inline vec set1(float x) { return _mm512_set1_ps(x); }
  static inline vec load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static inline vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static inline vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static inline vec max(vec a, vec b) { return _mm512_max_ps(a, b); }
  static inline float hmax(vec v) { return _mm512_reduce_max_ps(v); }
  static inline float hsum(vec v) { return _mm512_reduce_add_ps(v); }
  static inline vec exp(vec v) { return exp_ps(v); }
  static inline vec iota() { return _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
  static inline vec below(vec index, vec bound, vec v, vec fill) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(index, bound, _CMP_LT_OQ), fill, v);
  }
  static inline vec load_bf16(const uint16_t* p) { return bf16x16_to_ps(p); }
  static inline vec load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  }
  static inline void store_bf16(uint16_t* p, vec v) { ::store_bf16(p, v); }
  static constexpr bool kBf16Dot = true;
  using ivec = __m512i;
  static inline ivec set1_pair(uint32_t x) { return _mm512_set1_epi32((int)x); }
  static inline ivec load_pairs(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static inline vec dot_pairs(vec acc, ivec a, ivec b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  static inline void codes_to_bf16(const int8_t* codes, uint16_t* out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 values = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(codes + i))));
      _mm256_storeu_si256((__m256i*)(out + i), ps_to_bf16x16(values));
    }
  }
  static inline void transpose16(const uint32_t* in, int64_t in_stride, uint32_t* out, int64_t out_stride) {
    __m512i r[16], t[16], u[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(in + i * in_stride);
    for (int i = 0; i < 16; i += 2) {  // within each 128-bit lane: rows i, i + 1 interleaved
      t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int g = 0; g < 16; g += 4) {  // u[g + c]: rows g .. g + 3, column c of each lane
      u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
      u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
      u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
      u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // column 4 * lane + c gathers lane `lane` of u[c], u[4 + c], u[8 + c], u[12 + c]
      const __m512i x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);
      const __m512i y0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
      const __m512i y1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
      _mm512_storeu_si512(out + (0 + c) * out_stride, _mm512_shuffle_i32x4(x0, y0, 0x88));
      _mm512_storeu_si512(out + (4 + c) * out_stride, _mm512_shuffle_i32x4(x0, y0, 0xdd));
      _mm512_storeu_si512(out + (8 + c) * out_stride, _mm512_shuffle_i32x4(x1, y1, 0x88));
      _mm512_storeu_si512(out + (12 + c) * out_stride, _mm512_shuffle_i32x4(x1, y1, 0xdd));
    }
  }
};

#include "tiled_attention.h"

// out[b, h] = softmax(q[b, h] . K[r, h / rep, :lens[b]] * scale) V[r, h / rep, :lens[b]] for one new
// token per batch row b, r = rows[b] (b when rows is NULL). q/out [B, H, D] contiguous bf16. The
// caches (common.h): `blocks` blocks of block_len positions, element (g, s, d) of block i at
// i * block_stride + g * head_stride + s * D + d (kv_len elements from k and from v, the same
// layout for both); without a block table (NULL) cache row r is block r (a dense cache), with one
// its position s is in block table[r * blocks_per_row + s / block_len] (a paged cache; block_len a
// multiple of 64). Returns STATUS_OK, STATUS_UNSUPPORTED for a head size or grouping it is not
// built for, STATUS_BAD_SIZES when the sizes, strides, a length (1 .. the row's positions), a row or
// a table entry the call would read do not fit the buffers, or STATUS_NO_MEMORY when the scratch
// space cannot be allocated. fp32 scores, softmax and weighted sum, in tiles (tiled_attention.h).
extern "C" int codellama_decode_attention_bf16(DECODE_ATTENTION_ARGS(uint16_t)) {
  return tiled::decode_entry<Avx512Ops, uint16_t>(DECODE_ATTENTION_CALL);
}
// The same on fp32 queries, cache and output.
extern "C" int codellama_decode_attention_f32(DECODE_ATTENTION_ARGS(float)) {
  return tiled::decode_entry<Avx512Ops, float>(DECODE_ATTENTION_CALL);
}

// codellama_decode_attention_bf16 over an int8 cache read in place: codes laid out as the bf16
// cache, fp32 scales at block * scale_block_stride + g * scale_head_stride + s (one per position and
// kv head, value = code * scale), bf16 queries and output; head sizes 32, 64, 128.
extern "C" int codellama_decode_attention_int8(DECODE_ATTENTION_INT8_ARGS) {
  return tiled::decode_int8_entry<Avx512Ops>(DECODE_ATTENTION_INT8_CALL);
}

// Causal attention of a prompt chunk of one cache row: the query of token i (position start + i)
// and head h attends to positions 0 .. start + i of kv head h / rep. q/out [len, H, D] contiguous
// bf16. Without a block table (NULL), k/v are the row: element (g, s, d) at g * head_stride + s * D
// + d, max_len positions (kv_len elements from each; blocks and block_stride unused). With one,
// k/v are `blocks` blocks of max_len positions laid out as for the decode kernel and position s of
// the row is in block table[s / max_len] (table_len entries). Positions up to start + len - 1 are
// filled. fp32 scores, softmax and weighted sum, in tiles (tiled_attention.h). Returns STATUS_OK,
// STATUS_UNSUPPORTED, STATUS_BAD_SIZES or STATUS_NO_MEMORY as the decode kernel does.
extern "C" int codellama_prefill_attention_bf16(PREFILL_ATTENTION_ARGS(uint16_t)) {
  return tiled::prefill_entry<Avx512Ops, uint16_t>(PREFILL_ATTENTION_CALL);
}
// The same on fp32 queries, cache and output.
extern "C" int codellama_prefill_attention_f32(PREFILL_ATTENTION_ARGS(float)) {
  return tiled::prefill_entry<Avx512Ops, float>(PREFILL_ATTENTION_CALL);
}

// codellama_prefill_attention_bf16 over an int8 cache read in place: codes laid out as the bf16
// cache, fp32 scales at g * scale_head_stride + s (the row), or block * scale_block_stride + g *
// scale_head_stride + s (blocks); head sizes 32, 64, 128.
extern "C" int codellama_prefill_attention_int8(PREFILL_ATTENTION_INT8_ARGS) {
  return tiled::prefill_int8_entry<Avx512Ops>(PREFILL_ATTENTION_INT8_CALL);
}

// Rotary embedding of adjacent pairs: for token t and every head, (a, b) = x[t, h, 2i .. 2i+1]
// becomes (a cos - b sin, a sin + b cos) with cos/sin[t, i] fp32, each product and sum rounded
// to fp32 as torch does (no fused multiply-add), then to bf16. x/out [T, H, D] contiguous,
// cos/sin [T, D/2] (angle_len elements each).
extern "C" int codellama_rotary_bf16(const uint16_t* x, int64_t x_len, const float* cos, const float* sin,
                                     int64_t angle_len, uint16_t* out, int64_t out_len, int64_t tokens,
                                     int64_t heads, int64_t D, int threads) {
  const int status = check_rotary(x_len, angle_len, out_len, tokens, heads, D);
  if (status != STATUS_OK) return status;
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
  return STATUS_OK;
}

// ---------------------------------------------------------------------------------------------
// Weight-only quantized matrix-vector products (layouts in common.h)
// ---------------------------------------------------------------------------------------------
//
// Each output is one thread's sum, by the same operations in the same order whatever the number
// of rows, so a row's result never depends on its batch. One weight row is streamed at a time
// (a single sequential read per thread); more than `PASS` rows of activations are taken in
// passes over the same weight row, which the later passes read from the caches.
//
// Codes become bf16 weights with a shift and one ternary-logic instruction: a nibble q ORed into
// the bf16 bits 0x4300 is the number 128 + q, exactly. The dot products with those (fp32 sums,
// four independent accumulators per output to hide the instruction's latency) carry 128 times
// the sum of the activations, which is taken off with the other constant terms. Masked loads
// are slow from memory on some CPUs (the AMD EPYC these were tuned on: 4x slower), so the
// weights are read with plain loads.

#define PASS 4
// Bytes ahead of the int8 and int4 weight streams prefetched. The int8 stream goes into L2 only:
// its three digit rows of activations (3 K bytes, 17 KiB for K = 5632) must stay in L1, and 16
// KiB of weights prefetched into L1 evicted them (Zen 4: the int8 decode matrices 1.8x faster
// into L2 than into L1). The int4 stream goes into L1, a short way ahead, every line of it
// (Zen 4: into L2 0.7x; 2 KiB ahead 1.04-1.07x against 8 KiB, within the spread of repeated runs).
#define INT8_PF 16384
#define INT8_PF_HINT _MM_HINT_T1
#define INT4_PF 2048
#define INT4_PF_HINT _MM_HINT_T0

// (v >> shift) & 0xF, then XOR `bits` (0x4300 | flip): the bf16 weight 128 + nibble.
static inline __m512bh nibble_weights(__m512i v, int shift, __m512i bits) {
  return (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, shift), _mm512_set1_epi16(0x000F), bits, 0x6A);
}

// int8: y[m, n] = scale[n] * x[m, :] . q[n, :] with integer dot products (AVX512-VNNI: 64
// byte products per instruction). Each row of activations is taken as integers x = s * X, with
// s = max |x| / 2^22 (every bf16 value exact unless it is 2^-15 times the row's largest or
// smaller; the error is at most max |x| * 2^-23), written with three signed digits,
// X = 65536 D2 + 256 D1 + D0. The codes enter as unsigned bytes u = q + 128 (sign bit flipped),
// so q . X = 65536 (u . D2) + 256 (u . D1) + (u . D0) - 128 sum X, summed exactly in integers.
// Digits [3][M][Kr] (Kr = K rounded down to 64); the last K % 64 inputs as integers (`tail`).
struct Int8Activations {
  int8_t* digits;
  int32_t* tail;  // [M][64]
  int64_t* sums;  // sum of X over the first Kr inputs, per row
  float* scales;  // s per row (NaN when the row holds a NaN or an infinity)
  int64_t Kr;
};

template <int M>
static inline void int8_rows(const Int8Activations& xa, int64_t M_all, const int8_t* __restrict q, int64_t K,
                             const uint16_t* __restrict scales, void* y, int y_bf16, int64_t N, int64_t m0,
                             int64_t n) {
  const int64_t Kr = xa.Kr;
  __m512i acc[M][3][2];
  for (int m = 0; m < M; ++m)
    for (int d = 0; d < 3; ++d) acc[m][d][0] = acc[m][d][1] = _mm512_setzero_si512();
  const int8_t* qr = q + n * K;
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  int64_t k = 0;
  for (; k + 128 <= Kr; k += 128)
    for (int u = 0; u < 2; ++u) {
      if (INT8_PF) _mm_prefetch((const char*)(qr + k + 64 * u + INT8_PF), INT8_PF_HINT);
      const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(qr + k + 64 * u), flip);
      for (int m = 0; m < M; ++m)
        for (int d = 0; d < 3; ++d) {
          const int8_t* xd = xa.digits + (d * M_all + m0 + m) * Kr + k + 64 * u;
          acc[m][d][u] = _mm512_dpbusd_epi32(acc[m][d][u], w, _mm512_loadu_si512(xd));
        }
    }
  if (k < Kr) {  // an odd 64
    const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(qr + k), flip);
    for (int m = 0; m < M; ++m)
      for (int d = 0; d < 3; ++d) {
        const int8_t* xd = xa.digits + (d * M_all + m0 + m) * Kr + k;
        acc[m][d][0] = _mm512_dpbusd_epi32(acc[m][d][0], w, _mm512_loadu_si512(xd));
      }
  }
  for (int m = 0; m < M; ++m) {
    // Each accumulator lane took at most K / 128 + 1 instructions of 4 products of magnitude at
    // most 255 * 128: the two of a digit add up in 32 bits for K below 2^20; the digits are then
    // combined in 64-bit lanes.
    __m512i lanes = _mm512_setzero_si512();
    for (int d = 2; d >= 0; --d) {
      const __m512i a = _mm512_add_epi32(acc[m][d][0], acc[m][d][1]);
      lanes = _mm512_slli_epi64(lanes, 8);
      lanes = _mm512_add_epi64(lanes, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a)));
      lanes = _mm512_add_epi64(lanes, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a, 1)));
    }
    int64_t total = _mm512_reduce_add_epi64(lanes) - 128 * xa.sums[m0 + m];
    for (int64_t t = Kr; t < K; ++t) total += (int64_t)xa.tail[(m0 + m) * 64 + (t - Kr)] * qr[t];
    const double value = (double)total * xa.scales[m0 + m] * bf16_to_float(scales[n]);
    store_output(y, y_bf16, (m0 + m) * N + n, (float)value);
  }
}

// Row m of fp32 activations [K] as integers X = round(x / s) and their digits (see above).
static void int8_activations(const float* row, int64_t K, int64_t m, int64_t M, Int8Activations* xa) {
  const int64_t Kr = xa->Kr;
  __m512 largest = _mm512_setzero_ps();
  __mmask16 nan = 0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(row + k);
    largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  float most = _mm512_reduce_max_ps(largest);
  for (; k < K; ++k) {
    most = fmaxf(most, fabsf(row[k]));
    nan |= row[k] != row[k];
  }
  const int finite = !nan && isfinite(most);
  const float scale = most > 0.0f ? most * 0x1p-22f : 1.0f, inverse = finite ? 1.0f / scale : 0.0f;
  xa->scales[m] = finite ? scale : NAN;
  // X = round(x / s) (to nearest even), |X| <= 2^22; digits D0, D1 in -128..127, D2 in -64..64.
  __m512i sum = _mm512_setzero_si512();
  const __m512i half = _mm512_set1_epi32(128), byte = _mm512_set1_epi32(255);
  for (k = 0; k < Kr; k += 16) {
    const __m512i X = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), _mm512_set1_ps(inverse)));
    const __m512i d0 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(X, half), byte), half);
    const __m512i r = _mm512_srai_epi32(_mm512_sub_epi32(X, d0), 8);
    const __m512i d1 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(r, half), byte), half);
    const __m512i d2 = _mm512_srai_epi32(_mm512_sub_epi32(r, d1), 8);
    _mm_storeu_si128((__m128i*)(xa->digits + (0 * M + m) * Kr + k), _mm512_cvtepi32_epi8(d0));
    _mm_storeu_si128((__m128i*)(xa->digits + (1 * M + m) * Kr + k), _mm512_cvtepi32_epi8(d1));
    _mm_storeu_si128((__m128i*)(xa->digits + (2 * M + m) * Kr + k), _mm512_cvtepi32_epi8(d2));
    sum = _mm512_add_epi64(sum, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(X)));
    sum = _mm512_add_epi64(sum, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(X, 1)));
  }
  xa->sums[m] = _mm512_reduce_add_epi64(sum);
  for (k = Kr; k < K; ++k) xa->tail[m * 64 + (k - Kr)] = (int32_t)lrintf(row[k] * inverse);
}

// y[M, N0 + N1 + ...] = x[M, K] @ [W0; W1; ...]^T in x's dtype (bf16 when x_bf16, else fp32) for
// the int8 weights of `table` (common.h): codes [N, K] as stored, one bf16 scale per row.
// Returns STATUS_OK, STATUS_UNSUPPORTED for M outside 1..8 or K of 2^20 or more,
// STATUS_BAD_SIZES or STATUS_NO_MEMORY.
extern "C" int codellama_gemv_int8_fused(const void* x, int64_t x_len, int x_bf16, const int64_t* table,
                                         int64_t count, void* y, int64_t y_len, int64_t M, int64_t K,
                                         int threads) {
  FusedWeights fw;
  const int status = read_fused(table, count, 1, x_len, y_len, M, K, K, &fw);
  if (status != STATUS_OK) return status;
  if (K >= (1 << 20)) return STATUS_UNSUPPORTED;  // the 32-bit sums of int8_rows could overflow
  Int8Activations xa;
  xa.Kr = K / 64 * 64;
  xa.digits = (int8_t*)malloc(3 * M * xa.Kr + 1);
  xa.tail = (int32_t*)calloc(M * 64, sizeof(int32_t));
  xa.sums = (int64_t*)malloc(sizeof(int64_t) * M);
  xa.scales = (float*)malloc(sizeof(float) * M);
  float* row = (float*)malloc(sizeof(float) * K);
  if (!xa.digits || !xa.tail || !xa.sums || !xa.scales || !row) {
    free(xa.digits), free(xa.tail), free(xa.sums), free(xa.scales), free(row);
    return STATUS_NO_MEMORY;
  }
  for (int64_t m = 0; m < M; ++m) {
    activations_row(x, x_bf16, m, K, row);
    int8_activations(row, K, m, M, &xa);
  }
  for_each_row(fw, threads, [&](int i, int64_t n) {
    in_passes<PASS>(M, [&](auto rows, int64_t m0) {
      int8_rows<decltype(rows)::value>(xa, M, (const int8_t*)fw.w[i], K, fw.scales[i],
                                       (char*)y + fw.offset[i] * (x_bf16 ? 2 : 4), x_bf16, fw.total, m0, n);
    });
  });
  free(xa.digits), free(xa.tail), free(xa.sums), free(xa.scales), free(row);
  return STATUS_OK;
}

// int4: the activations regrouped to match a block's chunks. For block b, step p (inputs 2p and
// 2p + 1 of each group) and group l, words 2 l and 2 l + 1 of the 32-word vector (b, p) hold x at
// inputs 2p and 2p + 1 of group 16 b + l (zero past the last group). fp32 activations are split
// into a bf16 part and the bf16 rounding of the rest (`lo`), each multiplied by the codes.
struct Int4Activations {
  uint16_t* hi;
  uint16_t* lo;  // NULL for bf16 activations (exact in `hi`)
  float* sums;   // sum of x over each group, blocks of 16
  int64_t stride, sums_stride;
};

// y[m, n] for rows m0 .. m0 + M: a group's share is scale * (dot - 136 sum x) + zero * sum x,
// one group per lane.
template <int M, bool LO>
static inline void int4_rows(const Int4Activations& xa, const uint8_t* __restrict packed, int64_t row_bytes,
                             int64_t K, int64_t G, void* y, int y_bf16, int64_t N, int64_t m0, int64_t n) {
  const int64_t groups = K / G, blocks = (groups + INT4_BLOCK_GROUPS - 1) / INT4_BLOCK_GROUPS;
  const __m512i bits = _mm512_set1_epi16(0x4300);
  const __m512 offset = _mm512_set1_ps(136.0f);
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  const uint8_t* base = packed + n * row_bytes;
  for (int64_t b = 0; b < blocks; ++b, base += 8 * G + 64) {
    const int64_t L = groups - b * INT4_BLOCK_GROUPS < INT4_BLOCK_GROUPS ? groups - b * INT4_BLOCK_GROUPS
                                                                          : INT4_BLOCK_GROUPS;
    const __mmask32 words = (__mmask32)((1ull << (2 * L)) - 1);
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
    const int64_t first = b * INT4_BLOCK_GROUPS * G;  // the block's activations
    if (INT4_PF) _mm_prefetch((const char*)(base + 8 * G + INT4_PF), INT4_PF_HINT);  // its scales and zeros
    for (int64_t c = 0; c < G / 8; ++c) {
      if (INT4_PF) _mm_prefetch((const char*)(base + c * 64 + INT4_PF), INT4_PF_HINT);
      const __m512i v = L == 16 ? _mm512_loadu_si512(base + c * 64) : _mm512_maskz_loadu_epi16(words, base + c * 4 * L);
      for (int j = 0; j < 4; ++j) {
        const __m512bh w = nibble_weights(v, 4 * j, bits);
        const int64_t at = first + (4 * c + j) * 32;
        for (int m = 0; m < M; ++m) {
          acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)_mm512_loadu_si512(xa.hi + (m0 + m) * xa.stride + at), w);
          if (LO)
            acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)_mm512_loadu_si512(xa.lo + (m0 + m) * xa.stride + at), w);
        }
      }
    }
    const uint8_t* pairs = base + (G / 8) * 4 * L;
    const __mmask16 lanes = (__mmask16)((1u << L) - 1);
    const __m256i s16 = L == 16 ? _mm256_loadu_si256((const __m256i*)pairs) : _mm256_maskz_loadu_epi16(lanes, pairs);
    const __m256i z16 =
        L == 16 ? _mm256_loadu_si256((const __m256i*)(pairs + 32)) : _mm256_maskz_loadu_epi16(lanes, pairs + 2 * L);
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(s16), 16));
    const __m512 zero = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(z16), 16));
    for (int m = 0; m < M; ++m) {
      const __m512 sums = _mm512_loadu_ps(xa.sums + (m0 + m) * xa.sums_stride + b * INT4_BLOCK_GROUPS);
      const __m512 dots = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
      total[m] = _mm512_fmadd_ps(_mm512_fnmadd_ps(sums, offset, dots), scale, total[m]);
      total[m] = _mm512_fmadd_ps(sums, zero, total[m]);
    }
  }
  for (int m = 0; m < M; ++m) store_output(y, y_bf16, (m0 + m) * N + n, _mm512_reduce_add_ps(total[m]));
}

template <bool LO>
static void int4_gemv(const Int4Activations& xa, const FusedWeights& fw, void* y, int y_bf16, int64_t M, int64_t K,
                      int64_t G, int threads) {
  const int64_t row_bytes = int4_row_bytes(K, G);
  for_each_row(fw, threads, [&](int i, int64_t n) {
    in_passes<PASS>(M, [&](auto rows, int64_t m0) {
      int4_rows<decltype(rows)::value, LO>(xa, (const uint8_t*)fw.w[i], row_bytes, K, G,
                                           (char*)y + fw.offset[i] * (y_bf16 ? 2 : 4), y_bf16, fw.total, m0, n);
    });
  });
}

// y[M, N0 + N1 + ...] = x[M, K] @ [W0; W1; ...]^T in x's dtype (bf16 when x_bf16, else fp32) for
// the int4 weights of `table` (common.h), rows packed as common.h describes (groups of G inputs).
// Returns STATUS_OK, STATUS_UNSUPPORTED for M outside 1..8 or G not 32, 64 or 128,
// STATUS_BAD_SIZES (also for K not a multiple of G) or STATUS_NO_MEMORY.
extern "C" int codellama_gemv_int4_fused(const void* x, int64_t x_len, int x_bf16, const int64_t* table,
                                         int64_t count, void* y, int64_t y_len, int64_t M, int64_t K, int64_t G,
                                         int threads) {
  int status = check_int4_groups(K, G);
  if (status != STATUS_OK) return status;
  FusedWeights fw;
  status = read_fused(table, count, 0, x_len, y_len, M, K, int4_row_bytes(K, G), &fw);
  if (status != STATUS_OK) return status;
  const int64_t groups = K / G, blocks = (groups + INT4_BLOCK_GROUPS - 1) / INT4_BLOCK_GROUPS;
  Int4Activations xa;
  xa.stride = blocks * INT4_BLOCK_GROUPS * G;
  xa.sums_stride = blocks * INT4_BLOCK_GROUPS;
  xa.hi = (uint16_t*)calloc(M * xa.stride, sizeof(uint16_t));
  xa.lo = x_bf16 ? NULL : (uint16_t*)calloc(M * xa.stride, sizeof(uint16_t));
  xa.sums = (float*)malloc(sizeof(float) * M * xa.sums_stride);
  float* row = (float*)malloc(sizeof(float) * K);
  if (!xa.hi || (!x_bf16 && !xa.lo) || !xa.sums || !row) {
    free(xa.hi), free(xa.lo), free(xa.sums), free(row);
    return STATUS_NO_MEMORY;
  }
  for (int64_t m = 0; m < M; ++m) {
    activations_row(x, x_bf16, m, K, row);
    if (x_bf16) {  // the pairs of inputs (2p, 2p + 1) of each group move as one 32-bit word
      const uint32_t* pairs = (const uint32_t*)((const uint16_t*)x + m * K);
      uint32_t* out = (uint32_t*)(xa.hi + m * xa.stride);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t b = g / INT4_BLOCK_GROUPS, l = g % INT4_BLOCK_GROUPS;
        for (int64_t p = 0; p < G / 2; ++p) out[b * INT4_BLOCK_GROUPS * G / 2 + p * 16 + l] = pairs[g * G / 2 + p];
      }
      group_sums(row, K, G, xa.sums + m * xa.sums_stride);
      continue;
    }
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b = g / INT4_BLOCK_GROUPS, l = g % INT4_BLOCK_GROUPS;
      for (int64_t t = 0; t < G; ++t) {
        const int64_t at = m * xa.stride + b * INT4_BLOCK_GROUPS * G + (t / 2) * 32 + 2 * l + (t & 1);
        float* value = row + g * G + t;
        xa.hi[at] = to_bf16(*value);
        xa.lo[at] = to_bf16(*value - bf16_to_float(xa.hi[at]));
        // The sums must be of the two parts the codes meet: the 136 * sum x taken off cancels
        // most of the dot product, and would leave 136 times their difference.
        *value = bf16_to_float(xa.hi[at]) + bf16_to_float(xa.lo[at]);
      }
    }
    group_sums(row, K, G, xa.sums + m * xa.sums_stride);
  }
  if (x_bf16) int4_gemv<false>(xa, fw, y, x_bf16, M, K, G, threads);
  else int4_gemv<true>(xa, fw, y, x_bf16, M, K, G, threads);
  free(xa.hi), free(xa.lo), free(xa.sums), free(row);
  return STATUS_OK;
}

// The int4 weight [N, K] of rows packed for int4 GEMV, dequantized into out (bf16 when out_bf16,
// else fp32; out_len elements): see dequantize_int4 in common.h.
extern "C" int codellama_dequantize_int4(const uint8_t* packed, int64_t packed_len, void* out, int64_t out_len,
                                         int out_bf16, int64_t N, int64_t K, int64_t G, int threads) {
  return dequantize_int4(packed, packed_len, out, out_len, out_bf16, N, K, G, threads);
}

// RMSNorm of bf16 rows, bit for bit the torch formula: see rms_norm_bf16 in common.h.
extern "C" int codellama_rms_norm_bf16(const uint16_t* x, int64_t x_len, const uint16_t* weight, int64_t weight_len,
                                       uint16_t* out, int64_t out_len, float* normed, int64_t normed_len, int64_t M,
                                       int64_t n, float eps, int lanes, int threads) {
  return rms_norm_bf16(x, x_len, weight, weight_len, out, out_len, normed, normed_len, M, n, eps, lanes, threads);
}

#include "decode_layer.h"
