// llmc's fused paged attention (see paged_attention.h): plain loops the compiler vectorizes
// (-O3 -march=native -ffast-math). A work item is one token's chunk of keys, all heads: a pool
// block's rows are contiguous ([B, KVH, D]), so each cached block is read as one stream with the next
// block prefetched (the pools are not in cache at a decode step; walking them per KV head with a
// stride was latency bound, ~4x slower at 145 tokens of context), and the chunks of a decode step's
// single token run on all threads, merged afterwards as in flash-decoding.
#include "paged_attention.h"
#include "amx_tiles.h"
#include "vec16.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace llmc {
namespace {

// The head size as a compile-time constant where the template has one (the loops then fully unroll).
template <int kD>
inline int64_t head_dim(const PagedAttentionArgs& a) { return kD > 0 ? kD : a.D; }

// x . y over kD values (a multiple of 16) or, with kD = 0, over D; y float or half.
template <int kD, typename T>
inline float dot(const float* __restrict x, const T* __restrict y, int64_t D) {
  if constexpr (kD > 0) {
    f32x16 acc = load16(x) * load16(y);
    for (int i = 16; i < kD; i += 16) acc += load16(x + i) * load16(y + i);
    float sum = 0.0f;
    for (int i = 0; i < 16; ++i) sum += acc[i];
    return sum;
  }
  float acc = 0.0f;
  for (int64_t i = 0; i < D; ++i) acc += x[i] * to_float(y[i]);
  return acc;
}

template <typename T>
inline void axpy(float* __restrict y, float w, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * to_float(x[i]);
}

// w[:n] = exp(w[:n] - peak); w has room for n rounded up to 16 (that padding is set to peak first, so
// every lane computes a defined value). Returns the sum.
inline float exp_shifted(float* w, int64_t n, float peak) {
  std::fill(w + n, w + (n + 15) / 16 * 16, peak);
  float sum = 0.0f;
  for (int64_t j = 0; j < n; j += 16) {
    store16(w + j, exp_nonpositive(load16(w + j) - peak));
    for (int64_t i = j; i < std::min(n, j + 16); ++i) sum += w[i];
  }
  return sum;
}

// out[:D] += sum_i w[i] * rows[i * stride :][:D], accumulated in registers when D is a constant.
template <int kD, typename T>
inline void weighted_sum(const float* __restrict w, const T* __restrict rows, int64_t stride, int64_t n,
                         int64_t D, float* __restrict out) {
  if constexpr (kD > 0) {
    f32x16 acc[kD / 16] = {};
    for (int64_t i = 0; i < n; ++i) {
      const f32x16 wi = f32x16{} + w[i];
      for (int v = 0; v < kD / 16; ++v) acc[v] += wi * load16(rows + i * stride + 16 * v);
    }
    for (int v = 0; v < kD / 16; ++v) store16(out + 16 * v, load16(out + 16 * v) + acc[v]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) axpy(out, w[i], rows + i * stride, D);
}

// The 16 lane sums of 16 vectors, as one vector, in a tree of shuffles (no serial horizontal sums).
// Lane i of the result is the sum of parts[kBitReversed[i]]: store key i's partial at kBitReversed[i].
constexpr int kBitReversed[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

inline f32x16 sum_lanes16(const f32x16* parts) {
  f32x16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {
    a[i] = __builtin_shufflevector(parts[2 * i], parts[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(parts[2 * i], parts[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  return __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

// Scores of the kG query heads of one KV head against n <= 16 cached keys (rows `stride` apart): each key
// is loaded once for the whole group. q: [kG, kD]; out: kG rows `out_stride` apart, n values each.
template <int kD, int kG, typename T>
inline void group_scores(const float* __restrict q, const T* __restrict keys, int64_t stride, int64_t n, float scale,
                         float* __restrict out, int64_t out_stride) {
  f32x16 parts[kG][16];
  for (int64_t i = 0; i < n; ++i) {
    f32x16 k[kD / 16];
    for (int v = 0; v < kD / 16; ++v) k[v] = load16(keys + i * stride + 16 * v);
    for (int j = 0; j < kG; ++j) {
      f32x16 acc = load16(q + j * kD) * k[0];
      for (int v = 1; v < kD / 16; ++v) acc += load16(q + j * kD + 16 * v) * k[v];
      parts[j][kBitReversed[i]] = acc;
    }
  }
  for (int j = 0; j < kG; ++j) {
    for (int64_t i = n; i < 16; ++i) parts[j][kBitReversed[i]] = f32x16{};
    alignas(64) float sums[16];
    store16(sums, sum_lanes16(parts[j]) * scale);
    std::memcpy(out + j * out_stride, sums, n * sizeof(float));
  }
}

// out[j][:kD] += sum_i w[j * w_stride + i] * values[i * stride][:kD] for the kG heads of one KV head:
// each value row is loaded once for the group, the sums stay in registers.
template <int kD, int kG, typename T>
inline void group_weighted_sum(const float* __restrict w, int64_t w_stride, const T* __restrict values, int64_t stride,
                               int64_t n, float* __restrict out, int64_t out_stride) {
  f32x16 acc[kG][kD / 16] = {};
  for (int64_t i = 0; i < n; ++i) {
    f32x16 v[kD / 16];
    for (int d = 0; d < kD / 16; ++d) v[d] = load16(values + i * stride + 16 * d);
    for (int j = 0; j < kG; ++j) {
      const f32x16 wi = f32x16{} + w[j * w_stride + i];
      for (int d = 0; d < kD / 16; ++d) acc[j][d] += wi * v[d];
    }
  }
  for (int j = 0; j < kG; ++j) {
    for (int d = 0; d < kD / 16; ++d) store16(out + j * out_stride + 16 * d, load16(out + j * out_stride + 16 * d) + acc[j][d]);
  }
}

// Rotate-half RoPE of `heads` vectors of length D: out = x * cos + rotate_half(x) * sin.
void rope(const float* x, const float* cos, const float* sin, int64_t heads, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h, x += D, out += D) {
    for (int64_t i = 0; i < half; ++i) {
      out[i] = x[i] * cos[i] - x[i + half] * sin[i];
      out[i + half] = x[i + half] * cos[i] + x[i] * sin[i];
    }
  }
}

// Calls fn(rows, first, n) for sequence s's cached tokens [begin, end), a run of contiguous pool rows at a
// time: n token rows [n, KVH*D] for tokens first .. first+n-1 (a block or part of one). Prefetches (into
// L2) the next run while fn runs and, when `also` is given (the key pass names the value pool), the
// same rows of that pool for the pass after.
template <typename T, typename Fn>
inline void for_each_cached_run(const PagedAttentionArgs& a, const T* pool, int64_t s, int64_t begin, int64_t end,
                                Fn fn, const T* also = nullptr) {
  constexpr int64_t kLine = 64 / sizeof(T);  // values per cache line
  const int64_t row = a.KVH * a.D;
  const int32_t* table = a.cached_tables + s * a.Mc;
  for (int64_t first = begin; first < end;) {
    const int64_t block = first / a.B, slot = first % a.B, n = std::min(a.B - slot, end - first);
    if (first + n < end) {
      const T* next = pool + table[block + 1] * a.B * row;
      const int64_t count = std::min(a.B, end - first - n) * row;
      for (int64_t i = 0; i < count; i += kLine) __builtin_prefetch(next + i, 0, 1);
    }
    if (also != nullptr) {
      const T* cur = also + (table[block] * a.B + slot) * row;
      for (int64_t i = 0; i < n * row; i += kLine) __builtin_prefetch(cur + i, 0, 1);
    }
    fn(pool + (table[block] * a.B + slot) * row, first, n);
    first += n;
  }
}

}  // namespace

const char* validate(const PagedAttentionArgs& a) {
  if (a.H % a.KVH != 0 || a.D % 2 != 0 || a.D > kMaxHeadDim) {
    return "num_heads must be a multiple of kv_num_heads, head_dim even and at most 256";
  }
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t s = a.token_index[2 * t], r = a.token_index[2 * t + 1];
    if (s < 0 || s >= a.S || r < 0 || r >= a.Qmax) return "token_index out of range";
  }
  for (int64_t i = 0; i < a.S * a.Qmax; ++i) {
    if (a.query_index[i] < 0 || a.query_index[i] >= a.T) return "query_index out of range";
    if (a.query_positions[i] < 0 || a.query_positions[i] >= a.P) return "a position is beyond the RoPE table";
  }
  for (int64_t s = 0; s < a.S; ++s) {
    const int64_t cached = a.query_positions[s * a.Qmax];
    const int64_t blocks = (cached + a.B - 1) / a.B;
    if (blocks > a.Mc) return "a sequence's cached tokens exceed its block table";
    for (int64_t b = 0; b < blocks; ++b) {
      const int32_t block = a.cached_tables[s * a.Mc + b];
      if (block < 0 || block >= a.NB) return "a block table entry is outside the KV pool";
    }
  }
  return nullptr;
}

void rotate_all(const PagedAttentionArgs& a) {
  const int64_t half = a.D / 2;
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t s = a.token_index[2 * t], r = a.token_index[2 * t + 1];
    const int64_t pos = a.query_positions[s * a.Qmax + r];
    const float* cos = a.rope_cos + pos * half;
    const float* sin = a.rope_sin + pos * half;
    rope(a.q + t * a.H * a.D, cos, sin, a.H, a.D, a.q_rotated + t * a.H * a.D);
    rope(a.k + t * a.KVH * a.D, cos, sin, a.KVH, a.D, a.k_rotated + t * a.KVH * a.D);
  }
  if (!a.int8_pools) return;
  // q . (code * k_scale) = (q * k_scale) . code: the cached int8 keys need no dequantization.
  const int64_t group = a.H / a.KVH;
  for (int64_t t = 0; t < a.T; ++t) {
    for (int64_t h = 0; h < a.H; ++h) {
      const float* q = a.q_rotated + (t * a.H + h) * a.D;
      const float* scale = a.k_scale + (h / group) * a.D;
      float* out = a.q_scaled + (t * a.H + h) * a.D;
      for (int64_t d = 0; d < a.D; ++d) out[d] = q[d] * scale[d];
    }
  }
}

WorkSplit split_work(const PagedAttentionArgs& a) {
  WorkSplit split;
  std::vector<int64_t> rows(a.S, 0);  // each sequence's rows in this step
  for (int64_t t = 0; t < a.T; ++t) ++rows[a.token_index[2 * t]];
  int64_t longest = 0;  // keys of the longest chunked token
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t s = a.token_index[2 * t];
    if (rows[s] >= kTile) continue;
    split.chunked_tokens.push_back(t);
    longest = std::max(longest, a.query_positions[s * a.Qmax] + a.token_index[2 * t + 1] + 1);
  }
  for (int64_t s = 0; s < a.S; ++s) {
    for (int64_t r0 = 0; rows[s] >= kTile && r0 < rows[s]; r0 += kTile) {
      split.tiles.insert(split.tiles.end(), {s, r0, std::min(kTile, rows[s] - r0)});
    }
  }
  const bool bf16 = a.bf16_tiles && !split.tiles.empty() && a.D % 32 == 0;
  split.bf16_vectors = bf16 && !amx_usable() && avx512_bf16_usable();
  split.bf16_tiles = bf16 && (amx_usable() || split.bf16_vectors);
  for (int64_t s = 0; split.bf16_tiles && s < a.S; ++s) {
    if (rows[s] >= kTile) split.packed_sequences.push_back(s);
  }
  if (split.bf16_tiles) split.bf16_keys.resize(a.S);
  split.step_rows = std::move(rows);
  split.chunks = (longest + kChunk - 1) / kChunk;
  split.partials.resize(split.chunked_tokens.size() * split.chunks * a.H * (a.D + 2));
  return split;
}

// kG > 0 (with kD > 0): the query heads per KV head as a constant, cached keys and values read once per group.
template <int kD, int kG, typename T>
void attend_chunk_d(const PagedAttentionArgs& a, int64_t t, int64_t c, float* partial) {
  const T* k_pool = static_cast<const T*>(a.k_pool);
  const T* v_pool = static_cast<const T*>(a.v_pool);
  const int64_t D = head_dim<kD>(a), H = a.H, group = a.H / a.KVH, row = a.KVH * D;
  const int64_t s = a.token_index[2 * t], r = a.token_index[2 * t + 1];
  const int64_t cached = a.query_positions[s * a.Qmax];  // row 0 sits right after the cached tokens
  const int64_t total = cached + r + 1;                   // keys: cached tokens, then the step's rows 0..r
  const int64_t begin = c * kChunk, end = std::min(total, begin + kChunk), n = end - begin;
  const float* q = a.q_rotated + t * H * D;          // [H, D]
  // [H, D]: the queries the cached keys meet (int8 pools: scaled by the keys' channel scales)
  const float* q_cached = std::is_same_v<T, int8_t> ? a.q_scaled + t * H * D : q;
  const int64_t* rows = a.query_index + s * a.Qmax;  // step token of each row
  // partial: [H, D + 2]
  if (n <= 0) {  // past this token's keys: contributes nothing
    for (int64_t h = 0; h < H; ++h) partial[h * (D + 2) + D + 1] = 0.0f;
    return;
  }

  thread_local std::vector<float> scores_buffer;
  scores_buffer.resize(H * kChunk);
  float* scores = scores_buffer.data();  // [H, kChunk]: row h's first n
  const int64_t cached_end = std::min(end, cached);
  for_each_cached_run(a, k_pool, s, begin, cached_end, [&](const T* keys, int64_t first, int64_t m) {
    if constexpr (kD > 0 && kG > 0) {
      for (int64_t g = 0; g < a.KVH; ++g) {
        for (int64_t i = 0; i < m; i += 16) {
          group_scores<kD, kG, T>(q_cached + g * kG * kD, keys + i * row + g * kD, row, std::min<int64_t>(16, m - i), a.scale,
                                  scores + g * kG * kChunk + (first - begin) + i, kChunk);
        }
      }
      return;
    }
    for (int64_t h = 0; h < H; ++h) {
      const T* key = keys + (h / group) * D;
      float* out = scores + h * kChunk + (first - begin);
      for (int64_t i = 0; i < m; ++i) out[i] = dot<kD, T>(q_cached + h * D, key + i * row, D) * a.scale;
    }
  }, v_pool);
  for (int64_t j = std::max(begin, cached); j < end; ++j) {
    const float* key = a.k_rotated + rows[j - cached] * row;
    for (int64_t h = 0; h < H; ++h) {
      scores[h * kChunk + j - begin] = dot<kD, float>(q + h * D, key + (h / group) * D, D) * a.scale;
    }
  }
  for (int64_t h = 0; h < H; ++h) {  // exp relative to the chunk's maximum; merge_chunks rescales
    float* w = scores + h * kChunk;
    const float peak = *std::max_element(w, w + n);
    const float sum = exp_shifted(w, n, peak);
    partial[h * (D + 2) + D] = peak;
    partial[h * (D + 2) + D + 1] = sum;
    std::fill(partial + h * (D + 2), partial + h * (D + 2) + D, 0.0f);
  }

  for_each_cached_run(a, v_pool, s, begin, cached_end, [&](const T* values, int64_t first, int64_t m) {
    if constexpr (kD > 0 && kG > 0) {
      for (int64_t g = 0; g < a.KVH; ++g) {
        group_weighted_sum<kD, kG, T>(scores + g * kG * kChunk + (first - begin), kChunk, values + g * kD, row, m,
                                      partial + g * kG * (D + 2), D + 2);
      }
      return;
    }
    for (int64_t h = 0; h < H; ++h) {
      weighted_sum<kD, T>(scores + h * kChunk + (first - begin), values + (h / group) * D, row, m, D,
                          partial + h * (D + 2));
    }
  });
  if (std::is_same_v<T, int8_t> && cached_end > begin) {  // sum_i w_i code_i * v_scale = v_scale * sum_i w_i code_i
    for (int64_t h = 0; h < H; ++h) {
      const float* scale = a.v_scale + (h / group) * D;
      for (int64_t d = 0; d < D; ++d) partial[h * (D + 2) + d] *= scale[d];
    }
  }
  for (int64_t j = std::max(begin, cached); j < end; ++j) {
    const float* value = a.v + rows[j - cached] * row;
    for (int64_t h = 0; h < H; ++h) {
      axpy(partial + h * (D + 2), scores[h * kChunk + j - begin], value + (h / group) * D, D);
    }
  }
}

template <int kD, typename T>
void attend_chunk_g(const PagedAttentionArgs& a, int64_t t, int64_t c, float* partial) {
  switch (a.H / a.KVH) {
    case 1: return attend_chunk_d<kD, 1, T>(a, t, c, partial);
    case 2: return attend_chunk_d<kD, 2, T>(a, t, c, partial);
    case 3: return attend_chunk_d<kD, 3, T>(a, t, c, partial);
    case 4: return attend_chunk_d<kD, 4, T>(a, t, c, partial);
    default: return attend_chunk_d<kD, 0, T>(a, t, c, partial);
  }
}

template <typename T>
void attend_chunk_t(const PagedAttentionArgs& a, int64_t t, int64_t c, float* partial) {
  switch (a.D) {
    case 64: return attend_chunk_g<64, T>(a, t, c, partial);
    case 128: return attend_chunk_g<128, T>(a, t, c, partial);
    default: return attend_chunk_d<0, 0, T>(a, t, c, partial);
  }
}

void run_item(const PagedAttentionArgs& a, WorkSplit& split, int64_t item) {
  const int64_t chunk_items = int64_t(split.chunked_tokens.size()) * split.chunks;
  if (item >= chunk_items) {
    const int64_t* tile = split.tiles.data() + 3 * (item - chunk_items);
    if (split.bf16_tiles) return attend_tile_bf16(a, split, tile[0], tile[1], tile[2]);
    return attend_tile(a, tile[0], tile[1], tile[2]);
  }
  const int64_t t = split.chunked_tokens[item / split.chunks], c = item % split.chunks;
  float* partial = split.partials.data() + item * a.H * (a.D + 2);
  return by_pool_type(a, [&](auto element) { attend_chunk_t<decltype(element)>(a, t, c, partial); });
}

void merge_chunks(const PagedAttentionArgs& a, const WorkSplit& split) {
  const int64_t D = a.D, chunks = split.chunks, stride = D + 2;
  for (size_t index = 0; index < split.chunked_tokens.size(); ++index) {
    const int64_t t = split.chunked_tokens[index];
    for (int64_t h = 0; h < a.H; ++h) {
      const float* first = split.partials.data() + (index * chunks * a.H + h) * stride;  // chunk c: + c * H * stride
      float peak = -3.0e38f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* p = first + c * a.H * stride;
        if (p[D + 1] > 0.0f) peak = std::max(peak, p[D]);
      }
      float* out = a.out + (t * a.H + h) * D;
      std::fill(out, out + D, 0.0f);
      float sum = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* p = first + c * a.H * stride;
        if (p[D + 1] <= 0.0f) continue;
        const float w = exp_nonpositive(f32x16{} + (p[D] - peak))[0];
        sum += w * p[D + 1];
        axpy(out, w, p, D);
      }
      const float inv = 1.0f / sum;
      for (int64_t i = 0; i < D; ++i) out[i] *= inv;
    }
  }
}

}  // namespace llmc
