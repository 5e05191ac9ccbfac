// The int4 GEMV of llmc.Int4Linear (int4_linear.h) on AVX-512 VNNI.
#include "int4_linear.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "int8_linear.h"  // avx512_vnni_usable
#include "vec16.h"

namespace llmc {
namespace {

constexpr int64_t kOctetBytes = 64;  // 16 columns x 8 channels of nibbles

inline int32_t load4(const int8_t* bytes) {
  int32_t value;
  std::memcpy(&value, bytes, sizeof(value));
  return value;
}

__attribute__((target("avx512f"))) uint16_t float_to_half(float value) {
  return static_cast<uint16_t>(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(value), _MM_FROUND_TO_NEAREST_INT), 0));
}

// The weight column behind column c of tile t.
int64_t tile_column(const PackedInt4& w, int64_t t, int64_t c) {
  if (!w.glu) return t * kInt4Tile + c;
  return (t % 2 ? w.N / 2 : 0) + t / 2 * kInt4Tile + c;
}

// out[r] = y[m0 + r, tile t's 16 columns] for r < R. Two int32 accumulators a row (the low and the high
// nibbles): two chains of VPDPBUSD instead of one, for a single row's latency.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void tile_rows(const PackedInt4& w, int64_t t,
                                                                            const Int4Activations& act, int64_t m0,
                                                                            __m512* out) {
  const int64_t K = w.K, num_blocks = K / kInt4Block, num_groups = w.num_groups, per_group = w.group / kInt4Block;
  const uint8_t* codes = w.codes.data() + t * (K / 8) * kOctetBytes;
  const uint16_t* scale = w.scale.data() + t * num_groups * kInt4Tile;
  const uint16_t* offset = w.offset.data() + t * num_groups * kInt4Tile;
  const int8_t* xq = act.xq + m0 * K;
  const float* a = act.a + m0 * num_blocks;
  const float* xsum = act.xsum + m0 * num_groups;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < num_groups; ++g) {
    __m512 sums[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) sums[r] = _mm512_setzero_ps();
    const int64_t b_end = std::min(num_blocks, (g + 1) * per_group);
    for (int64_t b = g * per_group; b < b_end; ++b) {
      __m512i low[R], high[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) low[r] = high[r] = _mm512_setzero_si512();
      const uint8_t* block = codes + b * 4 * kOctetBytes;  // 32 channels: 4 octets
#pragma GCC unroll 4
      for (int o = 0; o < 4; ++o) {
        const __m512i v = _mm512_load_si512(block + o * kOctetBytes);
        const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const int8_t* x = xq + r * K + b * kInt4Block + 8 * o;
          low[r] = _mm512_dpbusd_epi32(low[r], lo, _mm512_set1_epi32(load4(x)));
          high[r] = _mm512_dpbusd_epi32(high[r], hi, _mm512_set1_epi32(load4(x + 4)));
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(low[r], high[r]));
        sums[r] = _mm512_fmadd_ps(dot, _mm512_set1_ps(a[r * num_blocks + b]), sums[r]);
      }
    }
    const __m512 s = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(scale + g * kInt4Tile)));
    const __m512 off = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(offset + g * kInt4Tile)));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      out[r] = _mm512_fmadd_ps(sums[r], s, _mm512_fmadd_ps(off, _mm512_set1_ps(xsum[r * num_groups + g]), out[r]));
    }
  }
}

// y's rows [m0, m0 + R) at tile t (or, with glu, tiles t and t + 1 as silu(gate) * up).
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void store_rows(const PackedInt4& w, const Int4Activations& act,
                                                                       int64_t m0, int64_t t, float* y) {
  __m512 out[R];
  tile_rows<R>(w, t, act, m0, out);
  if (w.glu) {
    __m512 up[R];
    tile_rows<R>(w, t + 1, act, m0, up);
    const int64_t width = w.N / 2;
    for (int r = 0; r < R; ++r) {
      const f32x16 v = silu_mul(reinterpret_cast<f32x16>(out[r]), reinterpret_cast<f32x16>(up[r]));
      _mm512_storeu_ps(y + (m0 + r) * width + t / 2 * kInt4Tile, reinterpret_cast<__m512>(v));
    }
    return;
  }
  const int64_t n0 = t * kInt4Tile, valid = std::min<int64_t>(kInt4Tile, w.N - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + (m0 + r) * w.N + n0, mask, out[r]);
}

}  // namespace

bool int4_usable() { return avx512_vnni_usable(); }

__attribute__((target("avx512f"))) PackedInt4 pack_int4(const uint8_t* w, const uint16_t* scale, const uint8_t* zero,
                                                        int64_t N, int64_t K, int64_t group, bool glu) {
  PackedInt4 p;
  p.N = N, p.K = K, p.group = group, p.glu = glu;
  p.num_groups = (K + group - 1) / group;
  p.num_tiles = (N + kInt4Tile - 1) / kInt4Tile;
  p.codes.assign(p.num_tiles * (K / 8) * kOctetBytes, 0);
  p.scale.assign(p.num_tiles * p.num_groups * kInt4Tile, 0);
  p.offset.assign(p.num_tiles * p.num_groups * kInt4Tile, 0);
  for (int64_t t = 0; t < p.num_tiles; ++t) {
    for (int64_t c = 0; c < kInt4Tile; ++c) {
      const int64_t n = tile_column(p, t, c);
      if (n >= N) continue;
      const uint8_t* row = w + n * (K / 2);
      uint8_t* tile = p.codes.data() + t * (K / 8) * kOctetBytes;
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t code = (row[k / 2] >> (4 * (k % 2))) & 0x0F;
        const int64_t i = k % 8;
        tile[k / 8 * kOctetBytes + 4 * c + i % 4] |= static_cast<uint8_t>(code << (i < 4 ? 0 : 4));
      }
      for (int64_t g = 0; g < p.num_groups; ++g) {
        const uint16_t s = scale[n * p.num_groups + g];
        const int64_t at = (t * p.num_groups + g) * kInt4Tile + c;
        p.scale[at] = s;
        p.offset[at] = float_to_half(-half_to_float(s) * static_cast<float>(zero[n * p.num_groups + g]));
      }
    }
  }
  return p;
}

__attribute__((target("avx512f,avx512bw"))) void quantize_int4_rows(const float* x, int64_t row_begin,
                                                                    int64_t row_end, const PackedInt4& w,
                                                                    const Int4Activations& act) {
  const int64_t K = w.K, num_blocks = K / kInt4Block, per_group = w.group / kInt4Block;
  for (int64_t m = row_begin; m < row_end; ++m) {
    float* xsum = act.xsum + m * w.num_groups;
    std::fill(xsum, xsum + w.num_groups, 0.0f);
    for (int64_t b = 0; b < num_blocks; ++b) {
      const float* src = x + m * K + b * kInt4Block;
      const __m512 v0 = _mm512_loadu_ps(src), v1 = _mm512_loadu_ps(src + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
      const __m512 divisor = _mm512_set1_ps(scale);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_div_ps(v0, divisor));  // round half to even
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_div_ps(v1, divisor));
      int8_t* dst = act.xq + m * K + b * kInt4Block;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(q1));
      act.a[m * num_blocks + b] = scale;
      xsum[b / per_group] += scale * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int4_tiles(const PackedInt4& w,
                                                                       const Int4Activations& act, int64_t M,
                                                                       int64_t tile_begin, int64_t tile_end,
                                                                       float* y) {
  const int64_t step = w.glu ? 2 : 1;
  for (int64_t t = tile_begin; t < tile_end; t += step) {
    int64_t m = 0;
    for (; m + kInt4Rows <= M; m += kInt4Rows) store_rows<kInt4Rows>(w, act, m, t, y);
    switch (M - m) {
      case 3: store_rows<3>(w, act, m, t, y); break;
      case 2: store_rows<2>(w, act, m, t, y); break;
      case 1: store_rows<1>(w, act, m, t, y); break;
      default: break;
    }
  }
}

}  // namespace llmc
