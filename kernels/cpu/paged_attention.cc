// llmc's fused paged attention (see paged_attention.h): plain loops the compiler vectorizes
// (-O3 -march=native -ffast-math). A work item is one token's chunk of keys, all heads: a pool
// block's rows are contiguous ([B, KVH, D]), so each cached block is read as one stream with the next
// block prefetched (the pools are not in cache at a decode step; walking them per KV head with a
// stride was latency bound, ~4x slower at 145 tokens of context), and the chunks of a decode step's
// single token run on all threads, merged afterwards as in flash-decoding.
#include "paged_attention.h"
#include "vec16.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace llmc {
namespace {

constexpr int64_t kMaxHeadDim = 256;

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
}

StepPlan plan_step(const PagedAttentionArgs& a) {
  StepPlan plan;
  std::vector<int64_t> rows(a.S, 0);  // each sequence's rows in this step
  for (int64_t t = 0; t < a.T; ++t) ++rows[a.token_index[2 * t]];
  int64_t longest = 0;  // keys of the longest chunked token
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t s = a.token_index[2 * t];
    if (rows[s] >= kTile) continue;
    plan.chunked_tokens.push_back(t);
    longest = std::max(longest, a.query_positions[s * a.Qmax] + a.token_index[2 * t + 1] + 1);
  }
  for (int64_t s = 0; s < a.S; ++s) {
    for (int64_t r0 = 0; rows[s] >= kTile && r0 < rows[s]; r0 += kTile) {
      plan.tiles.insert(plan.tiles.end(), {s, r0, std::min(kTile, rows[s] - r0)});
    }
  }
  plan.chunks = (longest + kChunk - 1) / kChunk;
  plan.partials.resize(plan.chunked_tokens.size() * plan.chunks * a.H * (a.D + 2));
  return plan;
}

template <int kD, typename T>
void attend_chunk_d(const PagedAttentionArgs& a, int64_t t, int64_t c, float* partial) {
  const T* k_pool = static_cast<const T*>(a.k_pool);
  const T* v_pool = static_cast<const T*>(a.v_pool);
  const int64_t D = head_dim<kD>(a), H = a.H, group = a.H / a.KVH, row = a.KVH * D;
  const int64_t s = a.token_index[2 * t], r = a.token_index[2 * t + 1];
  const int64_t cached = a.query_positions[s * a.Qmax];  // row 0 sits right after the cached tokens
  const int64_t total = cached + r + 1;                   // keys: cached tokens, then the step's rows 0..r
  const int64_t begin = c * kChunk, end = std::min(total, begin + kChunk), n = end - begin;
  const float* q = a.q_rotated + t * H * D;          // [H, D]
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
    for (int64_t h = 0; h < H; ++h) {
      const T* key = keys + (h / group) * D;
      float* out = scores + h * kChunk + (first - begin);
      for (int64_t i = 0; i < m; ++i) out[i] = dot<kD, T>(q + h * D, key + i * row, D) * a.scale;
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
    for (int64_t h = 0; h < H; ++h) {
      weighted_sum<kD, T>(scores + h * kChunk + (first - begin), values + (h / group) * D, row, m, D,
                          partial + h * (D + 2));
    }
  });
  for (int64_t j = std::max(begin, cached); j < end; ++j) {
    const float* value = a.v + rows[j - cached] * row;
    for (int64_t h = 0; h < H; ++h) {
      axpy(partial + h * (D + 2), scores[h * kChunk + j - begin], value + (h / group) * D, D);
    }
  }
}

template <typename T>
void attend_chunk_t(const PagedAttentionArgs& a, int64_t t, int64_t c, float* partial) {
  switch (a.D) {
    case 64: return attend_chunk_d<64, T>(a, t, c, partial);
    case 128: return attend_chunk_d<128, T>(a, t, c, partial);
    default: return attend_chunk_d<0, T>(a, t, c, partial);
  }
}

void run_item(const PagedAttentionArgs& a, StepPlan& plan, int64_t item) {
  const int64_t chunk_items = int64_t(plan.chunked_tokens.size()) * plan.chunks;
  if (item >= chunk_items) {
    const int64_t* tile = plan.tiles.data() + 3 * (item - chunk_items);
    return attend_tile(a, tile[0], tile[1], tile[2]);
  }
  const int64_t t = plan.chunked_tokens[item / plan.chunks], c = item % plan.chunks;
  float* partial = plan.partials.data() + item * a.H * (a.D + 2);
  return a.half_pools ? attend_chunk_t<uint16_t>(a, t, c, partial) : attend_chunk_t<float>(a, t, c, partial);
}

void merge_chunks(const PagedAttentionArgs& a, const StepPlan& plan) {
  const int64_t D = a.D, chunks = plan.chunks, stride = D + 2;
  for (size_t index = 0; index < plan.chunked_tokens.size(); ++index) {
    const int64_t t = plan.chunked_tokens[index];
    for (int64_t h = 0; h < a.H; ++h) {
      const float* first = plan.partials.data() + (index * chunks * a.H + h) * stride;  // chunk c: + c * H * stride
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
