// llmc's fused paged attention (see paged_attention.h): plain loops the compiler vectorizes
// (-O3 -march=native -ffast-math), one work item per token. A pool block's rows are contiguous
// ([B, KVH, D]), so each cached block is read as one stream, all heads at once, with the next block
// prefetched: the pools are not in cache at a decode step, and walking them per KV head with a stride
// was latency bound (~4x slower at 145 tokens of context).
#include "paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace llmc {
namespace {

// The head size as a compile-time constant where the template has one (the loops then fully unroll).
template <int kD>
inline int64_t head_dim(const PagedAttentionArgs& a) { return kD > 0 ? kD : a.D; }

inline float dot(const float* __restrict x, const float* __restrict y, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += x[i] * y[i];
  return acc;
}

inline void axpy(float* __restrict y, float w, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// exp(x) for x <= 0 (softmax after subtracting the maximum), ~1e-7 relative error; plain arithmetic so
// that loops over it vectorize without a vector math library. exp(x) = 2^n * 2^f, n = round(x log2 e),
// |f| <= 1/2, 2^f by its Taylor series to degree 6.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504f;
  const float n = std::floor(t + 0.5f);
  const float f = (t - n) * 0.693147181f;  // 2^(t-n) = e^f, |f| <= ln2 / 2
  float p = 1.0f / 720;
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
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

constexpr int64_t kMaxHeadDim = 256;

// Calls fn(rows, first, n) for each of sequence s's cached blocks: n token rows [n, KVH*D] of the pool holding
// its cached tokens first .. first+n-1 (contiguous memory), prefetching the next block while fn runs.
template <typename Fn>
inline void for_each_cached_block(const PagedAttentionArgs& a, const float* pool, int64_t s, int64_t cached, Fn fn) {
  const int64_t row = a.KVH * a.D;
  const int32_t* table = a.cached_tables + s * a.Mc;
  for (int64_t first = 0; first < cached; first += a.B) {
    if (first + a.B < cached) {
      const float* next = pool + table[first / a.B + 1] * a.B * row;
      const int64_t floats = std::min(a.B, cached - first - a.B) * row;
      for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(next + i);
    }
    fn(pool + table[first / a.B] * a.B * row, first, std::min(a.B, cached - first));
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

template <int kD>
void attend_token(const PagedAttentionArgs& a, int64_t t) {
  const int64_t D = head_dim<kD>(a), H = a.H, group = a.H / a.KVH, row = a.KVH * D;
  const int64_t s = a.token_index[2 * t], r = a.token_index[2 * t + 1];
  const int64_t cached = a.query_positions[s * a.Qmax];  // row 0 sits right after the cached tokens
  const int64_t total = cached + r + 1;                   // cached keys, then the step's rows 0..r
  const float* q = a.q_rotated + t * H * D;               // [H, D]
  const int64_t* rows = a.query_index + s * a.Qmax;       // step token of each row

  thread_local std::vector<float> scores;  // [H, total]
  scores.resize(H * total);
  for_each_cached_block(a, a.k_pool, s, cached, [&](const float* keys, int64_t first, int64_t n) {
    for (int64_t h = 0; h < H; ++h) {
      const float* key = keys + (h / group) * D;
      float* out = scores.data() + h * total + first;
      for (int64_t i = 0; i < n; ++i) out[i] = dot(q + h * D, key + i * row, D) * a.scale;
    }
  });
  for (int64_t i = 0; i <= r; ++i) {
    const float* key = a.k_rotated + rows[i] * row;
    for (int64_t h = 0; h < H; ++h) scores[h * total + cached + i] = dot(q + h * D, key + (h / group) * D, D) * a.scale;
  }
  for (int64_t h = 0; h < H; ++h) {  // softmax over each head's row
    float* w = scores.data() + h * total;
    const float peak = *std::max_element(w, w + total);
    float sum = 0.0f;
    for (int64_t j = 0; j < total; ++j) sum += (w[j] = exp_nonpositive(w[j] - peak));
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < total; ++j) w[j] *= inv;
  }

  float* out = a.out + t * H * D;  // [H, D]
  std::fill(out, out + H * D, 0.0f);
  float acc[kD > 0 ? kD : kMaxHeadDim];
  for_each_cached_block(a, a.v_pool, s, cached, [&](const float* values, int64_t first, int64_t n) {
    for (int64_t h = 0; h < H; ++h) {
      const float* value = values + (h / group) * D;
      const float* w = scores.data() + h * total + first;
      std::fill(acc, acc + D, 0.0f);
      for (int64_t i = 0; i < n; ++i) axpy(acc, w[i], value + i * row, D);
      axpy(out + h * D, 1.0f, acc, D);
    }
  });
  for (int64_t i = 0; i <= r; ++i) {
    const float* value = a.v + rows[i] * row;
    for (int64_t h = 0; h < H; ++h) axpy(out + h * D, scores[h * total + cached + i], value + (h / group) * D, D);
  }
}

void attend(const PagedAttentionArgs& a, int64_t t) {
  switch (a.D) {
    case 64: return attend_token<64>(a, t);
    case 128: return attend_token<128>(a, t);
    default: return attend_token<0>(a, t);
  }
}

}  // namespace llmc
