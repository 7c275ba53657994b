// Shared by every instruction-set variant of the kernels: scalar bf16 rounding, argument checks
// and the status codes the Python side turns into exceptions.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

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

// Positions per block of the attention tiles (tiled_attention.h's kKeyBlock): a paged cache's
// blocks hold a whole number of them.
#define ATTENTION_KEY_BLOCK 64

// Head sizes the attention kernels are instantiated for (kernels.ATTENTION_HEAD_DIMS).
static inline bool head_dim_supported(int64_t D) { return D == 32 || D == 64 || D == 128; }

// The attention caches: `blocks` blocks of `block_len` positions; element (g, s, d) of block i (kv
// head g, position s) sits at i * block_stride + g * head_stride + s * D + d, kv_len elements
// from k and from v (a dense cache: one block per cache row). A block table (may be NULL) maps
// the positions of a cache row to blocks: position s of row r is position s % block_len of block
// table[r * blocks_per_row + s / block_len]. The table entries a call reads (those of the
// positions it attends to) must name one of the blocks; block_len is then a multiple of
// ATTENTION_KEY_BLOCK.
static inline int check_table_row(const int64_t* entries, int64_t length, int64_t block_len, int64_t blocks) {
  for (int64_t i = 0; i * block_len < length; ++i)
    if (entries[i] < 0 || entries[i] >= blocks) return STATUS_BAD_SIZES;
  return STATUS_OK;
}

static inline int check_cache_blocks(int64_t kv_len, int64_t blocks, int64_t KVH, int64_t block_len, int64_t D,
                                     int64_t block_stride, int64_t head_stride) {
  if (blocks < 1 || block_len < 1 || block_stride < 0 || head_stride < 0) return STATUS_BAD_SIZES;
  const int64_t extent = cache_extent(blocks, KVH, block_len, D, block_stride, head_stride);
  return extent < 0 || !fits(extent, kv_len) ? STATUS_BAD_SIZES : STATUS_OK;
}

// Checks shared by the decode-attention entry points of every variant; STATUS_OK when the call
// only reads and writes inside its buffers.
// `rows` (may be NULL: batch row b reads cache row b) gives the cache row each batch row reads, in
// place: a block without a table (`blocks` rows), a row of the table with one.
static inline int check_decode_attention(int64_t q_len, int64_t kv_len, int64_t out_len, const int64_t* lens,
                                         int64_t lens_len, const int64_t* rows, int64_t rows_len,
                                         const int64_t* table, int64_t table_len, int64_t blocks_per_row,
                                         int64_t blocks, int64_t B, int64_t H, int64_t KVH, int64_t D,
                                         int64_t block_len, int64_t block_stride, int64_t head_stride) {
  if (!head_dim_supported(D) || KVH <= 0 || H <= 0 || H % KVH != 0) return STATUS_UNSUPPORTED;
  if (B < 0 || lens_len < B) return STATUS_BAD_SIZES;
  if (check_cache_blocks(kv_len, blocks, KVH, block_len, D, block_stride, head_stride) != STATUS_OK)
    return STATUS_BAD_SIZES;
  if (table && (blocks_per_row < 1 || table_len < 0 || block_len % ATTENTION_KEY_BLOCK != 0))
    return STATUS_BAD_SIZES;
  const int64_t cache_rows = table ? table_len / blocks_per_row : blocks;
  const int64_t row_len = table ? checked_mul(blocks_per_row, block_len) : block_len;
  if (row_len < 0 || (rows ? rows_len < B : cache_rows < B)) return STATUS_BAD_SIZES;
  const int64_t qn = checked_mul(checked_mul(B, H), D);
  if (qn < 0 || !fits(qn, q_len) || !fits(qn, out_len)) return STATUS_BAD_SIZES;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = rows ? rows[b] : b;
    if (lens[b] < 1 || lens[b] > row_len || row < 0 || row >= cache_rows) return STATUS_BAD_SIZES;
    if (table && check_table_row(table + row * blocks_per_row, lens[b], block_len, blocks) != STATUS_OK)
      return STATUS_BAD_SIZES;
  }
  return STATUS_OK;
}

// The int8 cache: codes laid out as the bf16 cache and one fp32 scale per (block, kv head,
// position) at block * scale_block_stride + head * scale_head_stride + position (scales_len
// elements from each of the key and value scales).
static inline int check_decode_attention_int8(int64_t q_len, int64_t kv_len, int64_t scales_len, int64_t out_len,
                                              const int64_t* lens, int64_t lens_len, const int64_t* rows,
                                              int64_t rows_len, const int64_t* table, int64_t table_len,
                                              int64_t blocks_per_row, int64_t blocks, int64_t B, int64_t H,
                                              int64_t KVH, int64_t D, int64_t block_len, int64_t block_stride,
                                              int64_t head_stride, int64_t scale_block_stride,
                                              int64_t scale_head_stride) {
  const int status = check_decode_attention(q_len, kv_len, out_len, lens, lens_len, rows, rows_len, table, table_len,
                                            blocks_per_row, blocks, B, H, KVH, D, block_len, block_stride,
                                            head_stride);
  if (status != STATUS_OK) return status;
  return check_cache_blocks(scales_len, blocks, KVH, block_len, 1, scale_block_stride, scale_head_stride);
}

// Prefill of one cache row: without a table, k/v are the row (one block of max_len positions; blocks
// and block_stride unused); with one, k/v are the blocks (of max_len positions) and the row's
// positions are those of its table, table_len entries.
static inline int check_prefill_attention(int64_t q_len, int64_t kv_len, int64_t out_len, const int64_t* table,
                                          int64_t table_len, int64_t blocks, int64_t block_stride, int64_t start,
                                          int64_t len, int64_t H, int64_t KVH, int64_t D, int64_t max_len,
                                          int64_t head_stride) {
  if (!head_dim_supported(D) || KVH <= 0 || H <= 0 || H % KVH != 0) return STATUS_UNSUPPORTED;
  if (start < 0 || len < 0) return STATUS_BAD_SIZES;
  const int64_t qn = checked_mul(checked_mul(len, H), D);
  if (qn < 0 || !fits(qn, q_len) || !fits(qn, out_len)) return STATUS_BAD_SIZES;
  if (!table) {
    if (check_cache_blocks(kv_len, 1, KVH, max_len, D, 0, head_stride) != STATUS_OK) return STATUS_BAD_SIZES;
    return checked_add(start, len) > max_len ? STATUS_BAD_SIZES : STATUS_OK;
  }
  if (check_cache_blocks(kv_len, blocks, KVH, max_len, D, block_stride, head_stride) != STATUS_OK)
    return STATUS_BAD_SIZES;
  if (table_len < 1 || max_len % ATTENTION_KEY_BLOCK != 0) return STATUS_BAD_SIZES;
  const int64_t row_len = checked_mul(table_len, max_len);
  if (row_len < 0 || checked_add(start, len) > row_len) return STATUS_BAD_SIZES;
  return check_table_row(table, start + len, max_len, blocks);
}

// check_prefill_attention for an int8 cache: scales laid out as for the decode kernel (one block
// without a table: scale_block_stride unused).
static inline int check_prefill_attention_int8(int64_t q_len, int64_t kv_len, int64_t scales_len, int64_t out_len,
                                               const int64_t* table, int64_t table_len, int64_t blocks,
                                               int64_t block_stride, int64_t start, int64_t len, int64_t H,
                                               int64_t KVH, int64_t D, int64_t max_len, int64_t head_stride,
                                               int64_t scale_block_stride, int64_t scale_head_stride) {
  const int status = check_prefill_attention(q_len, kv_len, out_len, table, table_len, blocks, block_stride, start,
                                             len, H, KVH, D, max_len, head_stride);
  if (status != STATUS_OK) return status;
  if (!table) return check_cache_blocks(scales_len, 1, KVH, max_len, 1, 0, scale_head_stride);
  return check_cache_blocks(scales_len, blocks, KVH, max_len, 1, scale_block_stride, scale_head_stride);
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


// ---------------------------------------------------------------------------------------------
// Weight-only quantized matrix-vector products (int8 per output row, int4 in groups)
// ---------------------------------------------------------------------------------------------
//
// int8: codes [N, K] (int8, as stored) and one bf16 scale per output row.
//
// int4: the codes of one output row are packed for the kernels (llama/int4_pack.py) in
// "blocks" of 16 consecutive groups of G inputs (the last block of a row may hold fewer, L).
// A block holds G / 8 chunks of 4 L bytes, then L bf16 scales, then L bf16 zeros (8 G + 64 bytes
// for a whole block). Chunk c is L pairs of 16-bit words, one pair per group l of the block:
// word 2 l + e holds in its nibble j (bits 4 j .. 4 j + 3) the code of input 2 (4 c + j) + e of
// group l. Every row takes K / 2 + 4 K / G bytes. The weight of a code q is (q - 8) * scale +
// zero, so a group's share of a product is scale * (sum x q - 8 sum x) + zero * sum x.
#define INT4_BLOCK_GROUPS 16

static inline int64_t int4_row_bytes(int64_t K, int64_t G) { return K / 2 + 4 * (K / G); }

// ---------------------------------------------------------------------------------------------
// Several weights multiplied by the same activations in one call (one parallel region)
// ---------------------------------------------------------------------------------------------
//
// A matrix-vector entry point takes up to MAX_FUSED weights sharing the activations x [M, K]
// (e.g. the query, key and value projections of a layer) as a table of FUSED_FIELDS int64 per
// weight: its address, the elements its buffer holds, its output rows N, and (int8) the address
// of its N scales and the elements that buffer holds. The outputs lie side by side in y
// [M, N0 + N1 + ...]: weight i writes columns offset[i] .. offset[i] + N[i]. Every output is
// computed by the same function as with the weight alone, so fusing never changes a result.
#define MAX_FUSED 4
#define FUSED_FIELDS 5

struct FusedWeights {
  int64_t count, total;  // weights, and output columns of all of them
  const void* w[MAX_FUSED];
  const uint16_t* scales[MAX_FUSED];
  int64_t N[MAX_FUSED], offset[MAX_FUSED];
};

// Reads the `count` weights of `table` into `fw` after checking that x [M, K] fits x_len, each
// weight's N rows of `row_bytes` elements (and N scales when `with_scales`) fit its buffers, and y
// [M, total] fits y_len. STATUS_UNSUPPORTED for M outside 1..8 or count outside 1..MAX_FUSED.
static inline int read_fused(const int64_t* table, int64_t count, int with_scales, int64_t x_len, int64_t y_len,
                             int64_t M, int64_t K, int64_t row_bytes, FusedWeights* fw) {
  if (M < 1 || M > MAX_GEMV_ROWS || count < 1 || count > MAX_FUSED) return STATUS_UNSUPPORTED;
  if (K < 1 || row_bytes < 1) return STATUS_BAD_SIZES;
  fw->count = count;
  fw->total = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t* entry = table + i * FUSED_FIELDS;
    const int64_t N = entry[2], wn = checked_mul(N, row_bytes);
    if (N < 0 || wn < 0 || !fits(wn, entry[1]) || (N > 0 && entry[0] == 0)) return STATUS_BAD_SIZES;
    if (with_scales && (!fits(N, entry[4]) || (N > 0 && entry[3] == 0))) return STATUS_BAD_SIZES;
    fw->w[i] = (const void*)(intptr_t)entry[0];
    fw->scales[i] = with_scales ? (const uint16_t*)(intptr_t)entry[3] : NULL;
    fw->N[i] = N;
    fw->offset[i] = fw->total;
    fw->total = checked_add(fw->total, N);
    if (fw->total < 0) return STATUS_BAD_SIZES;
  }
  const int64_t xn = checked_mul(M, K), yn = checked_mul(M, fw->total);
  if (xn < 0 || yn < 0 || !fits(xn, x_len) || !fits(yn, y_len)) return STATUS_BAD_SIZES;
  return STATUS_OK;
}

// The table of one weight (no scales: `scales` NULL), for the single-weight entry points.
static inline void one_weight(int64_t* table, const void* w, int64_t w_len, int64_t N, const void* scales,
                              int64_t scales_len) {
  table[0] = (int64_t)(intptr_t)w;
  table[1] = w_len;
  table[2] = N;
  table[3] = (int64_t)(intptr_t)scales;
  table[4] = scales_len;
}

// The fused matrix-vector entry points each variant defines (y[M, N0 + N1 + ...] for the weights
// of `table`), and the single-weight entry points, the same in every variant: one call of the
// fused entry point with a table of one weight.
extern "C" int codellama_gemv_bf16_fused(const uint16_t* x, int64_t x_len, const int64_t* table, int64_t count,
                                         uint16_t* y, int64_t y_len, int64_t M, int64_t K, int threads);
extern "C" int codellama_gemv_f32_fused(const float* x, int64_t x_len, const int64_t* table, int64_t count,
                                        float* y, int64_t y_len, int64_t M, int64_t K, int threads);
extern "C" int codellama_gemv_int8_fused(const void* x, int64_t x_len, int x_bf16, const int64_t* table,
                                         int64_t count, void* y, int64_t y_len, int64_t M, int64_t K,
                                         int threads);
extern "C" int codellama_gemv_int4_fused(const void* x, int64_t x_len, int x_bf16, const int64_t* table,
                                         int64_t count, void* y, int64_t y_len, int64_t M, int64_t K, int64_t G,
                                         int threads);

// y[M, N] = x[M, K] @ w[N, K]^T, all bf16 and contiguous; x_len, w_len, y_len are the elements
// each buffer holds. The statuses of codellama_gemv_bf16_fused.
extern "C" int codellama_gemv_bf16(const uint16_t* x, int64_t x_len, const uint16_t* w, int64_t w_len,
                                   uint16_t* y, int64_t y_len, int64_t M, int64_t N, int64_t K, int threads) {
  int64_t table[FUSED_FIELDS];
  one_weight(table, w, w_len, N, NULL, 0);
  return codellama_gemv_bf16_fused(x, x_len, table, 1, y, y_len, M, K, threads);
}

// y[M, N] = x[M, K] @ w[N, K]^T, all fp32 and contiguous (the statuses of codellama_gemv_bf16_fused).
extern "C" int codellama_gemv_f32(const float* x, int64_t x_len, const float* w, int64_t w_len, float* y,
                                  int64_t y_len, int64_t M, int64_t N, int64_t K, int threads) {
  int64_t table[FUSED_FIELDS];
  one_weight(table, w, w_len, N, NULL, 0);
  return codellama_gemv_f32_fused(x, x_len, table, 1, y, y_len, M, K, threads);
}

// y[M, N] = (x[M, K] @ (q[N, K] * scales[N, None])^T) in x's dtype (bf16 when x_bf16, else
// fp32); q int8 as stored, scales bf16. Lengths are elements of each buffer. The statuses of
// codellama_gemv_int8_fused.
extern "C" int codellama_gemv_int8(const void* x, int64_t x_len, int x_bf16, const int8_t* q, int64_t q_len,
                                   const uint16_t* scales, int64_t scales_len, void* y, int64_t y_len, int64_t M,
                                   int64_t N, int64_t K, int threads) {
  int64_t table[FUSED_FIELDS];
  one_weight(table, q, q_len, N, scales, scales_len);
  return codellama_gemv_int8_fused(x, x_len, x_bf16, table, 1, y, y_len, M, K, threads);
}

// y[M, N] = x[M, K] @ W^T in x's dtype (bf16 when x_bf16, else fp32), W the int4 weight whose
// rows are packed as described above (groups of G inputs). The statuses of codellama_gemv_int4_fused.
extern "C" int codellama_gemv_int4(const void* x, int64_t x_len, int x_bf16, const uint8_t* packed,
                                   int64_t packed_len, void* y, int64_t y_len, int64_t M, int64_t N, int64_t K,
                                   int64_t G, int threads) {
  int64_t table[FUSED_FIELDS];
  one_weight(table, packed, packed_len, N, NULL, 0);
  return codellama_gemv_int4_fused(x, x_len, x_bf16, table, 1, y, y_len, M, K, G, threads);
}

// Every output row of every weight of `fw`, split over the threads in one parallel region:
// block(i, n) computes rows n .. n + R of weight i, single(i, n) row n alone (the N % R last
// rows of a weight). The units of all weights are handed out together (static schedule), so the
// threads share the work evenly whatever the weights' sizes.
template <int R, typename Block, typename Single>
static inline void for_each_block(const FusedWeights& fw, int threads, Block block, Single single) {
  int64_t first[MAX_FUSED + 1];  // the first unit of each weight
  first[0] = 0;
  for (int64_t i = 0; i < fw.count; ++i) first[i + 1] = first[i] + fw.N[i] / R + fw.N[i] % R;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t u = 0; u < first[fw.count]; ++u) {
    int i = 0;
    while (u >= first[i + 1]) ++i;
    const int64_t local = u - first[i], full = fw.N[i] / R;
    if (local < full) block(i, local * R);
    else single(i, full * R + (local - full));
  }
}

// Every output row of every weight of `fw`, one at a time: row(i, n).
template <typename Row>
static inline void for_each_row(const FusedWeights& fw, int threads, Row row) {
  for_each_block<1>(fw, threads, row, row);
}

// The rows m0 .. m0 + left (left < R) in one call of rows(integral_constant<left>, m0).
template <int R, typename Rows>
static inline void rest_of_rows(int64_t left, int64_t m0, Rows rows) {
  if constexpr (R > 0) {
    if (left == R) rows(std::integral_constant<int, R>(), m0);
    else rest_of_rows<R - 1>(left, m0, rows);
  }
}

// All M rows of activations for one weight row: passes of P rows, then the rest in one call.
template <int P, typename Rows>
static inline void in_passes(int64_t M, Rows rows) {
  int64_t m0 = 0;
  for (; m0 + P <= M; m0 += P) rows(std::integral_constant<int, P>(), m0);
  rest_of_rows<P - 1>(M - m0, m0, rows);
}

static inline int check_int4_groups(int64_t K, int64_t G) {
  if (G != 32 && G != 64 && G != 128) return STATUS_UNSUPPORTED;
  if (K < 1 || K % G != 0) return STATUS_BAD_SIZES;
  return STATUS_OK;
}

static inline float bf16_to_float(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// Row m of the activations as fp32 (bf16 widened exactly, or fp32 copied).
static inline void activations_row(const void* x, int x_bf16, int64_t m, int64_t K, float* out) {
  if (x_bf16) {
    const uint16_t* row = (const uint16_t*)x + m * K;
    for (int64_t k = 0; k < K; ++k) out[k] = bf16_to_float(row[k]);
  } else {
    memcpy(out, (const float*)x + m * K, sizeof(float) * K);
  }
}

// Sum of each group of G inputs (a multiple of 8) of an fp32 row, in blocks of 16 (zero past the
// last group): 8 interleaved partial sums (independent, so the compiler vectorizes them), added
// in a fixed order.
static inline void group_sums(const float* row, int64_t K, int64_t G, float* sums) {
  const int64_t groups = K / G, padded = (groups + INT4_BLOCK_GROUPS - 1) / INT4_BLOCK_GROUPS * INT4_BLOCK_GROUPS;
  for (int64_t g = 0; g < padded; ++g) {
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (g < groups)
      for (int64_t t = 0; t < G; t += 8)
        for (int j = 0; j < 8; ++j) part[j] += row[g * G + t + j];
    sums[g] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  }
}

// Store output (m, n) in the activations' dtype.
static inline void store_output(void* y, int y_bf16, int64_t index, float value) {
  if (y_bf16) ((uint16_t*)y)[index] = to_bf16(value);
  else ((float*)y)[index] = value;
}

// The weight [N, K] of int4 rows packed as above, as fp32 (w = (q - 8) * scale + zero, one
// rounding) or bf16 (that fp32 rounded once more): for calls with too many rows for the
// matrix-vector kernels, which multiply it with a matrix-matrix product. Rows are split over the
// threads; the compiler vectorizes the inner loop for the variant's instruction set.
static inline int dequantize_int4(const uint8_t* packed, int64_t packed_len, void* out, int64_t out_len,
                                  int out_bf16, int64_t N, int64_t K, int64_t G, int threads) {
  int status = check_int4_groups(K, G);
  if (status != STATUS_OK) return status;
  const int64_t row_bytes = int4_row_bytes(K, G), wn = checked_mul(N, row_bytes), on = checked_mul(N, K);
  if (N < 0 || wn < 0 || on < 0 || !fits(wn, packed_len) || !fits(on, out_len)) return STATUS_BAD_SIZES;
  const int64_t groups = K / G;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* block = packed + n * row_bytes;
    for (int64_t first = 0; first < groups; first += INT4_BLOCK_GROUPS) {
      const int64_t L = groups - first < INT4_BLOCK_GROUPS ? groups - first : INT4_BLOCK_GROUPS;
      const uint8_t* pairs = block + (G / 8) * 4 * L;
      for (int64_t l = 0; l < L; ++l) {
        uint16_t s16, z16;
        memcpy(&s16, pairs + 2 * l, 2);
        memcpy(&z16, pairs + 2 * L + 2 * l, 2);
        const float scale = bf16_to_float(s16), zero = bf16_to_float(z16);
        float value[16];  // the group's weight for each code
        uint16_t rounded[16];
        for (int q = 0; q < 16; ++q) {
          value[q] = (float)(q - 8) * scale + zero;
          rounded[q] = to_bf16(value[q]);
        }
        const int64_t at = n * K + (first + l) * G;
        for (int64_t c = 0; c < G / 8; ++c) {  // dword l of chunk c: inputs 8 c .. 8 c + 7 of the group
          uint32_t word;
          memcpy(&word, block + c * 4 * L + 4 * l, 4);
          for (int i = 0; i < 8; ++i) {  // input 8 c + i: nibble i / 2 of the low (even i) or high half
            const int code = (word >> (4 * (i >> 1) + 16 * (i & 1))) & 0xF;
            if (out_bf16) ((uint16_t*)out)[at + 8 * c + i] = rounded[code];
            else ((float*)out)[at + 8 * c + i] = value[code];
          }
        }
      }
      block += (G / 8) * 4 * L + 4 * L;
    }
  }
  return STATUS_OK;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm of bf16 rows, bit for bit the torch formula of llama/model.py
// ---------------------------------------------------------------------------------------------
//
// out = bf16(x * rsqrt(mean(x^2) + eps)) * weight, with x widened to fp32: squares, the mean's
// division, the sum with eps, 1 / sqrt and the products rounded to fp32 one by one, as torch's
// elementwise operations do, and the sum of squares added in the order of torch's CPU sum of a
// contiguous fp32 row (aten/src/ATen/native/cpu/SumKernel.cpp: vectorized_inner_sum, row_sum,
// multi_row_sum), whose order depends on the lanes of torch's fp32 vectors (8 for its AVX2 and
// default builds, 16 for AVX512).

static inline int64_t torch_ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  int64_t bits = 0;
  for (uint64_t v = (uint64_t)(x - 1); v; v >>= 1) ++bits;
  return bits;
}

// torch's sum of the squares of the bf16 row x[0, n) in fp32, with vectors of W lanes.
template <int W>
static inline float torch_sum_of_squares(const uint16_t* x, int64_t n) {
  const int64_t vectors = n / W, size = vectors / 4;  // multi_row_sum: rows of 4 vectors
  const int64_t level_power = torch_ceil_log2(size) / 4 > 4 ? torch_ceil_log2(size) / 4 : 4;
  const int64_t level_step = (int64_t)1 << level_power, level_mask = level_step - 1;
  float acc[4][4][W];  // [level][vector of the row][lane]
  for (int j = 0; j < 4; ++j)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < W; ++l) acc[j][k][l] = 0.0f;
  auto add_row = [&](int64_t i) {
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < W; ++l) {
        const float v = bf16_to_float(x[(i * 4 + k) * W + l]);
        acc[0][k][l] += v * v;
      }
  };
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_row(i);
    for (int j = 1; j < 4; ++j) {
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < W; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.0f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i) add_row(i);
  for (int j = 1; j < 4; ++j)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[j][k][l];
  for (int64_t v = size * 4; v < vectors; ++v)  // row_sum: the vectors past the rows of 4
    for (int l = 0; l < W; ++l) {
      const float f = bf16_to_float(x[v * W + l]);
      acc[0][0][l] += f * f;
    }
  for (int k = 1; k < 4; ++k)
    for (int l = 0; l < W; ++l) acc[0][0][l] += acc[0][k][l];
  float total = 0.0f;  // vectorized_inner_sum: the elements past the last vector, then the lanes
  for (int64_t t = vectors * W; t < n; ++t) {
    const float f = bf16_to_float(x[t]);
    total += f * f;
  }
  for (int l = 0; l < W; ++l) total += acc[0][0][l];
  return total;
}

// out[M, n] = RMSNorm of the bf16 rows x[M, n] with the bf16 weight[n] (see above); `normed`
// (NULL, or normed_len floats) receives x * rsqrt(mean(x^2) + eps) before its rounding to bf16.
// `lanes` is the width of torch's fp32 vectors (8 or 16). Returns STATUS_OK, STATUS_UNSUPPORTED
// for other lanes, STATUS_BAD_SIZES when the sizes do not fit the buffers.
static inline int rms_norm_bf16(const uint16_t* x, int64_t x_len, const uint16_t* weight, int64_t weight_len,
                                uint16_t* out, int64_t out_len, float* normed, int64_t normed_len, int64_t M,
                                int64_t n, float eps, int lanes, int threads) {
  if (lanes != 8 && lanes != 16) return STATUS_UNSUPPORTED;
  const int64_t total = checked_mul(M, n);
  if (M < 0 || n < 1 || total < 0 || !fits(total, x_len) || !fits(total, out_len) || !fits(n, weight_len) ||
      (normed && !fits(total, normed_len)))
    return STATUS_BAD_SIZES;
#pragma omp parallel for num_threads(M >= 32 ? threads : 1) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* row = x + m * n;
    const float sum = lanes == 8 ? torch_sum_of_squares<8>(row, n) : torch_sum_of_squares<16>(row, n);
    const float mean = sum / (float)n;
    const float factor = 1.0f / sqrtf(mean + eps);
    for (int64_t k = 0; k < n; ++k) {
      const float value = bf16_to_float(row[k]) * factor;
      if (normed) normed[m * n + k] = value;
      out[m * n + k] = to_bf16(bf16_to_float(to_bf16(value)) * bf16_to_float(weight[k]));
    }
  }
  return STATUS_OK;
}
