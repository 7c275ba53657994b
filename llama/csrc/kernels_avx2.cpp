// The CPU kernels for x86-64 with AVX2 and FMA only (Intel Haswell and later, AMD Zen 1-3), the
// same entry points as kernels_avx512bf16.cpp. Built by llama/kernels.py with -mavx2 -mfma.
//
// Without a bf16 dot-product instruction, bf16 values become fp32 with integer shifts (bf16 is
// the top half of an fp32, so this is exact) and are multiplied with fused multiply-adds, fp32
// accumulation. A 256-bit load of 16 bf16 values holds one pair per 32-bit lane: shifting each
// lane left by 16 gives the even elements as fp32, masking off its low half the odd ones, so
// the activations are laid out once per call in the same even/odd order ("split" layout) and
// the weights need no shuffles.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

// 8 bf16 values widened to fp32, in order.
static inline __m256 bf16x8_to_ps(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// The even (0, 2, .., 14) and odd (1, 3, .., 15) elements of 16 bf16 values, as fp32.
static inline void bf16x16_split(const uint16_t* p, __m256* even, __m256* odd) {
  const __m256i pairs = _mm256_loadu_si256((const __m256i*)p);
  *even = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
  *odd = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32((int)0xffff0000u)));
}

// n bf16 values (n a multiple of 16) -> fp32 in the split layout: each block of 16 becomes its 8
// even elements, then its 8 odd ones.
static void to_split_fp32(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t k = 0; k < n; k += 16) {
    __m256 even, odd;
    bf16x16_split(src + k, &even, &odd);
    _mm256_storeu_ps(dst + k, even);
    _mm256_storeu_ps(dst + k + 8, odd);
  }
}

// fp32 -> bf16 for 8 values, rounding to nearest even like to_bf16 (NaN stays NaN).
static inline void store_bf16x8(uint16_t* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
  // Every lane is below 2^16: packing with unsigned saturation keeps it; the packs work per
  // 128-bit half, so the halves' results are brought together.
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);
  const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08);
  _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(ordered));
}

// The sum of the 8 lanes, always in the same order.
static inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------------------------------------
// Matrix-vector product
// ---------------------------------------------------------------------------------------------

// y[m, n .. n+R) = x[m, :] . w[n .. n+R, :] for all M rows; xs holds x in the split layout, Kp
// (K rounded up to 16) floats per row, zero past K. Every output is one accumulator of 8 lanes
// fed 16 weights at a time (even elements, then odd), then summed by sum8: the same operations
// in the same order whatever M and R are. R weight rows at once give the fused multiply-adds
// enough independent chains when M is small.
template <int M, int R>
static inline void rows_block(const float* __restrict xs, int64_t Kp, const uint16_t* __restrict w, int64_t K,
                              uint16_t* __restrict y, int64_t N, int64_t n) {
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const uint16_t* wr = w + n * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 we[R], wo[R];
    for (int r = 0; r < R; ++r) bf16x16_split(wr + r * K + k, &we[r], &wo[r]);
    for (int m = 0; m < M; ++m) {
      const __m256 xe = _mm256_loadu_ps(xs + m * Kp + k), xo = _mm256_loadu_ps(xs + m * Kp + k + 8);
      for (int r = 0; r < R; ++r) {
        acc[m][r] = _mm256_fmadd_ps(xe, we[r], acc[m][r]);
        acc[m][r] = _mm256_fmadd_ps(xo, wo[r], acc[m][r]);
      }
    }
  }
  if (k < K) {  // the last K % 16 weights, copied so nothing past the row is read
    __m256 we[R], wo[R];
    for (int r = 0; r < R; ++r) {
      uint16_t tail[16] = {0};
      memcpy(tail, wr + r * K + k, sizeof(uint16_t) * (K - k));
      bf16x16_split(tail, &we[r], &wo[r]);
    }
    for (int m = 0; m < M; ++m) {
      const __m256 xe = _mm256_loadu_ps(xs + m * Kp + k), xo = _mm256_loadu_ps(xs + m * Kp + k + 8);
      for (int r = 0; r < R; ++r) {
        acc[m][r] = _mm256_fmadd_ps(xe, we[r], acc[m][r]);
        acc[m][r] = _mm256_fmadd_ps(xo, wo[r], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n + r] = to_bf16(sum8(acc[m][r]));
}

template <int M, int R>
static void gemv(const float* xs, int64_t Kp, const FusedWeights& fw, int64_t K, uint16_t* y, int threads) {
  for_each_block<R>(
      fw, threads,
      [&](int i, int64_t n) {
        rows_block<M, R>(xs, Kp, (const uint16_t*)fw.w[i], K, y + fw.offset[i], fw.total, n);
      },
      [&](int i, int64_t n) {
        rows_block<M, 1>(xs, Kp, (const uint16_t*)fw.w[i], K, y + fw.offset[i], fw.total, n);
      });
}

// y[M, N0 + N1 + ...] = x[M, K] @ [w0; w1; ...]^T for the weights of `table` (common.h), all bf16
// and contiguous. Returns STATUS_OK, STATUS_UNSUPPORTED for M outside 1..8, STATUS_BAD_SIZES when
// the sizes do not fit the buffers, or STATUS_NO_MEMORY. Register budget (16 vectors): M * R
// accumulators, 2 R weight vectors and 2 for x.
extern "C" int codellama_gemv_bf16_fused(const uint16_t* x, int64_t x_len, const int64_t* table, int64_t count,
                                         uint16_t* y, int64_t y_len, int64_t M, int64_t K, int threads) {
  FusedWeights fw;
  const int status = read_fused(table, count, 0, x_len, y_len, M, K, K, &fw);
  if (status != STATUS_OK) return status;
  const int64_t Kp = (K + 15) / 16 * 16;
  float* xs = (float*)malloc(sizeof(float) * M * Kp);
  if (!xs) return STATUS_NO_MEMORY;
  uint16_t* padded = (uint16_t*)calloc(Kp, sizeof(uint16_t));
  if (!padded) {
    free(xs);
    return STATUS_NO_MEMORY;
  }
  for (int64_t m = 0; m < M; ++m) {
    memcpy(padded, x + m * K, sizeof(uint16_t) * K);
    to_split_fp32(padded, Kp, xs + m * Kp);
  }
  free(padded);
  switch (M) {
    case 1: gemv<1, 4>(xs, Kp, fw, K, y, threads); break;
    case 2: gemv<2, 2>(xs, Kp, fw, K, y, threads); break;
    case 3: gemv<3, 2>(xs, Kp, fw, K, y, threads); break;
    case 4: gemv<4, 2>(xs, Kp, fw, K, y, threads); break;
    case 5: gemv<5, 1>(xs, Kp, fw, K, y, threads); break;
    case 6: gemv<6, 1>(xs, Kp, fw, K, y, threads); break;
    case 7: gemv<7, 1>(xs, Kp, fw, K, y, threads); break;
    default: gemv<8, 1>(xs, Kp, fw, K, y, threads); break;
  }
  free(xs);
  return STATUS_OK;
}

// The same products on fp32 activations and weights: each output is one accumulator of 8 lanes
// fed 8 weights at a time (the last K % 8 by a masked load of the same shape), then summed by
// sum8, whatever M and R are. Register budget (16 vectors): M * R accumulators (M <= 4 per pass),
// R weight vectors, 1.
template <int M, int R>
static inline void rows_block_f32(const float* __restrict x, const float* __restrict w, int64_t K,
                                  float* __restrict y, int64_t N, int64_t n) {
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const float* wr = w + n * K;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(wr + r * K + k);
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {  // masked lanes are neither read nor counted (they load as zero)
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(K - k)), lanes);
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_maskload_ps(wr + r * K + k, mask);
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_maskload_ps(x + m * K + k, mask);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n + r] = sum8(acc[m][r]);
}

// More than 4 rows go in two passes over the same R weight rows (the second reads them from L1),
// so the accumulators and weight vectors fit the registers.
template <int M, int R>
static inline void rows_in_passes_f32(const float* x, const float* w, int64_t K, float* y, int64_t N, int64_t n) {
  if constexpr (M <= 4) {
    rows_block_f32<M, R>(x, w, K, y, N, n);
  } else {
    rows_block_f32<4, R>(x, w, K, y, N, n);
    rows_block_f32<M - 4, R>(x + 4 * K, w, K, y + 4 * N, N, n);
  }
}

template <int M, int R>
static void gemv_f32(const float* x, const FusedWeights& fw, float* y, int64_t K, int threads) {
  for_each_block<R>(
      fw, threads,
      [&](int i, int64_t n) { rows_in_passes_f32<M, R>(x, (const float*)fw.w[i], K, y + fw.offset[i], fw.total, n); },
      [&](int i, int64_t n) { rows_in_passes_f32<M, 1>(x, (const float*)fw.w[i], K, y + fw.offset[i], fw.total, n); });
}

// codellama_gemv_bf16_fused for fp32 activations, weights and outputs (the same table, statuses
// and row counts).
extern "C" int codellama_gemv_f32_fused(const float* x, int64_t x_len, const int64_t* table, int64_t count,
                                        float* y, int64_t y_len, int64_t M, int64_t K, int threads) {
  FusedWeights fw;
  const int status = read_fused(table, count, 0, x_len, y_len, M, K, K, &fw);
  if (status != STATUS_OK) return status;
  switch (M) {
    case 1: gemv_f32<1, 4>(x, fw, y, K, threads); break;
    case 2: gemv_f32<2, 4>(x, fw, y, K, threads); break;
    case 3: gemv_f32<3, 3>(x, fw, y, K, threads); break;
    case 4: gemv_f32<4, 3>(x, fw, y, K, threads); break;
    case 5: gemv_f32<5, 3>(x, fw, y, K, threads); break;
    case 6: gemv_f32<6, 3>(x, fw, y, K, threads); break;
    case 7: gemv_f32<7, 3>(x, fw, y, K, threads); break;
    default: gemv_f32<8, 3>(x, fw, y, K, threads); break;
  }
  return STATUS_OK;
}

// ---------------------------------------------------------------------------------------------
// Attention (decode and prefill): tiled_attention.h on 8 fp32 lanes
// ---------------------------------------------------------------------------------------------

// e^x for the softmax (x <= 0 after subtracting the row maximum): 2^n * 2^f with |f| <= 1/2,
// 2^f by its degree-6 Taylor polynomial (relative error below 2e-7), 2^n built in the exponent
// bits (n >= -126 after the clamp, so a normal number).
static inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// The vector operations of tiled_attention.h on 8 fp32 lanes.
struct Avx2Ops {
  using vec = __m256;
  static constexpr int W = 8;
  static constexpr int kRowBlock = 4;  // rows sharing each key or value load in the tiles
  static constexpr bool kBf16Dot = false;
  static inline vec zero() { return _mm256_setzero_ps(); }
  static inline vec set1(float x) { return _mm256_set1_ps(x); }
  static inline vec load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static inline vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static inline vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static inline vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
  static inline float hmax(vec v) { return max8(v); }
  static inline float hsum(vec v) { return sum8(v); }
  static inline vec exp(vec v) { return exp_ps(v); }
  static inline vec iota() { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }
  static inline vec below(vec index, vec bound, vec v, vec fill) {
    return _mm256_blendv_ps(fill, v, _mm256_cmp_ps(index, bound, _CMP_LT_OQ));
  }
  static inline vec load_bf16(const uint16_t* p) { return bf16x8_to_ps(p); }
  static inline vec load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  }
  static inline void store_bf16(uint16_t* p, vec v) { store_bf16x8(p, v); }
};

#include "tiled_attention.h"

// out[b, h] = softmax(q[b, h] . K[r, h / rep, :lens[b]] * scale) V[r, h / rep, :lens[b]] for one new
// token per batch row b, r its cache row, over a dense or paged cache (tiled_attention.h); the
// layout, checks and status codes are those of the AVX512-BF16 variant.
extern "C" int codellama_decode_attention_bf16(DECODE_ATTENTION_ARGS(uint16_t)) {
  return tiled::decode_entry<Avx2Ops, uint16_t>(DECODE_ATTENTION_CALL);
}
// The same on fp32 queries, cache and output.
extern "C" int codellama_decode_attention_f32(DECODE_ATTENTION_ARGS(float)) {
  return tiled::decode_entry<Avx2Ops, float>(DECODE_ATTENTION_CALL);
}

// codellama_decode_attention_bf16 over an int8 cache read in place: codes and fp32 scales (one per
// position and kv head, value = code * scale) laid out as in the AVX512-BF16 variant, bf16 queries
// and output; head sizes 32, 64, 128.
extern "C" int codellama_decode_attention_int8(DECODE_ATTENTION_INT8_ARGS) {
  return tiled::decode_int8_entry<Avx2Ops>(DECODE_ATTENTION_INT8_CALL);
}

// Causal attention of a prompt chunk of one cache row (tiled_attention.h); the layout, checks and
// status codes are those of the AVX512-BF16 variant.
extern "C" int codellama_prefill_attention_bf16(PREFILL_ATTENTION_ARGS(uint16_t)) {
  return tiled::prefill_entry<Avx2Ops, uint16_t>(PREFILL_ATTENTION_CALL);
}
// The same on fp32 queries, cache and output.
extern "C" int codellama_prefill_attention_f32(PREFILL_ATTENTION_ARGS(float)) {
  return tiled::prefill_entry<Avx2Ops, float>(PREFILL_ATTENTION_CALL);
}

// codellama_prefill_attention_bf16 over an int8 cache read in place (codes and scales laid out as in
// the AVX512-BF16 variant); head sizes 32, 64, 128.
extern "C" int codellama_prefill_attention_int8(PREFILL_ATTENTION_INT8_ARGS) {
  return tiled::prefill_int8_entry<Avx2Ops>(PREFILL_ATTENTION_INT8_CALL);
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding
// ---------------------------------------------------------------------------------------------

// Rotary embedding of adjacent pairs, bit-identical to the torch operations (products and sums
// rounded to fp32 separately, no fused multiply-add); as in the AVX512-BF16 variant.
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
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 v = bf16x8_to_ps(xh + d);
        const __m256 swapped = _mm256_permute_ps(v, 0xB1);  // (b, a) in every pair
        const __m256 straight = _mm256_mul_ps(v, _mm256_loadu_ps(c2 + d));
        store_bf16x8(oh + d, _mm256_add_ps(straight, _mm256_mul_ps(swapped, _mm256_loadu_ps(s2 + d))));
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
// of rows, so a row's result never depends on its batch. One weight row is streamed at a time (a
// single sequential read per thread, prefetched ahead: several streams per thread, or none
// prefetched, read the weights at half the speed on AMD CPUs); with 16 vector registers, more
// than `PASS` rows of activations are taken in passes over the same weight row, which the later
// passes read from the caches. Codes are widened to fp32 exactly, fp32 products and sums.

#define PASS 2
// Bytes ahead of the weight streams prefetched. The int8 kernel's fp32 activations (4 K bytes)
// must stay in L1, so its stream is prefetched into L2 only (1.15x on a Zen 4 running these
// kernels); the int4 stream is fastest prefetched into L1.
#define INT8_PF 16384
#define INT8_PF_HINT _MM_HINT_T1
#define INT4_PF 8192
#define INT4_PF_HINT _MM_HINT_T0

// int8: y[m, n] = scale[n] * x[m, :] . q[n, :] for rows m0 .. m0 + M of fp32 activations xf
// [rows, Kp] (Kp = K rounded up to 32, zero past K); four accumulators per output, 8 codes each.
template <int M>
static inline void int8_rows(const float* __restrict xf, int64_t Kp, const int8_t* __restrict q, int64_t K,
                             const uint16_t* __restrict scales, void* y, int y_bf16, int64_t N, int64_t m0,
                             int64_t n) {
  __m256 acc[M][4];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm256_setzero_ps();
  const int8_t* qr = q + n * K;
  for (int64_t k = 0; k < Kp; k += 32) {
    int8_t tail[32];
    const int8_t* src = qr + k;
    if (k + 32 > K) {  // the last K % 32 codes, copied so nothing past the row is read
      memset(tail, 0, 32);
      memcpy(tail, src, K - k);
      src = tail;
    } else {
      _mm_prefetch((const char*)(src + INT8_PF), INT8_PF_HINT);
    }
    for (int u = 0; u < 4; ++u) {
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(src + 8 * u))));
      for (int m = 0; m < M; ++m)
        acc[m][u] = _mm256_fmadd_ps(_mm256_loadu_ps(xf + (m0 + m) * Kp + k + 8 * u), w, acc[m][u]);
    }
  }
  for (int m = 0; m < M; ++m) {
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]));
    store_output(y, y_bf16, (m0 + m) * N + n, bf16_to_float(scales[n]) * sum8(sum));
  }
}

// y[M, N0 + N1 + ...] = x[M, K] @ [W0; W1; ...]^T in x's dtype (bf16 when x_bf16, else fp32) for
// the int8 weights of `table` (common.h): codes [N, K] as stored, one bf16 scale per row.
// Returns STATUS_OK, STATUS_UNSUPPORTED for M outside 1..8, STATUS_BAD_SIZES or STATUS_NO_MEMORY.
extern "C" int codellama_gemv_int8_fused(const void* x, int64_t x_len, int x_bf16, const int64_t* table,
                                         int64_t count, void* y, int64_t y_len, int64_t M, int64_t K,
                                         int threads) {
  FusedWeights fw;
  const int status = read_fused(table, count, 1, x_len, y_len, M, K, K, &fw);
  if (status != STATUS_OK) return status;
  const int64_t Kp = (K + 31) / 32 * 32;
  float* xf = (float*)calloc(M * Kp, sizeof(float));
  if (!xf) return STATUS_NO_MEMORY;
  for (int64_t m = 0; m < M; ++m) activations_row(x, x_bf16, m, K, xf + m * Kp);
  for_each_row(fw, threads, [&](int i, int64_t n) {
    in_passes<PASS>(M, [&](auto rows, int64_t m0) {
      int8_rows<decltype(rows)::value>(xf, Kp, (const int8_t*)fw.w[i], K, fw.scales[i],
                                       (char*)y + fw.offset[i] * (x_bf16 ? 2 : 4), x_bf16, fw.total, m0, n);
    });
  });
  free(xf);
  return STATUS_OK;
}

// int4: the activations regrouped to match a block's chunks, in fp32. A chunk's 16 dwords hold
// one group each (dword l: group l of the block), and nibble i of a dword (bits 4 i .. 4 i + 3)
// is input 2 (4 c + i % 4) + i / 4 of that group. Nibble i is multiplied in place, masked but not
// shifted (its value times 2^(4 i) becomes an fp32 exactly), so the activation that meets it is
// scaled by 2^(-4 i); the top nibble is shifted down instead (as a signed integer it would be
// negative). For block b, chunk c and nibble i, 16 floats: the activations of the block's groups
// (zero past the last group).
static inline int64_t int4_x_index(int64_t b, int64_t G, int64_t c, int i) {
  return ((b * (G / 8) + c) * 8 + i) * INT4_BLOCK_GROUPS;
}

// y[m, n] for rows m0 .. m0 + M: a group's share is scale * (dot - 8 sum x) + zero * sum x, one
// group per lane (two vectors of 8 groups), two accumulators per vector (even and odd nibbles).
template <int M>
static inline void int4_rows(const float* __restrict xs, int64_t stride, const float* __restrict sums,
                             int64_t sums_stride, const uint8_t* __restrict packed, int64_t row_bytes, int64_t K,
                             int64_t G, void* y, int y_bf16, int64_t N, int64_t m0, int64_t n) {
  const int64_t groups = K / G, blocks = (groups + INT4_BLOCK_GROUPS - 1) / INT4_BLOCK_GROUPS;
  __m256 total[M][2];
  for (int m = 0; m < M; ++m) total[m][0] = total[m][1] = _mm256_setzero_ps();
  const uint8_t* base = packed + n * row_bytes;
  for (int64_t b = 0; b < blocks; ++b, base += 8 * G + 64) {
    const int64_t L = groups - b * INT4_BLOCK_GROUPS < INT4_BLOCK_GROUPS ? groups - b * INT4_BLOCK_GROUPS
                                                                          : INT4_BLOCK_GROUPS;
    __m256i lanes[2];  // dwords of a chunk that exist (the last block of a row may hold fewer)
    for (int h = 0; h < 2; ++h)
      lanes[h] = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(L - 8 * h)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 acc[M][2][2];
    for (int m = 0; m < M; ++m)
      for (int h = 0; h < 2; ++h) acc[m][h][0] = acc[m][h][1] = _mm256_setzero_ps();
    for (int64_t c = 0; c < G / 8; ++c) {
      __m256i v[2];
      for (int h = 0; h < 2; ++h) {
        const int* at = (const int*)(base + c * 4 * L + 32 * h);
        v[h] = L == 16 ? _mm256_loadu_si256((const __m256i*)at) : _mm256_maskload_epi32(at, lanes[h]);
      }
      if (L == 16) _mm_prefetch((const char*)(base + c * 64 + INT4_PF), INT4_PF_HINT);
      for (int i = 0; i < 8; ++i) {
        const float* xi = xs + m0 * stride + int4_x_index(b, G, c, i);
        for (int h = 0; h < 2; ++h) {
          const __m256 w = _mm256_cvtepi32_ps(
              i < 7 ? _mm256_and_si256(v[h], _mm256_set1_epi32(0xF << (4 * i))) : _mm256_srli_epi32(v[h], 28));
          for (int m = 0; m < M; ++m)
            acc[m][h][i & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(xi + m * stride + 8 * h), w, acc[m][h][i & 1]);
        }
      }
    }
    uint16_t pairs[2 * INT4_BLOCK_GROUPS] = {0};  // scales, then zeros, zero past the last group
    const uint8_t* stored = base + (G / 8) * 4 * L;
    memcpy(pairs, stored, 2 * L);
    memcpy(pairs + INT4_BLOCK_GROUPS, stored + 2 * L, 2 * L);
    for (int h = 0; h < 2; ++h) {
      const __m256 scale = bf16x8_to_ps(pairs + 8 * h), zero = bf16x8_to_ps(pairs + INT4_BLOCK_GROUPS + 8 * h);
      for (int m = 0; m < M; ++m) {
        const __m256 s = _mm256_loadu_ps(sums + (m0 + m) * sums_stride + b * INT4_BLOCK_GROUPS + 8 * h);
        const __m256 dot = _mm256_fnmadd_ps(s, _mm256_set1_ps(8.0f), _mm256_add_ps(acc[m][h][0], acc[m][h][1]));
        total[m][h] = _mm256_fmadd_ps(dot, scale, total[m][h]);
        total[m][h] = _mm256_fmadd_ps(s, zero, total[m][h]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    store_output(y, y_bf16, (m0 + m) * N + n, sum8(_mm256_add_ps(total[m][0], total[m][1])));
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
  const int64_t stride = blocks * INT4_BLOCK_GROUPS * G, sums_stride = blocks * INT4_BLOCK_GROUPS;
  float* xs = (float*)calloc(M * stride, sizeof(float));
  float* sums = (float*)malloc(sizeof(float) * M * sums_stride);
  float* row = (float*)malloc(sizeof(float) * K);
  if (!xs || !sums || !row) {
    free(xs), free(sums), free(row);
    return STATUS_NO_MEMORY;
  }
  float factor[8];  // 2^(-4 i) for the nibbles multiplied in place, 1 for the top one
  for (int i = 0; i < 8; ++i) factor[i] = i < 7 ? ldexpf(1.0f, -4 * i) : 1.0f;
  for (int64_t m = 0; m < M; ++m) {
    activations_row(x, x_bf16, m, K, row);
    group_sums(row, K, G, sums + m * sums_stride);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b = g / INT4_BLOCK_GROUPS, l = g % INT4_BLOCK_GROUPS;
      for (int64_t t = 0; t < G; ++t) {
        const int64_t step = t / 2, c = step / 4;
        const int i = (int)(step % 4 + 4 * (t & 1));
        xs[m * stride + int4_x_index(b, G, c, i) + l] = row[g * G + t] * factor[i];
      }
    }
  }
  const int64_t row_bytes = int4_row_bytes(K, G);
  for_each_row(fw, threads, [&](int i, int64_t n) {
    in_passes<PASS>(M, [&](auto rows, int64_t m0) {
      int4_rows<decltype(rows)::value>(xs, stride, sums, sums_stride, (const uint8_t*)fw.w[i], row_bytes, K, G,
                                       (char*)y + fw.offset[i] * (x_bf16 ? 2 : 4), x_bf16, fw.total, m0, n);
    });
  });
  free(xs), free(sums), free(row);
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
