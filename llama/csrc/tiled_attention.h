// Causal attention of a prompt chunk, in tiles: one algorithm for both kernel variants, which
// include this header after defining `Ops`, their vector operations (W fp32 lanes):
//
//   Ops::vec, Ops::W               the vector type and its lanes (8 or 16)
//   Ops::kRowBlock                 rows sharing each key or value load in the inner loops
//   Ops::kBf16Dot                  whether the scores of bf16 caches use bf16 dot products; if so:
//     Ops::ivec, set1_pair(x), load_pairs(p)   32-bit units holding two bf16 values
//     dot_pairs(acc, a, b)         acc + a.bf16[2i] * b.bf16[2i] + a.bf16[2i + 1] * b.bf16[2i + 1]
//     transpose16(in, in_stride, out, out_stride)  16 x 16 32-bit units: out[c][r] = in[r][c]
//     codes_to_bf16(codes, out, n)  n int8 values (a multiple of 16) as bf16
//   zero(), set1(x), load(p), store(p, v), fma(a, b, c) = a * b + c, add, mul, sub, max
//   hmax(v), hsum(v)               the largest lane and the sum of the lanes, in a fixed order
//   exp(v)                         e^v for v <= 0
//   iota()                         0, 1, .., W - 1 as fp32
//   below(index, bound, v, fill)   v in the lanes where index < bound, fill elsewhere
//   load_bf16(p), store_bf16(p, v) W bf16 values to fp32 and back (rounding to nearest even)
//   load_i8(p)                     W int8 values as fp32
//
// Queries, cache and output are all bf16 (uint16_t) or all fp32 (float): `T`; the arithmetic is
// fp32 either way (an int8 cache's codes and scales are read in place).
//
// A task is one kv head and a tile of consecutive tokens: its rows are the (token, query head)
// pairs of the tile, kTileRows or fewer (or the query heads of one kv head, if more). The keys are
// read in blocks of kKeyBlock, in position order, each block's keys widened to fp32 and transposed
// once for every row of the tile (with Ops::kBf16Dot and bf16 queries: kept in bf16, transposed as
// pairs, scored with bf16 dot products whose products are exact in fp32), its values widened where
// they are used, kRowBlock rows at a time, the next blocks fetched ahead from memory meanwhile. The
// softmax is computed online (a running maximum and sum per row, the row's weighted sum rescaled
// when the maximum grows), so the memory read per tile is one pass over the visible keys and values
// and the scratch space does not grow with the context. The keys are attended in segments of
// kSegment, each from scratch, and the segments' results combined in order: a decode spreads one
// row's segments over the threads.
//
// Each row's result depends only on its own position: blocks and segments start at fixed
// multiples, every row takes the same steps over the blocks it sees (a block it does not see is
// skipped), and all sums over a row run in the same order. So a token's output is the same whatever
// chunk, tile or thread computes it, decoded or prefilled.
#pragma once

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "common.h"

namespace tiled {

constexpr int64_t kKeyBlock = ATTENTION_KEY_BLOCK;
constexpr int64_t kTileRows = 64;
// Blocks ahead whose keys and values a tile asks the CPU to fetch while it works on the current one
// (a long cache row comes from memory: without it the tile waits on every block's first reads).
constexpr int64_t kPrefetchBlocks = 2;
// Keys per segment: a row's keys are attended segment by segment (each with its own online softmax),
// the segments' results then combined in order, so a long decode can spread one row's segments over
// threads and a prefilled token still gets the same result. A multiple of kKeyBlock.
constexpr int64_t kSegment = 4096;

// Per-thread scratch for tiles of at most `rows` rows.
template <int D>
struct Scratch {
  float* q;       // [rows, D] queries, fp32, scaled
  float* o;       // [rows, D] running weighted sums
  float* p;       // [rows, kKeyBlock] scores, then probabilities
  float* kt;      // [D, kKeyBlock] the block's keys, transposed
  float* m;       // [rows] running maximum
  float* l;       // [rows] running sum
  float* acc_o;   // [rows, D] the segments so far, combined: weighted sums
  float* acc_m;   // [rows] their maximum
  float* acc_l;   // [rows] their sum
  uint16_t* staged;   // [kKeyBlock, D] an int8 block's key codes as bf16 (bf16 dot products)
  float* key_scale;   // [kKeyBlock] an int8 block's key scales, 0 past its keys (bf16 dot products)
  int64_t* position;  // [rows] each row's position (its last visible key)
  float* memory;

  explicit Scratch(int64_t rows) {
    const int64_t floats = rows * (3 * D + kKeyBlock + 4) + D * kKeyBlock + D * kKeyBlock / 2 + kKeyBlock;
    memory = (float*)malloc(sizeof(float) * floats + sizeof(int64_t) * rows);
    if (!memory) {  // the caller checks `memory` before using any of them
      q = o = p = kt = m = l = acc_o = acc_m = acc_l = key_scale = nullptr;
      staged = nullptr;
      position = nullptr;
      return;
    }
    q = memory;
    o = q + rows * D;
    p = o + rows * D;
    kt = p + rows * kKeyBlock;
    m = kt + D * kKeyBlock;
    l = m + rows;
    acc_o = l + rows;
    acc_m = acc_o + rows * D;
    acc_l = acc_m + rows;
    staged = (uint16_t*)(acc_l + rows);
    key_scale = acc_l + rows + D * kKeyBlock / 2;
    position = (int64_t*)(key_scale + kKeyBlock);
  }
  ~Scratch() { free(memory); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// p[r, j] = q[r] . key j for rows r0 .. r0 + RB - 1, all kKeyBlock keys; one multiply-add per head
// dimension, in order (the same operations for a row whatever RB is).
template <class Ops, int D, int RB>
inline void score_rows(const Scratch<D>& s, int64_t r0) {
  using V = typename Ops::vec;
  constexpr int W = Ops::W;
  for (int64_t j = 0; j < kKeyBlock; j += 2 * W) {
    V acc[RB][2];
    for (int i = 0; i < RB; ++i) acc[i][0] = acc[i][1] = Ops::zero();
    for (int d = 0; d < D; ++d) {
      const V k0 = Ops::load(s.kt + d * kKeyBlock + j), k1 = Ops::load(s.kt + d * kKeyBlock + j + W);
      for (int i = 0; i < RB; ++i) {
        const V qd = Ops::set1(s.q[(r0 + i) * D + d]);
        acc[i][0] = Ops::fma(qd, k0, acc[i][0]);
        acc[i][1] = Ops::fma(qd, k1, acc[i][1]);
      }
    }
    for (int i = 0; i < RB; ++i) {
      Ops::store(s.p + (r0 + i) * kKeyBlock + j, acc[i][0]);
      Ops::store(s.p + (r0 + i) * kKeyBlock + j + W, acc[i][1]);
    }
  }
}

template <class Ops, int D>
inline void scores(const Scratch<D>& s, int64_t rows) {
  int64_t r = 0;
  for (; r + Ops::kRowBlock <= rows; r += Ops::kRowBlock) score_rows<Ops, D, Ops::kRowBlock>(s, r);
  for (; r < rows; ++r) score_rows<Ops, D, 1>(s, r);
}

// Online softmax step of one row over the block's first `seen` keys (1 <= seen <= kKeyBlock): the
// row's probabilities (0 past `seen`), its maximum and sum updated, its weighted sum rescaled.
template <class Ops, int D>
inline void softmax_step(const Scratch<D>& s, int64_t r, int64_t seen) {
  using V = typename Ops::vec;
  constexpr int W = Ops::W;
  float* row = s.p + r * kKeyBlock;
  const V bound = Ops::set1((float)seen), minus_inf = Ops::set1(-INFINITY);
  const bool whole = seen == kKeyBlock;  // most blocks: no key to mask
  V mx = minus_inf;
  for (int64_t j = 0; j < kKeyBlock; j += W) {
    const V x = Ops::load(row + j);
    mx = Ops::max(mx, whole ? x : Ops::below(Ops::add(Ops::iota(), Ops::set1((float)j)), bound, x, minus_inf));
  }
  const float previous = s.m[r], largest = fmaxf(previous, Ops::hmax(mx));
  const V mv = Ops::set1(largest), zero = Ops::zero();
  V sum = zero;
  for (int64_t j = 0; j < kKeyBlock; j += W) {
    V e = Ops::exp(Ops::sub(Ops::load(row + j), mv));
    if (!whole) e = Ops::below(Ops::add(Ops::iota(), Ops::set1((float)j)), bound, e, zero);
    Ops::store(row + j, e);
    sum = Ops::add(sum, e);
  }
  if (previous == -INFINITY) {  // the row's first block
    s.l[r] = Ops::hsum(sum);
  } else {
    const float alpha = expf(previous - largest);
    s.l[r] = s.l[r] * alpha + Ops::hsum(sum);
    if (alpha != 1.0f) {
      const V av = Ops::set1(alpha);
      for (int d = 0; d < D; d += W) Ops::store(s.o + r * D + d, Ops::mul(Ops::load(s.o + r * D + d), av));
    }
  }
  s.m[r] = largest;
}

// o[r] += sum_j p[r, j] v[j] for rows r0 .. r0 + RB - 1 over the block's `keys` keys, the values of
// keys first, first + 1, ... of `cache` widened where they are used; one multiply-add per key in
// order (the same operations for a row whatever RB is).
template <class Ops, int D, int RB, class Rows>
inline void weigh_rows(const Scratch<D>& s, const Rows& cache, int64_t first, int64_t r0, int64_t keys) {
  using V = typename Ops::vec;
  constexpr int W = Ops::W;
  for (int d = 0; d < D; d += 2 * W) {
    V acc[RB][2];
    for (int i = 0; i < RB; ++i) {
      acc[i][0] = Ops::load(s.o + (r0 + i) * D + d);
      acc[i][1] = Ops::load(s.o + (r0 + i) * D + d + W);
    }
    for (int64_t j = 0; j < keys; ++j) {
      const V v0 = cache.template values<Ops>(first + j, d), v1 = cache.template values<Ops>(first + j, d + W);
      for (int i = 0; i < RB; ++i) {
        const V pj = Ops::set1(s.p[(r0 + i) * kKeyBlock + j]);
        acc[i][0] = Ops::fma(pj, v0, acc[i][0]);
        acc[i][1] = Ops::fma(pj, v1, acc[i][1]);
      }
    }
    for (int i = 0; i < RB; ++i) {
      Ops::store(s.o + (r0 + i) * D + d, acc[i][0]);
      Ops::store(s.o + (r0 + i) * D + d + W, acc[i][1]);
    }
  }
}

template <class Ops, int D, class Rows>
inline void weighted_values(const Scratch<D>& s, const Rows& cache, int64_t first, int64_t rows, int64_t keys) {
  int64_t r = 0;
  for (; r + Ops::kRowBlock <= rows; r += Ops::kRowBlock) weigh_rows<Ops, D, Ops::kRowBlock>(s, cache, first, r, keys);
  for (; r < rows; ++r) weigh_rows<Ops, D, 1>(s, cache, first, r, keys);
}

// 8 values as fp32 (bf16 widened exactly), with the AVX2 instructions both variants have.
inline __m256 widen8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
inline float widen(uint16_t x) {
  const uint32_t bits = (uint32_t)x << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
inline float widen(float x) { return x; }

// W values of a row of T as fp32, and back (bf16: rounded to nearest even).
template <class Ops>
inline typename Ops::vec load_row(const uint16_t* p) { return Ops::load_bf16(p); }
template <class Ops>
inline typename Ops::vec load_row(const float* p) { return Ops::load(p); }
template <class Ops>
inline void store_row(uint16_t* p, typename Ops::vec v) { Ops::store_bf16(p, v); }
template <class Ops>
inline void store_row(float* p, typename Ops::vec v) { Ops::store(p, v); }

// Where a (cache row, kv head)'s keys and values are, for the tiles: `keys8(s, d)` (key s, elements
// d .. d + 7, fp32, with the AVX2 instructions both variants have), `key(s, d)` (one element) and
// `values<Ops>(s, d)` (W elements of value s), all dequantized to fp32; `prefetch(first, keys)` asks
// for the cache lines of keys and values first .. first + keys - 1 (into the second-level cache).

// Prefetch the cache lines of `bytes` bytes from p.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char*)p + b, _MM_HINT_T1);
}
template <class T, int D>
struct PlainRows {  // bf16 or fp32 keys and values [positions, D]
  const T* k;
  const T* v;
  __m256 keys8(int64_t s, int d) const { return widen8(k + s * D + d); }
  float key(int64_t s, int d) const { return widen(k[s * D + d]); }
  template <class Ops>
  typename Ops::vec values(int64_t s, int d) const { return load_row<Ops>(v + s * D + d); }
  void prefetch(int64_t first, int64_t keys) const {
    prefetch_bytes(k + first * D, keys * D * (int64_t)sizeof(T));
    prefetch_bytes(v + first * D, keys * D * (int64_t)sizeof(T));
  }
  // The same positions from position `s` on; the same layout `elements` further on (`scales` unused).
  PlainRows at(int64_t s) const { return {k + s * D, v + s * D}; }
  PlainRows shifted(int64_t elements, int64_t) const { return {k + elements, v + elements}; }
};

template <int D>
struct Int8Rows {  // int8 codes [positions, D] with one fp32 scale per position: value = code * scale
  const int8_t* k;
  const int8_t* v;
  const float* k_scale;
  const float* v_scale;
  __m256 keys8(int64_t s, int d) const {
    const __m256i codes = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(k + s * D + d)));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(codes), _mm256_set1_ps(k_scale[s]));
  }
  float key(int64_t s, int d) const { return (float)k[s * D + d] * k_scale[s]; }
  template <class Ops>
  typename Ops::vec values(int64_t s, int d) const {
    return Ops::mul(Ops::load_i8(v + s * D + d), Ops::set1(v_scale[s]));
  }
  void prefetch(int64_t first, int64_t keys) const {
    prefetch_bytes(k + first * D, keys * D);
    prefetch_bytes(v + first * D, keys * D);
    prefetch_bytes(k_scale + first, keys * 4);
    prefetch_bytes(v_scale + first, keys * 4);
  }
  Int8Rows at(int64_t s) const { return {k + s * D, v + s * D, k_scale + s, v_scale + s}; }
  Int8Rows shifted(int64_t elements, int64_t scales) const {
    return {k + elements, v + elements, k_scale + scales, v_scale + scales};
  }
};

// A (cache row, kv head)'s positions, `Rows` (PlainRows or Int8Rows) at a time: without a block
// table, contiguous from `origin`; with one, position s is position s % block_len of block
// table[s / block_len], block i lying i * block_stride elements (i * scale_block_stride scales)
// after `origin` (block 0). A block holds whole kKeyBlock-key blocks of the tiles (block_len is a
// multiple of kKeyBlock), so a tile block is contiguous either way.
template <class Rows>
struct BlockRows {
  using Inner = Rows;
  Rows origin;
  const int64_t* table;
  int64_t block_len, block_stride, scale_block_stride;
  // Positions first .. of the tile block starting at `first` (a multiple of kKeyBlock), contiguous.
  Rows at(int64_t first) const {
    if (!table) return origin.at(first);
    const int64_t i = first / block_len;
    return origin.shifted(table[i] * block_stride, table[i] * scale_block_stride).at(first - i * block_len);
  }
};
template <class Rows>
inline BlockRows<Rows> contiguous(Rows rows) {
  return {rows, nullptr, 0, 0, 0};
}

// kt[d * kKeyBlock + j] = element d of key first + j (fp32) for the block's first `keys` keys; 0 for
// the others. Groups of 8 keys by 8 elements are transposed in registers.
template <int D, class Rows>
inline void transpose_keys(const Rows& cache, int64_t first, int64_t keys, float* kt) {
  int64_t j = 0;
  for (; j + 8 <= keys; j += 8)
    for (int d = 0; d < D; d += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = cache.keys8(first + j + i, d);
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
      const __m256 columns[8] = {
          _mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
          _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
          _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
          _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31),
      };
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(kt + (d + i) * kKeyBlock + j, columns[i]);
    }
  for (; j < kKeyBlock; ++j)
    for (int d = 0; d < D; ++d) kt[d * kKeyBlock + j] = j < keys ? cache.key(first + j, d) : 0.0f;
}

// bf16 caches where the CPU has bf16 dot products (Ops::kBf16Dot): the scores take the bf16 queries
// and keys as stored, two head dimensions per instruction (each product exact in fp32, added in
// order), then the scale; a block's keys are transposed as pairs of head dimensions (32-bit units),
// not widened. kt[c * kKeyBlock + j] = elements 2c, 2c + 1 of key first + j; 0 past `keys`.
template <class Ops, int D>
inline void transpose_key_pairs(const uint16_t* k, int64_t first, int64_t keys, uint32_t* kt) {
  constexpr int P = D / 2;  // pairs per key
  const uint16_t* block = k + first * D;
  int64_t j = 0;
  for (; j + 16 <= keys; j += 16)
    for (int c = 0; c < P; c += 16)
      Ops::transpose16((const uint32_t*)(block + j * D) + c, P, kt + c * kKeyBlock + j, kKeyBlock);
  for (; j < kKeyBlock; ++j)
    for (int c = 0; c < P; ++c) {
      uint32_t pair = 0;
      if (j < keys) memcpy(&pair, block + j * D + 2 * c, 4);
      kt[c * kKeyBlock + j] = pair;
    }
}

// p[r, j] = scale * (q[r] . key j) for rows r0 .. r0 + RB - 1, all kKeyBlock keys, from the bf16
// pairs of the queries `qp` [rows, D / 2] and keys `kt`, times key j's scale `key_scale[j]` when
// given (int8 codes); the same operations for a row whatever RB is.
template <class Ops, int D, int RB>
inline void score_pair_rows(const Scratch<D>& s, const uint32_t* qp, const uint32_t* kt, int64_t r0,
                            float scale, const float* key_scale) {
  using V = typename Ops::vec;
  using I = typename Ops::ivec;
  constexpr int W = Ops::W, P = D / 2;
  const V sv = Ops::set1(scale);
  for (int64_t j = 0; j < kKeyBlock; j += 2 * W) {
    V acc[RB][2];
    for (int i = 0; i < RB; ++i) acc[i][0] = acc[i][1] = Ops::zero();
    for (int c = 0; c < P; ++c) {
      const I k0 = Ops::load_pairs(kt + c * kKeyBlock + j), k1 = Ops::load_pairs(kt + c * kKeyBlock + j + W);
      for (int i = 0; i < RB; ++i) {
        const I qc = Ops::set1_pair(qp[(r0 + i) * P + c]);
        acc[i][0] = Ops::dot_pairs(acc[i][0], qc, k0);
        acc[i][1] = Ops::dot_pairs(acc[i][1], qc, k1);
      }
    }
    if (key_scale) {
      const V s0 = Ops::load(key_scale + j), s1 = Ops::load(key_scale + j + W);
      for (int i = 0; i < RB; ++i) {
        acc[i][0] = Ops::mul(acc[i][0], s0);
        acc[i][1] = Ops::mul(acc[i][1], s1);
      }
    }
    for (int i = 0; i < RB; ++i) {
      Ops::store(s.p + (r0 + i) * kKeyBlock + j, Ops::mul(acc[i][0], sv));
      Ops::store(s.p + (r0 + i) * kKeyBlock + j + W, Ops::mul(acc[i][1], sv));
    }
  }
}

template <class Ops, int D>
inline void pair_scores(const Scratch<D>& s, const uint32_t* qp, const uint32_t* kt, int64_t rows, float scale,
                        const float* key_scale) {
  int64_t r = 0;
  for (; r + Ops::kRowBlock <= rows; r += Ops::kRowBlock)
    score_pair_rows<Ops, D, Ops::kRowBlock>(s, qp, kt, r, scale, key_scale);
  for (; r < rows; ++r) score_pair_rows<Ops, D, 1>(s, qp, kt, r, scale, key_scale);
}

// A block's keys as bf16 pairs, transposed (transpose_key_pairs), for the pair scores: bf16 keys as
// stored; int8 codes widened to bf16 (exact: |code| <= 128) into `s.staged`, their scales copied to
// `s.key_scale` (0 past the block's keys). Returns the key scales to apply, or nullptr.
template <class Ops, int D>
inline const float* key_pair_block(const PlainRows<uint16_t, D>& cache, int64_t first, int64_t keys, uint32_t* kt,
                                   const Scratch<D>&) {
  transpose_key_pairs<Ops, D>(cache.k, first, keys, kt);
  return nullptr;
}
template <class Ops, int D>
inline const float* key_pair_block(const Int8Rows<D>& cache, int64_t first, int64_t keys, uint32_t* kt,
                                   const Scratch<D>& s) {
  Ops::codes_to_bf16(cache.k + first * D, s.staged, keys * D);
  transpose_key_pairs<Ops, D>(s.staged, 0, keys, kt);
  for (int64_t j = 0; j < kKeyBlock; ++j) s.key_scale[j] = j < keys ? cache.k_scale[first + j] : 0.0f;
  return s.key_scale;
}

// Whether a tile's scores use the bf16 dot products: bf16 queries over bf16 or int8 caches.
template <class Ops, int D, class T, class Rows>
constexpr bool kPairs =
    Ops::kBf16Dot && std::is_same<T, uint16_t>::value &&
    (std::is_same<std::remove_cv_t<Rows>, PlainRows<uint16_t, D>>::value ||
     std::is_same<std::remove_cv_t<Rows>, Int8Rows<D>>::value);

// No segment combined yet for the first `rows` rows.
template <class Ops, int D>
inline void reset_combined(const Scratch<D>& s, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int d = 0; d < D; d += Ops::W) Ops::store(s.acc_o + r * D + d, Ops::zero());
    s.acc_m[r] = -INFINITY;
    s.acc_l[r] = 0.0f;
  }
}

// A tile's rows: (token t0 + r / rep, head g * rep + r % rep) for r < rows, the token at position
// start + t seeing keys 0 .. start + t. Their queries into the scratch (scaled fp32, or the bf16 pairs
// as stored), their positions, and no segment combined yet.
template <class Ops, int D, class T, class Rows>
inline void load_queries(const T* q, int64_t start, int64_t t0, int64_t rows, int64_t rep, int64_t g, int64_t H,
                         float scale, const Scratch<D>& s) {
  constexpr int W = Ops::W;
  const typename Ops::vec sv = Ops::set1(scale);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = t0 + r / rep, head = g * rep + r % rep;
    s.position[r] = start + token;
    if constexpr (kPairs<Ops, D, T, Rows>)
      memcpy((uint32_t*)s.q + r * (D / 2), q + (token * H + head) * D, D * sizeof(uint16_t));
    else
      for (int d = 0; d < D; d += W)
        Ops::store(s.q + r * D + d, Ops::mul(load_row<Ops>(q + (token * H + head) * D + d), sv));
  }
  reset_combined<Ops, D>(s, rows);
}

// The rows' attention over keys begin .. end - 1 (one segment), from scratch: each row's weighted
// sum, maximum and sum left in s.o, s.m, s.l (a row that sees none of them keeps 0, -inf, 0). Keys up
// to `limit` may be fetched ahead.
template <class Ops, int D, class T, class Rows>
inline void attend_segment(const BlockRows<Rows>& cache, int64_t rows, float scale, int64_t begin, int64_t end,
                           int64_t limit, const Scratch<D>& s) {
  constexpr int W = Ops::W;
  constexpr bool pairs = kPairs<Ops, D, T, Rows>;
  uint32_t* const qp = (uint32_t*)s.q;   // with pairs: the bf16 queries as stored, [rows, D / 2]
  uint32_t* const kt = (uint32_t*)s.kt;  // with pairs: the block's keys as pairs, [D / 2, kKeyBlock]
  const int64_t* position = s.position;
  for (int64_t r = 0; r < rows; ++r) {
    for (int d = 0; d < D; d += W) Ops::store(s.o + r * D + d, Ops::zero());
    s.m[r] = -INFINITY;
    s.l[r] = 0.0f;
  }
  for (int64_t first = begin; first < end; first += kKeyBlock) {
    const int64_t keys = end - first < kKeyBlock ? end - first : kKeyBlock;
    const int64_t ahead = first + kPrefetchBlocks * kKeyBlock;
    if (ahead <= limit) cache.at(ahead).prefetch(0, limit + 1 - ahead < kKeyBlock ? limit + 1 - ahead : kKeyBlock);
    const Rows block = cache.at(first);  // keys and values first .. first + keys - 1 as 0 .. keys - 1
    if constexpr (pairs) {
      pair_scores<Ops, D>(s, qp, kt, rows, scale, key_pair_block<Ops, D>(block, 0, keys, kt, s));
    } else {
      transpose_keys<D>(block, 0, keys, s.kt);
      scores<Ops, D>(s, rows);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t seen = position[r] + 1 - first;
      if (seen <= 0) {  // the row sees none of the block: it takes no step
        for (int64_t j = 0; j < kKeyBlock; j += W) Ops::store(s.p + r * kKeyBlock + j, Ops::zero());
        continue;
      }
      softmax_step<Ops, D>(s, r, seen < kKeyBlock ? seen : kKeyBlock);
    }
    weighted_values<Ops, D>(s, block, 0, rows, keys);
  }
}

// Row r's segments so far (s.acc_*) combined with one more segment's weighted sum o, maximum m and
// sum l: both rescaled to their common maximum, then added.
template <class Ops, int D>
inline void combine_segment(const Scratch<D>& s, int64_t r, const float* o, float m, float l) {
  constexpr int W = Ops::W;
  const float largest = fmaxf(s.acc_m[r], m);
  const float a = expf(s.acc_m[r] - largest), b = expf(m - largest);
  const typename Ops::vec av = Ops::set1(a), bv = Ops::set1(b);
  for (int d = 0; d < D; d += W) {
    float* acc = s.acc_o + r * D + d;
    Ops::store(acc, Ops::fma(Ops::load(o + d), bv, Ops::mul(Ops::load(acc), av)));
  }
  s.acc_l[r] = s.acc_l[r] * a + l * b;
  s.acc_m[r] = largest;
}

// The rows' results, combined weighted sums over combined sums, into out [tokens, H, D].
template <class Ops, int D, class T>
inline void store_rows(T* out, int64_t t0, int64_t rows, int64_t rep, int64_t g, int64_t H, const Scratch<D>& s) {
  constexpr int W = Ops::W;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = t0 + r / rep, head = g * rep + r % rep;
    const typename Ops::vec inv = Ops::set1(1.0f / s.acc_l[r]);
    for (int d = 0; d < D; d += W)
      store_row<Ops>(out + (token * H + head) * D + d, Ops::mul(Ops::load(s.acc_o + r * D + d), inv));
  }
}

// One tile (rows as in load_queries): its keys segment by segment, each combined in order.
template <class Ops, int D, class T, class Rows>
inline void attend_tile(const T* q, const BlockRows<Rows>& cache, T* out, int64_t start, int64_t t0, int64_t rows, int64_t rep,
                        int64_t g, int64_t H, float scale, const Scratch<D>& s) {
  load_queries<Ops, D, T, Rows>(q, start, t0, rows, rep, g, H, scale, s);
  const int64_t last = s.position[rows - 1];  // the tile's last (and largest) position
  for (int64_t begin = 0; begin <= last; begin += kSegment) {
    const int64_t end = begin + kSegment < last + 1 ? begin + kSegment : last + 1;
    attend_segment<Ops, D, T>(cache, rows, scale, begin, end, last, s);
    for (int64_t r = 0; r < rows; ++r)
      if (s.position[r] >= begin) combine_segment<Ops, D>(s, r, s.o + r * D, s.m[r], s.l[r]);
  }
  store_rows<Ops, D>(out, t0, rows, rep, g, H, s);
}

// Causal attention of tokens start .. start + len - 1 of one sequence: q and out [len, H, D], kv
// head g's keys and values `rows_of(g)` (a BlockRows). Returns STATUS_OK or
// STATUS_NO_MEMORY.
template <class Ops, int D, class T, class RowsOf>
int prefill(const T* q, T* out, int64_t start, int64_t len, int64_t H, int64_t KVH, float scale, int threads,
            RowsOf rows_of) {
  const int64_t rep = H / KVH;
  const int64_t tokens_per_tile = rep >= kTileRows ? 1 : kTileRows / rep;
  const int64_t tiles = (len + tokens_per_tile - 1) / tokens_per_tile;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    Scratch<D> scratch(tokens_per_tile * rep);
    if (!scratch.memory) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < KVH * tiles; ++task) {
      if (!scratch.memory) continue;
      // Later tokens see more keys: hand out the longest tiles first.
      const int64_t g = task % KVH, tile = tiles - 1 - task / KVH;
      const int64_t t0 = tile * tokens_per_tile;
      const int64_t count = len - t0 < tokens_per_tile ? len - t0 : tokens_per_tile;
      attend_tile<Ops, D>(q, rows_of(g), out, start, t0, count * rep, rep, g, H, scale, scratch);
    }
  }
  return failed ? STATUS_NO_MEMORY : STATUS_OK;
}

// Attention of one new token per batch row b over positions 0 .. lens[b] - 1 of cache row
// rows[b] (b when rows is null), kv head g's keys and values `rows_of(cache row, g)`: q and out
// [B, H, D]. The query heads sharing a kv head form one tile; its segments (kSegment keys) are
// spread over the threads, then combined in order, so a token's output equals what `prefill`
// computes for it and a long row is not left to one thread. Returns STATUS_OK or STATUS_NO_MEMORY.
template <class Ops, int D, class T, class RowsOf>
int decode(const T* q, T* out, const int64_t* lens, const int64_t* rows, int64_t B, int64_t H, int64_t KVH,
           float scale, int threads, RowsOf rows_of) {
  const int64_t rep = H / KVH;
  // Task t of batch row b, kv head g and segment k: first[b] + g * segments(b) + k.
  int64_t* first = (int64_t*)malloc(sizeof(int64_t) * (B + 1));
  if (!first) return STATUS_NO_MEMORY;
  first[0] = 0;
  for (int64_t b = 0; b < B; ++b) first[b + 1] = first[b] + KVH * ((lens[b] + kSegment - 1) / kSegment);
  const int64_t tasks = first[B];
  float* partial = (float*)malloc(sizeof(float) * tasks * rep * (D + 2));  // per task: o [rep, D], m, l [rep]
  if (!partial) {
    free(first);
    return STATUS_NO_MEMORY;
  }
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    Scratch<D> scratch(rep);
    if (!scratch.memory) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      if (!scratch.memory) continue;
      int64_t b = 0;
      while (first[b + 1] <= task) ++b;
      const int64_t segments = (lens[b] + kSegment - 1) / kSegment;
      const int64_t g = (task - first[b]) / segments, k = (task - first[b]) % segments;
      const auto cache = rows_of(rows ? rows[b] : b, g);
      load_queries<Ops, D, T, typename decltype(cache)::Inner>(q + b * H * D, lens[b] - 1, 0, rep, rep, g, H, scale, scratch);
      const int64_t begin = k * kSegment, end = begin + kSegment < lens[b] ? begin + kSegment : lens[b];
      attend_segment<Ops, D, T>(cache, rep, scale, begin, end, end - 1, scratch);
      float* o = partial + task * rep * (D + 2);
      memcpy(o, scratch.o, sizeof(float) * rep * D);
      memcpy(o + rep * D, scratch.m, sizeof(float) * rep);
      memcpy(o + rep * D + rep, scratch.l, sizeof(float) * rep);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * KVH; ++task) {
      if (!scratch.memory) continue;
      const int64_t b = task / KVH, g = task % KVH;
      const int64_t segments = (lens[b] + kSegment - 1) / kSegment;
      reset_combined<Ops, D>(scratch, rep);
      for (int64_t k = 0; k < segments; ++k) {
        const float* o = partial + (first[b] + g * segments + k) * rep * (D + 2);
        for (int64_t r = 0; r < rep; ++r)
          combine_segment<Ops, D>(scratch, r, o + r * D, o[rep * D + r], o[rep * D + rep + r]);
      }
      store_rows<Ops, D>(out + b * H * D, 0, rep, rep, g, H, scratch);
    }
  }
  free(first);
  free(partial);
  return failed ? STATUS_NO_MEMORY : STATUS_OK;
}

// The entry points' bodies (see kernels_avx512bf16.cpp for the layouts and status codes): the
// checks of common.h, then the head size's instance. A cache row's kv head g: contiguous from its
// row's block without a block table, else the row's blocks.
template <class Rows>
inline BlockRows<Rows> cache_row(Rows blocks_at_head, const int64_t* table, int64_t row, int64_t blocks_per_row,
                                 int64_t block_len, int64_t block_stride, int64_t scale_block_stride) {
  if (!table) return contiguous(blocks_at_head.shifted(row * block_stride, row * scale_block_stride));
  return {blocks_at_head, table + row * blocks_per_row, block_len, block_stride, scale_block_stride};
}

template <class Ops, int D, class T>
int decode_plain(const T* q, const T* k, const T* v, T* out, const int64_t* lens, const int64_t* rows,
                 const int64_t* table, int64_t blocks_per_row, int64_t B, int64_t H, int64_t KVH, int64_t block_len,
                 int64_t block_stride, int64_t head_stride, float scale, int threads) {
  return decode<Ops, D>(q, out, lens, rows, B, H, KVH, scale, threads, [=](int64_t row, int64_t g) {
    const PlainRows<T, D> at_head{k + g * head_stride, v + g * head_stride};
    return cache_row(at_head, table, row, blocks_per_row, block_len, block_stride, 0);
  });
}

template <class Ops, class T>
int decode_entry(const T* q, int64_t q_len, const T* k, const T* v, int64_t kv_len, T* out, int64_t out_len,
                 const int64_t* lens, int64_t lens_len, const int64_t* rows, int64_t rows_len, const int64_t* table,
                 int64_t table_len, int64_t blocks_per_row, int64_t blocks, int64_t B, int64_t H, int64_t KVH,
                 int64_t D, int64_t block_len, int64_t block_stride, int64_t head_stride, float scale, int threads) {
  const int status = check_decode_attention(q_len, kv_len, out_len, lens, lens_len, rows, rows_len, table, table_len,
                                            blocks_per_row, blocks, B, H, KVH, D, block_len, block_stride,
                                            head_stride);
  if (status != STATUS_OK) return status;
  if (D == 32)
    return decode_plain<Ops, 32>(q, k, v, out, lens, rows, table, blocks_per_row, B, H, KVH, block_len,
                                 block_stride, head_stride, scale, threads);
  if (D == 64)
    return decode_plain<Ops, 64>(q, k, v, out, lens, rows, table, blocks_per_row, B, H, KVH, block_len,
                                 block_stride, head_stride, scale, threads);
  return decode_plain<Ops, 128>(q, k, v, out, lens, rows, table, blocks_per_row, B, H, KVH, block_len, block_stride,
                                head_stride, scale, threads);
}

template <class Ops, int D>
int decode_int8(const uint16_t* q, const int8_t* k, const int8_t* v, const float* k_scales, const float* v_scales,
                uint16_t* out, const int64_t* lens, const int64_t* rows, const int64_t* table, int64_t blocks_per_row,
                int64_t B, int64_t H, int64_t KVH, int64_t block_len, int64_t block_stride, int64_t head_stride,
                int64_t scale_block_stride, int64_t scale_head_stride, float scale, int threads) {
  return decode<Ops, D>(q, out, lens, rows, B, H, KVH, scale, threads, [=](int64_t row, int64_t g) {
    const int64_t offset = g * head_stride, scales = g * scale_head_stride;
    const Int8Rows<D> at_head{k + offset, v + offset, k_scales + scales, v_scales + scales};
    return cache_row(at_head, table, row, blocks_per_row, block_len, block_stride, scale_block_stride);
  });
}

template <class Ops>
int decode_int8_entry(const uint16_t* q, int64_t q_len, const int8_t* k, const int8_t* v, int64_t kv_len,
                      const float* k_scales, const float* v_scales, int64_t scales_len, uint16_t* out,
                      int64_t out_len, const int64_t* lens, int64_t lens_len, const int64_t* rows, int64_t rows_len,
                      const int64_t* table, int64_t table_len, int64_t blocks_per_row, int64_t blocks, int64_t B,
                      int64_t H, int64_t KVH, int64_t D, int64_t block_len, int64_t block_stride,
                      int64_t head_stride, int64_t scale_block_stride, int64_t scale_head_stride, float scale,
                      int threads) {
  const int status = check_decode_attention_int8(q_len, kv_len, scales_len, out_len, lens, lens_len, rows, rows_len,
                                                 table, table_len, blocks_per_row, blocks, B, H, KVH, D, block_len,
                                                 block_stride, head_stride, scale_block_stride, scale_head_stride);
  if (status != STATUS_OK) return status;
  if (D == 32)
    return decode_int8<Ops, 32>(q, k, v, k_scales, v_scales, out, lens, rows, table, blocks_per_row, B, H, KVH,
                                block_len, block_stride, head_stride, scale_block_stride, scale_head_stride, scale,
                                threads);
  if (D == 64)
    return decode_int8<Ops, 64>(q, k, v, k_scales, v_scales, out, lens, rows, table, blocks_per_row, B, H, KVH,
                                block_len, block_stride, head_stride, scale_block_stride, scale_head_stride, scale,
                                threads);
  return decode_int8<Ops, 128>(q, k, v, k_scales, v_scales, out, lens, rows, table, blocks_per_row, B, H, KVH,
                               block_len, block_stride, head_stride, scale_block_stride, scale_head_stride, scale,
                               threads);
}

template <class Ops, int D, class T>
int prefill_plain(const T* q, const T* k, const T* v, T* out, const int64_t* table, int64_t block_stride,
                  int64_t start, int64_t len, int64_t H, int64_t KVH, int64_t max_len, int64_t head_stride,
                  float scale, int threads) {
  return prefill<Ops, D>(q, out, start, len, H, KVH, scale, threads, [=](int64_t g) {
    const PlainRows<T, D> at_head{k + g * head_stride, v + g * head_stride};
    return cache_row(at_head, table, 0, 0, max_len, block_stride, 0);
  });
}

template <class Ops, class T>
int prefill_entry(const T* q, int64_t q_len, const T* k, const T* v, int64_t kv_len, T* out, int64_t out_len,
                  const int64_t* table, int64_t table_len, int64_t blocks, int64_t block_stride, int64_t start,
                  int64_t len, int64_t H, int64_t KVH, int64_t D, int64_t max_len, int64_t head_stride, float scale,
                  int threads) {
  const int status = check_prefill_attention(q_len, kv_len, out_len, table, table_len, blocks, block_stride, start,
                                             len, H, KVH, D, max_len, head_stride);
  if (status != STATUS_OK) return status;
  if (len == 0) return STATUS_OK;
  if (D == 32)
    return prefill_plain<Ops, 32>(q, k, v, out, table, block_stride, start, len, H, KVH, max_len, head_stride, scale,
                                  threads);
  if (D == 64)
    return prefill_plain<Ops, 64>(q, k, v, out, table, block_stride, start, len, H, KVH, max_len, head_stride, scale,
                                  threads);
  return prefill_plain<Ops, 128>(q, k, v, out, table, block_stride, start, len, H, KVH, max_len, head_stride, scale,
                                 threads);
}

template <class Ops, int D>
int prefill_int8(const uint16_t* q, const int8_t* k, const int8_t* v, const float* k_scales, const float* v_scales,
                 uint16_t* out, const int64_t* table, int64_t block_stride, int64_t start, int64_t len, int64_t H,
                 int64_t KVH, int64_t max_len, int64_t head_stride, int64_t scale_block_stride,
                 int64_t scale_head_stride, float scale, int threads) {
  return prefill<Ops, D>(q, out, start, len, H, KVH, scale, threads, [=](int64_t g) {
    const int64_t offset = g * head_stride, scales = g * scale_head_stride;
    const Int8Rows<D> at_head{k + offset, v + offset, k_scales + scales, v_scales + scales};
    return cache_row(at_head, table, 0, 0, max_len, block_stride, scale_block_stride);
  });
}

template <class Ops>
int prefill_int8_entry(const uint16_t* q, int64_t q_len, const int8_t* k, const int8_t* v, int64_t kv_len,
                       const float* k_scales, const float* v_scales, int64_t scales_len, uint16_t* out,
                       int64_t out_len, const int64_t* table, int64_t table_len, int64_t blocks, int64_t block_stride,
                       int64_t start, int64_t len, int64_t H, int64_t KVH, int64_t D, int64_t max_len,
                       int64_t head_stride, int64_t scale_block_stride, int64_t scale_head_stride, float scale,
                       int threads) {
  const int status = check_prefill_attention_int8(q_len, kv_len, scales_len, out_len, table, table_len, blocks,
                                                  block_stride, start, len, H, KVH, D, max_len, head_stride,
                                                  scale_block_stride, scale_head_stride);
  if (status != STATUS_OK) return status;
  if (len == 0) return STATUS_OK;
  if (D == 32)
    return prefill_int8<Ops, 32>(q, k, v, k_scales, v_scales, out, table, block_stride, start, len, H, KVH, max_len,
                                 head_stride, scale_block_stride, scale_head_stride, scale, threads);
  if (D == 64)
    return prefill_int8<Ops, 64>(q, k, v, k_scales, v_scales, out, table, block_stride, start, len, H, KVH, max_len,
                                 head_stride, scale_block_stride, scale_head_stride, scale, threads);
  return prefill_int8<Ops, 128>(q, k, v, k_scales, v_scales, out, table, block_stride, start, len, H, KVH, max_len,
                                head_stride, scale_block_stride, scale_head_stride, scale, threads);
}

}  // namespace tiled

// The parameters of the attention entry points, and the call forwarding them, for T = uint16_t
// (bf16) and T = float: each variant defines the four entry points with these.
#define DECODE_ATTENTION_ARGS(T)                                                                           \
  const T *q, int64_t q_len, const T *k, const T *v, int64_t kv_len, T *out, int64_t out_len,                   \
      const int64_t *lens, int64_t lens_len, const int64_t *rows, int64_t rows_len, const int64_t *table,       \
      int64_t table_len, int64_t blocks_per_row, int64_t blocks, int64_t B, int64_t H, int64_t KVH, int64_t D, \
      int64_t block_len, int64_t block_stride, int64_t head_stride, float scale, int threads
#define DECODE_ATTENTION_CALL                                                                                \
  q, q_len, k, v, kv_len, out, out_len, lens, lens_len, rows, rows_len, table, table_len, blocks_per_row, blocks, \
      B, H, KVH, D, block_len, block_stride, head_stride, scale, threads
#define PREFILL_ATTENTION_ARGS(T)                                                                            \
  const T *q, int64_t q_len, const T *k, const T *v, int64_t kv_len, T *out, int64_t out_len,                     \
      const int64_t *table, int64_t table_len, int64_t blocks, int64_t block_stride, int64_t start, int64_t len, \
      int64_t H, int64_t KVH, int64_t D, int64_t max_len, int64_t head_stride, float scale, int threads
#define PREFILL_ATTENTION_CALL                                                                                   \
  q, q_len, k, v, kv_len, out, out_len, table, table_len, blocks, block_stride, start, len, H, KVH, D, max_len, \
      head_stride, scale, threads
#define DECODE_ATTENTION_INT8_ARGS                                                                          \
  const uint16_t *q, int64_t q_len, const int8_t *k, const int8_t *v, int64_t kv_len, const float *k_scales,   \
      const float *v_scales, int64_t scales_len, uint16_t *out, int64_t out_len, const int64_t *lens,          \
      int64_t lens_len, const int64_t *rows, int64_t rows_len, const int64_t *table, int64_t table_len,        \
      int64_t blocks_per_row, int64_t blocks, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t block_len, \
      int64_t block_stride, int64_t head_stride, int64_t scale_block_stride, int64_t scale_head_stride,        \
      float scale, int threads
#define DECODE_ATTENTION_INT8_CALL                                                                             \
  q, q_len, k, v, kv_len, k_scales, v_scales, scales_len, out, out_len, lens, lens_len, rows, rows_len, table,    \
      table_len, blocks_per_row, blocks, B, H, KVH, D, block_len, block_stride, head_stride, scale_block_stride, \
      scale_head_stride, scale, threads
#define PREFILL_ATTENTION_INT8_ARGS                                                                          \
  const uint16_t *q, int64_t q_len, const int8_t *k, const int8_t *v, int64_t kv_len, const float *k_scales,    \
      const float *v_scales, int64_t scales_len, uint16_t *out, int64_t out_len, const int64_t *table,          \
      int64_t table_len, int64_t blocks, int64_t block_stride, int64_t start, int64_t len, int64_t H,           \
      int64_t KVH, int64_t D, int64_t max_len, int64_t head_stride, int64_t scale_block_stride,                 \
      int64_t scale_head_stride, float scale, int threads
#define PREFILL_ATTENTION_INT8_CALL                                                                             \
  q, q_len, k, v, kv_len, k_scales, v_scales, scales_len, out, out_len, table, table_len, blocks, block_stride,  \
      start, len, H, KVH, D, max_len, head_stride, scale_block_stride, scale_head_stride, scale, threads
