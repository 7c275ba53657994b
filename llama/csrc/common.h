// Shared by every instruction-set variant of the kernels: scalar bf16 rounding, argument checks
// and the status codes the Python side turns into exceptions.
#pragma once

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum {
  STATUS_OK = 0,
  STATUS_UNSUPPORTED = 1,  // a shape the kernel is not built for
  STATUS_NO_MEMORY = 2,    // scratch space could not be allocated
  STATUS_BAD_SIZES = 3,    // the sizes or lengths do not fit the buffers passed
};

// Rows of activations the matrix-vector kernels handle in one call.
#define MAX_GEMV_ROWS 8

// Round-to-nearest-even fp32 -> bf16, as torch does (NaN stays NaN).
static inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// a * b (all non-negative) if it does not overflow, else -1: sizes are checked against the
// buffers before anything is read.
static inline int64_t checked_mul(int64_t a, int64_t b) {
  int64_t r;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) return -1;
  return r;
}
static inline int64_t checked_add(int64_t a, int64_t b) {
  int64_t r;
  if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &r)) return -1;
  return r;
}

// Whether `count` elements starting at a buffer of `available` elements stay inside it.
static inline int fits(int64_t count, int64_t available) { return count >= 0 && count <= available; }

// Elements a [rows, kv_heads, max_len, D] cache view spans from its first element, with the
// given row and head strides (positions of one head contiguous); -1 on overflow.
static inline int64_t cache_extent(int64_t rows, int64_t kv_heads, int64_t max_len, int64_t D,
                                   int64_t row_stride, int64_t head_stride) {
  if (rows <= 0 || kv_heads <= 0) return 0;
  return checked_add(checked_add(checked_mul(rows - 1, row_stride), checked_mul(kv_heads - 1, head_stride)),
                     checked_mul(max_len, D));
}

// Checks shared by the decode-attention entry points of every variant; STATUS_OK when the call
// only reads and writes inside its buffers.
// `rows` (may be NULL: batch row b reads cache row b) gives the cache row each batch row reads, in
// place, out of `cache_rows` rows.
static inline int check_decode_attention(int64_t q_len, int64_t kv_len, int64_t out_len, const int64_t* lens,
                                         int64_t lens_len, const int64_t* rows, int64_t rows_len,
                                         int64_t cache_rows, int64_t B, int64_t H, int64_t KVH, int64_t D,
                                         int64_t max_len, int64_t row_stride, int64_t head_stride) {
  if ((D != 64 && D != 128) || KVH <= 0 || H <= 0 || H % KVH != 0) return STATUS_UNSUPPORTED;
  if (B < 0 || lens_len < B || max_len < 1 || row_stride < 0 || head_stride < 0) return STATUS_BAD_SIZES;
  if (rows ? rows_len < B : cache_rows < B) return STATUS_BAD_SIZES;
  const int64_t qn = checked_mul(checked_mul(B, H), D);
  if (qn < 0 || !fits(qn, q_len) || !fits(qn, out_len)) return STATUS_BAD_SIZES;
  const int64_t extent = cache_extent(cache_rows, KVH, max_len, D, row_stride, head_stride);
  if (extent < 0 || !fits(extent, kv_len)) return STATUS_BAD_SIZES;
  for (int64_t b = 0; b < B; ++b) {
    if (lens[b] < 1 || lens[b] > max_len) return STATUS_BAD_SIZES;
    if (rows && (rows[b] < 0 || rows[b] >= cache_rows)) return STATUS_BAD_SIZES;
  }
  return STATUS_OK;
}

static inline int check_prefill_attention(int64_t q_len, int64_t kv_len, int64_t out_len, int64_t start,
                                          int64_t len, int64_t H, int64_t KVH, int64_t D, int64_t max_len,
                                          int64_t head_stride) {
  if ((D != 64 && D != 128) || KVH <= 0 || H <= 0 || H % KVH != 0) return STATUS_UNSUPPORTED;
  if (start < 0 || len < 0 || head_stride < 0 || checked_add(start, len) > max_len) return STATUS_BAD_SIZES;
  const int64_t qn = checked_mul(checked_mul(len, H), D);
  if (qn < 0 || !fits(qn, q_len) || !fits(qn, out_len)) return STATUS_BAD_SIZES;
  const int64_t extent = cache_extent(1, KVH, max_len, D, 0, head_stride);
  if (extent < 0 || !fits(extent, kv_len)) return STATUS_BAD_SIZES;
  return STATUS_OK;
}

static inline int check_gemv(int64_t x_len, int64_t w_len, int64_t y_len, int64_t M, int64_t N, int64_t K) {
  if (M < 1 || M > MAX_GEMV_ROWS) return STATUS_UNSUPPORTED;
  if (N < 0 || K < 1) return STATUS_BAD_SIZES;
  const int64_t xn = checked_mul(M, K), wn = checked_mul(N, K), yn = checked_mul(M, N);
  if (xn < 0 || wn < 0 || yn < 0 || !fits(xn, x_len) || !fits(wn, w_len) || !fits(yn, y_len))
    return STATUS_BAD_SIZES;
  return STATUS_OK;
}

static inline int check_rotary(int64_t x_len, int64_t angle_len, int64_t out_len, int64_t tokens,
                               int64_t heads, int64_t D) {
  if (D % 32 != 0 || D <= 0 || D > 256) return STATUS_UNSUPPORTED;
  if (tokens < 0 || heads < 0) return STATUS_BAD_SIZES;
  const int64_t xn = checked_mul(checked_mul(tokens, heads), D), an = checked_mul(tokens, D / 2);
  if (xn < 0 || an < 0 || !fits(xn, x_len) || !fits(xn, out_len) || !fits(an, angle_len))
    return STATUS_BAD_SIZES;
  return STATUS_OK;
}

