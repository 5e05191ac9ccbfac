// Prefill tiles of llmc's fused paged attention (see paged_attention.h): kTile consecutive rows of one
// sequence attend together, one 16-lane vector per (key, head) holding the tile's 16 scores, so a
// key is read once per tile and no dot product needs a horizontal sum. The outputs are kept the same
// way, transposed (one vector of 16 rows per head and dimension): P.V is then the same broadcast-FMA
// loop as Q.K, its sums in registers. Keys stream in chunks of kChunk with an online softmax (running
// maximum and sum per row), flash-attention style.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "paged_attention.h"
#include "vec16.h"

namespace llmc {
namespace {

static_assert(kTile == 16, "a tile is one 16-lane vector of rows");

// The tile's running state: per head, 16 lanes (rows) of maximum, sum and outputs.
struct TileState {
  int64_t H, D;
  std::vector<f32x16> peak, sum;  // [H]
  std::vector<f32x16> acc;        // [H, D]: the tile's outputs, transposed (lane = row)
  std::vector<f32x16> qt;         // [H, D]: the tile's rotated queries, transposed (lane = row)
  std::vector<f32x16> scores;     // [kChunk, H]
};

// One chunk of n keys/values (rows of KVH * D floats) at key indices first.., for all heads.
void attend_keys(const PagedAttentionArgs& a, TileState& st, const float* const* keys, const float* const* values,
                 int64_t n, int64_t first, int64_t last_key_of_row0, int64_t rows) {
  const int64_t H = st.H, D = st.D, group = a.H / a.KVH;
  f32x16 lane{};
  for (int i = 0; i < 16; ++i) lane[i] = static_cast<float>(i);
  // Scores kKeys keys at a time: independent accumulator chains (one chain per key and head was bound by
  // the FMA latency, ~4x slower), each query vector loaded once for them.
  constexpr int64_t kKeys = 8;
  for (int64_t j0 = 0; j0 < n; j0 += kKeys) {
    const int64_t m = std::min(kKeys, n - j0);
    i32x16 allowed[kKeys];  // row i sees keys up to last_key_of_row0 + i; lanes past the tile's rows see none
    for (int64_t j = 0; j < m; ++j) {
      allowed[j] = (lane >= static_cast<float>(first + j0 + j - last_key_of_row0)) & (lane < static_cast<float>(rows));
    }
    for (int64_t h = 0; h < H; ++h) {
      const f32x16* q = st.qt.data() + h * D;
      const float* key[kKeys];
      for (int64_t j = 0; j < kKeys; ++j) key[j] = keys[j0 + std::min(j, m - 1)] + (h / group) * D;
      f32x16 s[kKeys] = {};
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t j = 0; j < kKeys; ++j) s[j] += q[d] * key[j][d];
      }
      for (int64_t j = 0; j < m; ++j) st.scores[(j0 + j) * H + h] = allowed[j] ? s[j] * a.scale : f32x16{} - 3.0e38f;
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    f32x16 chunk_peak = st.peak[h];
    for (int64_t j = 0; j < n; ++j) chunk_peak = chunk_peak > st.scores[j * H + h] ? chunk_peak : st.scores[j * H + h];
    const f32x16 rescale = exp_nonpositive(st.peak[h] - chunk_peak);
    st.peak[h] = chunk_peak;
    st.sum[h] *= rescale;
    f32x16* acc = st.acc.data() + h * D;
    for (int64_t d = 0; d < D; ++d) acc[d] *= rescale;
    for (int64_t j = 0; j < n; ++j) {
      const f32x16 p = exp_nonpositive(st.scores[j * H + h] - chunk_peak);
      st.scores[j * H + h] = p;
      st.sum[h] += p;
    }
  }
  for (int64_t h = 0; h < H; ++h) {  // acc[h][d] += p_j * v_j[d], 16 dimensions at a time in registers
    f32x16* acc = st.acc.data() + h * D;
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      if (D - d0 >= 16) {
        f32x16 sums[16];
        for (int dd = 0; dd < 16; ++dd) sums[dd] = acc[d0 + dd];
        for (int64_t j = 0; j < n; ++j) {
          const float* value = values[j] + (h / group) * D + d0;
          const f32x16 p = st.scores[j * H + h];
          for (int dd = 0; dd < 16; ++dd) sums[dd] += p * value[dd];
        }
        for (int dd = 0; dd < 16; ++dd) acc[d0 + dd] = sums[dd];
        continue;
      }
      for (int64_t j = 0; j < n; ++j) {  // a head size that is not a multiple of 16: the tail
        const float* value = values[j] + (h / group) * D;
        for (int64_t d = d0; d < D; ++d) acc[d] += st.scores[j * H + h] * value[d];
      }
    }
  }
}

template <typename T>
void attend_tile_t(const PagedAttentionArgs& a, int64_t s, int64_t r0, int64_t rows) {
  const int64_t H = a.H, D = a.D, row = a.KVH * D;
  const int64_t cached = a.query_positions[s * a.Qmax];
  const int64_t* tokens = a.query_index + s * a.Qmax;  // step token of each row
  const int64_t last_key_of_row0 = cached + r0, total = cached + r0 + rows;  // keys [0, total)
  TileState st{H, D, std::vector<f32x16>(H, f32x16{} - 3.0e38f), std::vector<f32x16>(H, f32x16{}),
               std::vector<f32x16>(H * D, f32x16{}), std::vector<f32x16>(H * D, f32x16{}),
               std::vector<f32x16>(kChunk * H)};
  for (int64_t i = 0; i < rows; ++i) {
    const float* q = a.q_rotated + tokens[r0 + i] * H * D;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < D; ++d) st.qt[h * D + d][i] = q[h * D + d];
    }
  }
  const T* k_pool = static_cast<const T*>(a.k_pool);
  const T* v_pool = static_cast<const T*>(a.v_pool);
  const int32_t* table = a.cached_tables + s * a.Mc;
  const float* keys[kChunk];
  const float* values[kChunk];
  std::vector<float> converted(std::is_same_v<T, float> ? 0 : 2 * kChunk * row);  // half or int8 rows as floats
  for (int64_t first = 0; first < cached; first += kChunk) {  // cached keys, from the pools
    const int64_t n = std::min(kChunk, cached - first);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t slot = table[(first + j) / a.B] * a.B + (first + j) % a.B;
      if constexpr (std::is_same_v<T, float>) {
        keys[j] = k_pool + slot * row;
        values[j] = v_pool + slot * row;
      } else {
        float* k = converted.data() + j * row;
        float* v = converted.data() + (kChunk + j) * row;
        row_to_float(k_pool + slot * row, a.k_scale, k, row);
        row_to_float(v_pool + slot * row, a.v_scale, v, row);
        keys[j] = k;
        values[j] = v;
      }
    }
    attend_keys(a, st, keys, values, n, first, last_key_of_row0, rows);
  }
  for (int64_t first = cached; first < total; first += kChunk) {  // the step's own keys
    const int64_t n = std::min(kChunk, total - first);
    for (int64_t j = 0; j < n; ++j) {
      keys[j] = a.k_rotated + tokens[first + j - cached] * row;
      values[j] = a.v + tokens[first + j - cached] * row;
    }
    attend_keys(a, st, keys, values, n, first, last_key_of_row0, rows);
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* out = a.out + tokens[r0 + i] * H * D;
    for (int64_t h = 0; h < H; ++h) {
      const float inv = 1.0f / st.sum[h][i];
      const f32x16* acc = st.acc.data() + h * D;
      for (int64_t d = 0; d < D; ++d) out[h * D + d] = acc[d][i] * inv;
    }
  }
}

}  // namespace

void attend_tile(const PagedAttentionArgs& a, int64_t s, int64_t r0, int64_t rows) {
  return by_pool_type(a, [&](auto element) { attend_tile_t<decltype(element)>(a, s, r0, rows); });
}

}  // namespace llmc
