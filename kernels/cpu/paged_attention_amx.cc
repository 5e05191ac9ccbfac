// Prefill tiles of llmc's fused paged attention on AMX bf16 tiles (see paged_attention.h), for graphs
// whose PagedAttention nodes set bf16_tiles (the int8 prefill graph): the tiles of
// paged_attention_tiles.cc (16 rows of one sequence, an online softmax over chunks of keys) with both
// products as TDPBF16PS tile products (bf16 inputs, float sums) and only the softmax on AVX-512.
// Both products are computed transposed, so that a stored score tile has one row per key holding the
// 16 query rows as lanes (the softmax's maximum and sum need no horizontal reduction) and P^T's VNNI
// rows are two such rows interleaved:
//     S^T [16 keys, 16 rows] = K [16 keys, 32 d] . Q^T [16 d-pairs, 16 rows x 2]         (D/32 products)
//     O^T [16 d, 16 rows]    = V^T [16 d, 32 keys] . P^T [16 key-pairs, 16 rows x 2]    (per 32 keys)
// A sequence's keys and values (cached ones from the pools, then the step's own) are converted once per
// step into bf16 K [KVH, Lp, D] and V^T [KVH, D, Lp] (pack_keys), which all its tiles read. The queries
// are scaled by scale * log2(e) before rounding, so the scores are base-2 logits and softmax is 2^x.
// Without AMX (AVX-512 BF16: AMD Zen 4 and 5) the same chains of tile products run as VDPBF16PS, 16
// accumulator registers for the 16 rows of a product tile (split.bf16_vectors).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "amx_tiles.h"
#include "paged_attention.h"
#include "vec16.h"

namespace llmc {
namespace {

constexpr float kLog2e = 1.44269504f;

// 16 floats -> 16 bf16 (round to nearest even; the inputs are finite), in the low 16 bits of each lane.
__attribute__((target("avx512f"))) inline __m512i bf16_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
}

// 16 lanes of (bf16(lo), bf16(hi)) pairs: one 64-byte VNNI row.
__attribute__((target("avx512f"))) inline __m512i bf16_pairs(__m512 lo, __m512 hi) {
  return _mm512_or_si512(bf16_bits(lo), _mm512_slli_epi32(bf16_bits(hi), 16));
}

// 2^x for x <= 0: 2^round(x) (scalef) times 2^f, |f| <= 1/2, by its Taylor series to degree 4 (relative
// error < 5e-5: the result is rounded to bf16, 4e-3, for P.V).
__attribute__((target("avx512f"))) inline __m512 exp2_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-125.0f));  // 2^-125.5 is still a normal float
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(0.00961813f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0555041f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240226507f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693147181f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// dst[:D] = bf16(src[:D]), D a multiple of 16.
template <typename T>
__attribute__((target("avx512f"))) inline void row_to_bf16(const T* src, uint16_t* dst, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) {
    const f32x16 v = load16(src + d);
    __m512 x;
    std::memcpy(&x, &v, sizeof(x));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), _mm512_cvtepi32_epi16(bf16_bits(x)));
  }
}

// Key (or value) j of sequence s, KV head g: a pool row for cached tokens, else the step's row.
template <typename T>
inline const T* cached_row(const PagedAttentionArgs& a, const T* pool, int64_t s, int64_t j, int64_t g) {
  const int64_t slot = a.cached_tables[s * a.Mc + j / a.B] * a.B + j % a.B;
  return pool + (slot * a.KVH + g) * a.D;
}

template <typename T>
__attribute__((target("avx512f"))) void pack_keys_t(const PagedAttentionArgs& a, int64_t s, int64_t total,
                                                    Bf16Keys& out) {
  const int64_t D = a.D, KVH = a.KVH, Lp = out.padded, cached = a.query_positions[s * a.Qmax];
  const int64_t* tokens = a.query_index + s * a.Qmax;
  const T* k_pool = static_cast<const T*>(a.k_pool);
  const T* v_pool = static_cast<const T*>(a.v_pool);
  alignas(64) float key[kMaxHeadDim], value[kMaxHeadDim];  // an int8 pool's key row, a half or int8 value row, as floats
  for (int64_t g = 0; g < KVH; ++g) {
    uint16_t* k = out.k.data() + g * Lp * D;
    uint16_t* v_t = out.v_t.data() + g * D * Lp;
    const float* k_scale = a.k_scale ? a.k_scale + g * D : nullptr;
    const float* v_scale = a.v_scale ? a.v_scale + g * D : nullptr;
    for (int64_t j = 0; j < total; ++j) {
      const float* v;
      if (j < cached) {
        if constexpr (std::is_same_v<T, int8_t>) {
          row_to_float(cached_row(a, k_pool, s, j, g), k_scale, key, D);
          row_to_bf16(key, k + j * D, D);
        } else {
          row_to_bf16(cached_row(a, k_pool, s, j, g), k + j * D, D);
        }
        if constexpr (std::is_same_v<T, float>) {
          v = cached_row(a, v_pool, s, j, g);
        } else {
          row_to_float(cached_row(a, v_pool, s, j, g), v_scale, value, D);
          v = value;
        }
      } else {
        const int64_t t = tokens[j - cached];
        row_to_bf16(a.k_rotated + (t * KVH + g) * D, k + j * D, D);
        v = a.v + (t * KVH + g) * D;
      }
      for (int64_t d = 0; d < D; ++d) v_t[d * Lp + j] = float_to_bf16(v[d]);
    }
  }
}

// c[16][16] = sum over t < tiles of A_t . B_t, as AMX computes it: A_t 16 rows x 32 bf16 at a + 32 t
// (row stride a_stride elements), B_t 16 VNNI rows of 16 bf16 pairs at b + 256 t. Expects the tile
// configuration.
__attribute__((target("amx-tile,amx-bf16"))) inline void chain_amx(const uint16_t* a, int64_t a_stride,
                                                                  const uint32_t* b, int64_t tiles, float (*c)[16]) {
  _tile_zero(0);
  for (int64_t t = 0; t < tiles; ++t) {
    _tile_loadd(1, a + 32 * t, a_stride * 2);
    _tile_loadd(2, b + 256 * t, 64);
    _tile_dpbf16ps(0, 1, 2);
  }
  _tile_stored(0, c, 64);
}

// acc += b . the bf16 pair at x in every lane (VDPBF16PS, its broadcast a memory operand; inline assembly,
// as in int8_linear_vnni.cc: GCC 12 copies an intrinsic's accumulator through another register).
__attribute__((target("avx512f,avx512bf16"))) inline void dpbf16(__m512& acc, __m512i b, const void* x) {
  __asm__("vdpbf16ps %[x]%{1to16%}, %[b], %[acc]"
          : [acc] "+v"(acc)
          : [b] "v"(b), [x] "m"(*static_cast<const uint32_t*>(x)));
}

// The same chain on AVX-512 BF16: row r of c is one accumulator, B's rows are loaded once per 16 rows.
__attribute__((target("avx512f,avx512bf16"))) inline void chain_vectors(const uint16_t* a, int64_t a_stride,
                                                                       const uint32_t* b, int64_t tiles,
                                                                       float (*c)[16]) {
#define LLMC_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define LLMC_ZERO(r) __m512 acc##r = _mm512_setzero_ps();
  LLMC_ROWS(LLMC_ZERO)
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t k = 0; k < 16; ++k) {  // B_t's row k: pair k of every row of A_t
      const __m512i bk = _mm512_load_si512(b + 256 * t + 16 * k);
      const uint16_t* column = a + 32 * t + 2 * k;
#define LLMC_DOT(r) dpbf16(acc##r, bk, column + (r) * a_stride);
      LLMC_ROWS(LLMC_DOT)
    }
  }
#define LLMC_STORE(r) _mm512_store_ps(c[r], acc##r);
  LLMC_ROWS(LLMC_STORE)
#undef LLMC_STORE
#undef LLMC_DOT
#undef LLMC_ZERO
#undef LLMC_ROWS
}

template <bool kAmx>
inline void chain(const uint16_t* a, int64_t a_stride, const uint32_t* b, int64_t tiles, float (*c)[16]) {
  if constexpr (kAmx) {
    chain_amx(a, a_stride, b, tiles, c);
  } else {
    chain_vectors(a, a_stride, b, tiles, c);
  }
}

// The tile's state for one head: 16 lanes (rows) of running maximum and sum, and the outputs transposed.
struct HeadState {
  __m512 peak, sum;
  __m512 acc[kMaxHeadDim];  // [D]: lane = row
};

// One chunk of n <= kAmxKeys keys from key c0, for head h of the tile whose row 0 sees keys up to
// last_key_of_row0. q_t: the head's scaled queries, VNNI [D/2, 16 lanes]. With AMX, expects the tile
// configuration.
template <bool kAmx>
__attribute__((target("avx512f"))) void attend_chunk(
    const Bf16Keys& keys, int64_t g, int64_t D, const uint32_t* q_t, int64_t c0, int64_t n, int64_t last_key_of_row0,
    HeadState& st) {
  const int64_t Lp = keys.padded;
  const uint16_t* k = keys.k.data() + (g * Lp + c0) * D;      // [keys, D]
  const uint16_t* v_t = keys.v_t.data() + g * D * Lp + c0;    // [D, Lp]
  alignas(64) float scores[kAmxKeys][16];                     // S^T
  const int64_t key_tiles = (n + 15) / 16;
  for (int64_t kb = 0; kb < key_tiles; ++kb) {  // 16 keys x 32 d . 16 d-pairs x 16 rows, D / 32 times
    chain<kAmx>(k + kb * 16 * D, D, q_t, D / 32, &scores[kb * 16]);
  }
  // Row i (lane i) sees keys <= last_key_of_row0 + i: masks only where this chunk passes row 0's last key.
  const bool masked = c0 + n - 1 > last_key_of_row0;
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  auto allowed = [&](int64_t j) {
    return masked ? _mm512_cmpge_epi32_mask(lanes, _mm512_set1_epi32(static_cast<int>(c0 + j - last_key_of_row0)))
                  : static_cast<__mmask16>(0xffff);
  };
  __m512 peak = st.peak;
  for (int64_t j = 0; j < n; ++j) peak = _mm512_mask_max_ps(peak, allowed(j), peak, _mm512_load_ps(scores[j]));
  const __m512 rescale = exp2_nonpositive(_mm512_sub_ps(st.peak, peak));
  st.peak = peak;
  alignas(64) uint32_t p_t[kAmxKeys / 2][16];  // P^T, VNNI: pairs of keys
  __m512 sum = _mm512_mul_ps(st.sum, rescale);
  const int64_t pairs = (n + 31) / 32 * 16;
  for (int64_t i = 0; i < pairs; ++i) {
    __m512 p[2];
    for (int64_t e = 0; e < 2; ++e) {
      const int64_t j = 2 * i + e;
      p[e] = j < n ? _mm512_maskz_mov_ps(allowed(j), exp2_nonpositive(_mm512_sub_ps(_mm512_load_ps(scores[j]), peak)))
                   : _mm512_setzero_ps();
      sum = _mm512_add_ps(sum, p[e]);
    }
    _mm512_store_si512(p_t[i], bf16_pairs(p[0], p[1]));
  }
  st.sum = sum;
  alignas(64) float o_t[16][16];
  for (int64_t dt = 0; dt < D / 16; ++dt) {  // 16 d x 32 keys . 16 key-pairs x 16 rows, per 32 keys
    chain<kAmx>(v_t + dt * 16 * Lp, Lp, p_t[0], pairs / 16, o_t);
    for (int64_t d = 0; d < 16; ++d) {
      st.acc[dt * 16 + d] = _mm512_fmadd_ps(st.acc[dt * 16 + d], rescale, _mm512_load_ps(o_t[d]));
    }
  }
}

}  // namespace

void pack_keys(const PagedAttentionArgs& a, WorkSplit& split, int64_t i) {
  const int64_t s = split.packed_sequences[i];
  const int64_t total = a.query_positions[s * a.Qmax] + split.step_rows[s];
  Bf16Keys& out = split.bf16_keys[s];
  out.padded = (total + kAmxKeys - 1) / kAmxKeys * kAmxKeys;
  out.k.assign(a.KVH * out.padded * a.D, 0);
  out.v_t.assign(a.KVH * a.D * out.padded, 0);
  return by_pool_type(a, [&](auto element) { pack_keys_t<decltype(element)>(a, s, total, out); });
}

namespace {

template <bool kAmx>
__attribute__((target("amx-tile,avx512f"))) void tile_in_bf16(const PagedAttentionArgs& a, const WorkSplit& split,
                                                            int64_t s, int64_t r0, int64_t rows) {
  if constexpr (kAmx) _tile_loadconfig(&full_tiles());
  const int64_t H = a.H, D = a.D, group = a.H / a.KVH;
  const int64_t* tokens = a.query_index + s * a.Qmax;  // step token of each row
  const int64_t last_key_of_row0 = a.query_positions[s * a.Qmax] + r0, total = last_key_of_row0 + rows;
  const Bf16Keys& keys = split.bf16_keys[s];
  const float q_scale = a.scale * kLog2e;
  alignas(64) uint32_t q_t[kMaxHeadDim / 2][16];
  alignas(64) HeadState st;
  for (int64_t h = 0; h < H; ++h) {
    std::memset(q_t, 0, sizeof(q_t));  // lanes past the tile's rows stay zero
    for (int64_t i = 0; i < rows; ++i) {  // Q^T, VNNI: lane i holds row i's dimensions 2 dp, 2 dp + 1
      const float* q = a.q_rotated + tokens[r0 + i] * H * D + h * D;
      for (int64_t dp = 0; dp < D / 2; ++dp) {
        q_t[dp][i] = float_to_bf16(q[2 * dp] * q_scale) | uint32_t(float_to_bf16(q[2 * dp + 1] * q_scale)) << 16;
      }
    }
    st.peak = _mm512_set1_ps(-3.0e38f);
    st.sum = _mm512_setzero_ps();
    std::fill(st.acc, st.acc + D, _mm512_setzero_ps());
    for (int64_t c0 = 0; c0 < total; c0 += kAmxKeys) {
      attend_chunk<kAmx>(keys, h / group, D, q_t[0], c0, std::min(kAmxKeys, total - c0), last_key_of_row0, st);
    }
    alignas(64) float inv[16];
    _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), st.sum));
    for (int64_t d = 0; d < D; ++d) {
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, st.acc[d]);
      for (int64_t i = 0; i < rows; ++i) a.out[tokens[r0 + i] * H * D + h * D + d] = lanes[i] * inv[i];
    }
  }
}

}  // namespace

void attend_tile_bf16(const PagedAttentionArgs& a, const WorkSplit& split, int64_t s, int64_t r0, int64_t rows) {
  if (split.bf16_vectors) return tile_in_bf16<false>(a, split, s, r0, rows);
  tile_in_bf16<true>(a, split, s, r0, rows);
}

}  // namespace llmc
