// One decoder layer of a decode step (one new token for each of M cache rows) in one call: the
// same kernels the model calls one by one from Python (RMSNorm, the fused projections, rotary,
// the cache write, decode attention, the residual adds), in the same order on the same buffers,
// so every result is bit for bit the one of those calls. Only silu(gate) * up stays with torch,
// between this layer's call and the next one's (`finish`), which multiplies by w2 first.
//
// Included by each variant's .cpp after its entry points are defined.
#pragma once

#include <stdint.h>
#include <string.h>

#include "common.h"

// The int64 fields of a layer's table (built once per model, llama/fused_decode.py).
enum DecodeLayerField {
  DL_DIM,
  DL_HEADS,
  DL_KV_HEADS,
  DL_HEAD_DIM,
  DL_HIDDEN,  // the feed-forward's inner size
  DL_ATTENTION_NORM,
  DL_ATTENTION_EPS,  // the fp32 bits of the norm's eps
  DL_FFN_NORM,
  DL_FFN_EPS,
  DL_SCALE,  // the fp32 bits of the attention's 1/sqrt(head_dim)
  DL_QKV,    // four projections of DL_PROJECTION_FIELDS each: qkv, wo, w1|w3, w2
  DL_WO = DL_QKV + 4,
  DL_W13 = DL_WO + 4,
  DL_W2 = DL_W13 + 4,
  DL_KEYS = DL_W2 + 4,  // the cache, as the decode-attention kernel reads it
  DL_VALUES,
  DL_CACHE_LEN,
  DL_CACHE_BLOCKS,
  DL_BLOCK_LEN,
  DL_BLOCK_STRIDE,
  DL_HEAD_STRIDE,
  DL_TABLE,  // a paged cache's block table (0: dense), its entries and entries per row
  DL_TABLE_LEN,
  DL_BLOCKS_PER_ROW,
  DL_CACHE_KIND,  // CACHE_BF16, or CACHE_INT8: int8 codes and one fp32 scale per (block, kv head, position)
  DL_KEY_SCALES,
  DL_VALUE_SCALES,
  DL_SCALES_LEN,
  DL_SCALE_BLOCK_STRIDE,
  DL_SCALE_HEAD_STRIDE,
  DL_FIELDS
};
enum { CACHE_BF16 = 0, CACHE_INT8 = 1 };

// A projection: its kind, the int4 group size, and the fused table of its weights (common.h).
enum { DL_PROJECTION_KIND, DL_PROJECTION_GROUP, DL_PROJECTION_TABLE, DL_PROJECTION_COUNT };
enum { PROJECTION_BF16 = 0, PROJECTION_INT8 = 1, PROJECTION_INT4 = 2 };

// The int64 fields of a step's table: the rows, and the bf16 buffers of every intermediate.
enum DecodeStepField {
  DS_ROWS,          // M
  DS_HIDDEN,        // h [M, dim], updated in place
  DS_CACHE_ROWS,    // int64 [M]: the cache row of each
  DS_LENGTHS,       // int64 [M]: positions each attends to, its new one (at length - 1) included
  DS_COS,           // fp32 [M, head_dim / 2]
  DS_SIN,           // fp32 [M, head_dim / 2]
  DS_NORMED,        // [M, dim]
  DS_QKV,           // [M, (heads + 2 kv_heads) head_dim]
  DS_QUERIES,       // [M, heads head_dim], rotated
  DS_NEW_KEYS,      // [M, kv_heads head_dim], rotated
  DS_ATTENDED,      // [M, heads head_dim]
  DS_PROJECTED,     // [M, dim]: wo's and w2's outputs
  DS_GATE_UP,       // [M, 2 hidden]
  DS_ACTIVATED,     // [M, hidden]: silu(gate) * up, written by torch
  DS_FIELDS
};

static inline float bits_to_float(int64_t bits) {
  const uint32_t u = (uint32_t)bits;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

template <typename T>
static inline T* field_pointer(const int64_t* table, int field) {
  return (T*)(intptr_t)table[field];
}

// y [M, N] = x [M, K] times the projection's weights (N: their rows together).
static inline int decode_project(const int64_t* projection, const uint16_t* x, int64_t M, int64_t K, uint16_t* y,
                                 int64_t N, int threads) {
  const int64_t* table = field_pointer<const int64_t>(projection, DL_PROJECTION_TABLE);
  const int64_t count = projection[DL_PROJECTION_COUNT];
  const int64_t x_len = M * K, y_len = M * N;
  switch (projection[DL_PROJECTION_KIND]) {
    case PROJECTION_BF16:
      return codellama_gemv_bf16_fused(x, x_len, table, count, y, y_len, M, K, threads);
    case PROJECTION_INT8:
      return codellama_gemv_int8_fused(x, x_len, 1, table, count, y, y_len, M, K, threads);
    case PROJECTION_INT4:
      return codellama_gemv_int4_fused(x, x_len, 1, table, count, y, y_len, M, K, projection[DL_PROJECTION_GROUP],
                                       threads);
  }
  return STATUS_UNSUPPORTED;
}

// h += y, each sum of the two bf16 values rounded to bf16 (torch's bf16 add).
static inline void add_residual(uint16_t* h, const uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = to_bf16(bf16_to_float(h[i]) + bf16_to_float(y[i]));
}

// The int8 cache's form of a bf16 vector of D, as llama.kv_cache.quantize_int8 computes it: scale =
// absmax / 127 in fp32, codes = round(x / scale) (half to even) clamped to -127..127; an all-zero
// vector gets scale 0 and codes 0.
static inline void quantize_int8_vector(const uint16_t* x, int64_t D, int8_t* codes, float* scale) {
  float largest = 0.0f;
  for (int64_t d = 0; d < D; ++d) largest = fmaxf(largest, fabsf(bf16_to_float(x[d])));
  *scale = largest / 127.0f;
  const float safe = *scale > 0.0f ? *scale : 1.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float code = nearbyintf(bf16_to_float(x[d]) / safe);
    codes[d] = (int8_t)(code > 127.0f ? 127.0f : code < -127.0f ? -127.0f : code);
  }
}

// Stores row m's new key (rotated) and value at its position, dense or through the block table;
// STATUS_BAD_SIZES (nothing written) when the position is outside the row or the cache.
static inline int write_new_token(const int64_t* layer, int64_t row, int64_t position, const uint16_t* key,
                                  const uint16_t* value) {
  const int64_t KVH = layer[DL_KV_HEADS], D = layer[DL_HEAD_DIM], block_len = layer[DL_BLOCK_LEN];
  const int64_t blocks = layer[DL_CACHE_BLOCKS];
  const int64_t* table = field_pointer<const int64_t>(layer, DL_TABLE);
  if (row < 0 || position < 0 || block_len < 1) return STATUS_BAD_SIZES;
  int64_t block = row, offset = position;
  if (table != NULL) {
    const int64_t per_row = layer[DL_BLOCKS_PER_ROW], entry = checked_add(checked_mul(row, per_row), position / block_len);
    if (position / block_len >= per_row || entry < 0 || entry >= layer[DL_TABLE_LEN]) return STATUS_BAD_SIZES;
    block = table[entry];
    offset = position % block_len;
  }
  if (block < 0 || block >= blocks || offset >= block_len) return STATUS_BAD_SIZES;
  const int64_t last = checked_add(checked_add(checked_mul(block, layer[DL_BLOCK_STRIDE]),
                                               checked_mul(KVH - 1, layer[DL_HEAD_STRIDE])),
                                   checked_mul(offset + 1, D));
  if (last < 0 || !fits(last, layer[DL_CACHE_LEN])) return STATUS_BAD_SIZES;
  const int int8 = layer[DL_CACHE_KIND] == CACHE_INT8;
  if (int8) {
    const int64_t last_scale = checked_add(checked_add(checked_mul(block, layer[DL_SCALE_BLOCK_STRIDE]),
                                                       checked_mul(KVH - 1, layer[DL_SCALE_HEAD_STRIDE])),
                                           offset + 1);
    if (last_scale < 0 || !fits(last_scale, layer[DL_SCALES_LEN])) return STATUS_BAD_SIZES;
  }
  for (int64_t g = 0; g < KVH; ++g) {
    const int64_t at = block * layer[DL_BLOCK_STRIDE] + g * layer[DL_HEAD_STRIDE] + offset * D;
    if (!int8) {
      memcpy(field_pointer<uint16_t>(layer, DL_KEYS) + at, key + g * D, D * sizeof(uint16_t));
      memcpy(field_pointer<uint16_t>(layer, DL_VALUES) + at, value + g * D, D * sizeof(uint16_t));
      continue;
    }
    const int64_t scale_at = block * layer[DL_SCALE_BLOCK_STRIDE] + g * layer[DL_SCALE_HEAD_STRIDE] + offset;
    quantize_int8_vector(key + g * D, D, field_pointer<int8_t>(layer, DL_KEYS) + at,
                         field_pointer<float>(layer, DL_KEY_SCALES) + scale_at);
    quantize_int8_vector(value + g * D, D, field_pointer<int8_t>(layer, DL_VALUES) + at,
                         field_pointer<float>(layer, DL_VALUE_SCALES) + scale_at);
  }
  return STATUS_OK;
}

// The number of int64 fields of a layer's table and of a step's table, for the Python side to
// check the tables it builds against: out[0] = DL_FIELDS, out[1] = DS_FIELDS.
extern "C" int codellama_decode_table_fields(int64_t* out, int64_t out_len) {
  if (out_len < 2) return STATUS_BAD_SIZES;
  out[0] = DL_FIELDS;
  out[1] = DS_FIELDS;
  return STATUS_OK;
}

#define DECODE_CHECK(call)                 \
  do {                                     \
    const int status_ = (call);            \
    if (status_ != STATUS_OK) return status_; \
  } while (0)

// With `finish` (the previous layer's table): h += w2(activated) of that layer. Then, with `layer`:
// h += wo(attention(rotary(q, k), cache)) after writing the new keys and values, and gate_up =
// (w1|w3)(ffn_norm(h)), for torch to take silu(gate) * up into `activated`. Either may be NULL.
// Returns the first status other than STATUS_OK of the kernels it calls (the cache is written
// before the attention reads it, as in the model).
extern "C" int codellama_decode_layer(const int64_t* finish, const int64_t* layer, const int64_t* step, int lanes,
                                      int threads) {
  const int64_t M = step[DS_ROWS];
  if (M < 1 || M > MAX_GEMV_ROWS) return STATUS_UNSUPPORTED;
  uint16_t* h = field_pointer<uint16_t>(step, DS_HIDDEN);
  uint16_t* projected = field_pointer<uint16_t>(step, DS_PROJECTED);
  if (finish != NULL) {
    const int64_t dim = finish[DL_DIM];
    DECODE_CHECK(decode_project(finish + DL_W2, field_pointer<const uint16_t>(step, DS_ACTIVATED), M,
                                finish[DL_HIDDEN], projected, dim, threads));
    add_residual(h, projected, M * dim);
  }
  if (layer == NULL) return STATUS_OK;
  const int64_t dim = layer[DL_DIM], H = layer[DL_HEADS], KVH = layer[DL_KV_HEADS], D = layer[DL_HEAD_DIM];
  const int64_t qkv_width = (H + 2 * KVH) * D;
  uint16_t* normed = field_pointer<uint16_t>(step, DS_NORMED);
  uint16_t* qkv = field_pointer<uint16_t>(step, DS_QKV);
  uint16_t* queries = field_pointer<uint16_t>(step, DS_QUERIES);
  uint16_t* new_keys = field_pointer<uint16_t>(step, DS_NEW_KEYS);
  uint16_t* attended = field_pointer<uint16_t>(step, DS_ATTENDED);
  const int64_t* rows = field_pointer<const int64_t>(step, DS_CACHE_ROWS);
  const int64_t* lengths = field_pointer<const int64_t>(step, DS_LENGTHS);
  const float* cos = field_pointer<const float>(step, DS_COS);
  const float* sin = field_pointer<const float>(step, DS_SIN);

  DECODE_CHECK(codellama_rms_norm_bf16(h, M * dim, field_pointer<const uint16_t>(layer, DL_ATTENTION_NORM), dim,
                                       normed, M * dim, NULL, 0, M, dim, bits_to_float(layer[DL_ATTENTION_EPS]),
                                       lanes, threads));
  DECODE_CHECK(decode_project(layer + DL_QKV, normed, M, dim, qkv, qkv_width, threads));
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* token = qkv + m * qkv_width;
    const float* c = cos + m * (D / 2);
    const float* s = sin + m * (D / 2);
    DECODE_CHECK(codellama_rotary_bf16(token, H * D, c, s, D / 2, queries + m * H * D, H * D, 1, H, D, threads));
    DECODE_CHECK(codellama_rotary_bf16(token + H * D, KVH * D, c, s, D / 2, new_keys + m * KVH * D, KVH * D, 1, KVH,
                                       D, threads));
    DECODE_CHECK(write_new_token(layer, rows[m], lengths[m] - 1, new_keys + m * KVH * D, token + (H + KVH) * D));
  }
  if (layer[DL_CACHE_KIND] == CACHE_INT8)
    DECODE_CHECK(codellama_decode_attention_int8(
        queries, M * H * D, field_pointer<const int8_t>(layer, DL_KEYS), field_pointer<const int8_t>(layer, DL_VALUES),
        layer[DL_CACHE_LEN], field_pointer<const float>(layer, DL_KEY_SCALES),
        field_pointer<const float>(layer, DL_VALUE_SCALES), layer[DL_SCALES_LEN], attended, M * H * D, lengths, M,
        rows, M, field_pointer<const int64_t>(layer, DL_TABLE), layer[DL_TABLE_LEN], layer[DL_BLOCKS_PER_ROW],
        layer[DL_CACHE_BLOCKS], M, H, KVH, D, layer[DL_BLOCK_LEN], layer[DL_BLOCK_STRIDE], layer[DL_HEAD_STRIDE],
        layer[DL_SCALE_BLOCK_STRIDE], layer[DL_SCALE_HEAD_STRIDE], bits_to_float(layer[DL_SCALE]), threads));
  else
    DECODE_CHECK(codellama_decode_attention_bf16(
        queries, M * H * D, field_pointer<const uint16_t>(layer, DL_KEYS),
        field_pointer<const uint16_t>(layer, DL_VALUES), layer[DL_CACHE_LEN], attended, M * H * D, lengths, M, rows, M,
        field_pointer<const int64_t>(layer, DL_TABLE), layer[DL_TABLE_LEN], layer[DL_BLOCKS_PER_ROW],
        layer[DL_CACHE_BLOCKS], M, H, KVH, D, layer[DL_BLOCK_LEN], layer[DL_BLOCK_STRIDE], layer[DL_HEAD_STRIDE],
        bits_to_float(layer[DL_SCALE]), threads));
  DECODE_CHECK(decode_project(layer + DL_WO, attended, M, H * D, projected, dim, threads));
  add_residual(h, projected, M * dim);
  DECODE_CHECK(codellama_rms_norm_bf16(h, M * dim, field_pointer<const uint16_t>(layer, DL_FFN_NORM), dim, normed,
                                       M * dim, NULL, 0, M, dim, bits_to_float(layer[DL_FFN_EPS]), lanes, threads));
  return decode_project(layer + DL_W13, normed, M, dim, field_pointer<uint16_t>(step, DS_GATE_UP),
                        2 * layer[DL_HIDDEN], threads);
}

#undef DECODE_CHECK
