// The int8 GEMM of llmc.Int8Linear (int8_linear.h): AMX tiles, or AVX-512 VNNI (int8_linear_vnni.cc).
#include "int8_linear.h"
#include "vec16.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cpuid.h>
#include <cstdlib>
#include <cstring>
#include <string>

namespace llmc {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// silu(gate) * up on 16 lanes (vec16.h).
inline __m512 swiglu16(__m512 gate, __m512 up) {
  return reinterpret_cast<__m512>(silu_mul(reinterpret_cast<f32x16>(gate), reinterpret_cast<f32x16>(up)));
}

float swiglu1(float gate, float up) { return gate / (1.0f + std::exp(-gate)) * up; }

// Whether the OS saves all the register state in `mask` (XCR0 bits) across context switches.
bool os_saves_state(unsigned mask) {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(1, 0, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & mask) == mask;
}

}  // namespace

bool amx_usable() {
#ifdef LLMC_AMX_EMULATION
  return true;
#endif
  static const bool usable = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool bf16 = edx & (1u << 22), tile = edx & (1u << 24), int8 = edx & (1u << 25);
    if (!tile || !int8 || !bf16) return false;
    if (!os_saves_state(3u << 17)) return false;  // the tile configuration and data
    // Linux hands out the tile data state per process, on request (else the first tile op is SIGILL).
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

bool avx512_bf16_usable() {
  static const bool usable = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool f = ebx & (1u << 16), bw = ebx & (1u << 30), vl = ebx & (1u << 31);
    if (!f || !bw || !vl) return false;
    if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || !(eax & (1u << 5))) return false;  // AVX512_BF16
    return os_saves_state(0xe6u);  // SSE, AVX and AVX-512 (opmask, zmm)
  }();
  return usable;
}

bool avx512_vnni_usable() {
  static const bool usable = [] {
    unsigned eax, ebx, ecx, edx;
    return avx512_bf16_usable() && __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 11));
  }();
  return usable;
}

Int8Backend int8_backend() {
  const char* env = std::getenv("LLMC_INT8_BACKEND");
  const std::string asked = env ? env : "";
  if (asked == "none") return Int8Backend::kNone;
  if (asked != "avx512-vnni" && amx_usable()) return Int8Backend::kAmx;
#ifdef LLMC_AMX_EMULATION
  return Int8Backend::kAmx;  // the emulation library tests the AMX code path only
#endif
  return avx512_vnni_usable() ? Int8Backend::kAvx512Vnni : Int8Backend::kNone;
}

std::vector<int64_t> glu_column_order(int64_t N) {
  std::vector<int64_t> order(N);
  const int64_t half = N / 2;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t block = n / 32, lane = n % 16;
    order[n] = (n % 32 < 16 ? 0 : half) + block * 16 + lane;
  }
  return order;
}

PackedWeight pack_weight(const int8_t* w, const float* w_scale, const float* w_outlier, const int64_t* channels,
                         int64_t N, int64_t Ki, int64_t Ko, const int64_t* column_order, bool biased) {
  PackedWeight p;
  p.biased = biased;
  p.N = N;
  p.Ki = Ki;
  p.Ko = Ko;
  p.Np = round_up(N, kColBlock);
  // Ki a multiple of 64, Ko of 32 (the op requires it); padding columns hold code 0, biased or not
  p.data.assign(p.Np * Ki, biased ? -128 : 0);
  p.outlier.assign(p.Np * Ko, 0);
  p.scale.assign(p.Np, 0.0f);
  p.channels.assign(channels, channels + Ki + Ko);
  p.inlier_masks.assign((Ki + Ko + 15) / 16, 0);
  for (int64_t k = 0; k < Ki; ++k) p.inlier_masks[channels[k] / 16] |= static_cast<uint16_t>(1u << (channels[k] % 16));
  const int64_t int8_tiles = Ki / 64, bf16_tiles = Ko / 32;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t nt = n / 16, col = n % 16, source = column_order ? column_order[n] : n;
    p.scale[n] = w_scale[source];
    for (int64_t k = 0; k < Ki; ++k) {  // tile rows hold 4 consecutive K of each column
      const int64_t kt = k / 64, row = (k % 64) / 4, lane = k % 4;
      const int8_t code = w[source * Ki + k];
      p.data[((nt * int8_tiles + kt) * 16 + row) * 64 + col * 4 + lane] =
          biased ? static_cast<int8_t>(static_cast<uint8_t>(code) ^ 0x80u) : code;  // code + 128 as a byte
    }
    for (int64_t k = 0; k < Ko; ++k) {  // tile rows hold 2 consecutive K of each column
      const int64_t kt = k / 32, row = (k % 32) / 2, lane = k % 2;
      p.outlier[((nt * bf16_tiles + kt) * 16 + row) * 32 + col * 2 + lane] = float_to_bf16(w_outlier[source * Ko + k]);
    }
  }
  return p;
}

int64_t padded_rows(int64_t M) { return round_up(M, kRowBlock); }

__attribute__((target("avx512f,avx512bw"))) void quantize_rows(const Int8LinearArgs& a, int64_t row_begin,
                                                               int64_t row_end) {
  const PackedWeight& w = *a.w;
  const int64_t Ki = w.Ki, Ko = w.Ko, K = Ki + Ko;
  const int32_t* outlier_channels = w.channels.data() + Ki;
  thread_local std::vector<float> inliers;
  inliers.resize(Ki + 16);
  for (int64_t m = row_begin; m < row_end; ++m) {
    int8_t* q = a.xq + m * Ki;
    uint16_t* o = a.xo + m * Ko;
    if (m >= a.M) {  // padding rows
      std::memset(q, 0, Ki);
      std::memset(o, 0, Ko * sizeof(uint16_t));
      a.x_scale[m] = 0.0f;
      a.x_sum[m] = 0;
      continue;
    }
    const float* x = a.x + m * K * (a.swiglu ? 2 : 1);
    __m512 amax = _mm512_setzero_ps();
    int64_t n = 0;
    for (int64_t c = 0; c < K; c += 16) {  // the inliers, in channel order, compressed 16 channels at a time
      const __mmask16 valid = K - c >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - c)) - 1);
      const __m512 v = a.swiglu ? swiglu16(_mm512_maskz_loadu_ps(valid, x + c), _mm512_maskz_loadu_ps(valid, x + K + c))
                                : _mm512_maskz_loadu_ps(valid, x + c);
      const __mmask16 inlier = w.inlier_masks[c / 16];
      // compress in a register, then a full store (the next one overwrites the lanes past n): the
      // compressing store to memory is several times slower
      _mm512_storeu_ps(inliers.data() + n, _mm512_maskz_compress_ps(inlier, v));
      amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_mov_ps(inlier, v)));
      n += __builtin_popcount(inlier);
    }
    const float peak = _mm512_reduce_max_ps(amax);
    const float scale = peak > 0.0f ? peak / 127.0f : 1.0f;  // one scale per row
    const __m512 inverse = _mm512_set1_ps(1.0f / scale);
    const __m512i lowest = _mm512_set1_epi32(-128), highest = _mm512_set1_epi32(127);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = 0; k < Ki; k += 16) {  // Ki is a multiple of 64; round to nearest even, as the body's Round
      __m512i codes = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(inliers.data() + k), inverse));
      codes = _mm512_min_epi32(_mm512_max_epi32(codes, lowest), highest);
      sum = _mm512_add_epi32(sum, codes);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(codes));
    }
    a.x_scale[m] = scale;
    a.x_sum[m] = _mm512_reduce_add_epi32(sum);
    for (int64_t k = 0; k < Ko; ++k) {
      const int64_t c = outlier_channels[k];
      o[k] = float_to_bf16(a.swiglu ? swiglu1(x[c], x[K + c]) : x[c]);
    }
  }
}

namespace {

// Tile c += tile a . tile b: int8 (TDPBSSD, int32 sums) or bf16 (TDPBF16PS, float sums). A macro: the
// intrinsics take the tile numbers as literal tokens.
#define LLMC_TILE_DOT(kBf16, c, a, b) \
  do {                                \
    if constexpr (kBf16) {            \
      _tile_dpbf16ps(c, a, b);        \
    } else {                          \
      _tile_dpbssd(c, a, b);          \
    }                                 \
  } while (0)

// The 2 x kRowTiles accumulator tiles of rows [0, 16 kRowTiles) of x (row stride x_stride bytes) times
// columns [0, 32) of a packed weight (column tiles of `tiles` 1 KB K tiles each, the second after the
// first), summed over the K tiles and stored to out (int32 for int8 TDPBSSD, float for bf16 TDPBF16PS):
// each x tile serves two weight tiles, each weight tile kRowTiles x tiles. A K tile is 64 bytes of a row
// either way (64 int8 or 32 bf16 channels). Expects the tile configuration loaded.
template <int kRowTiles, bool kBf16, typename Out>
__attribute__((target("amx-tile,amx-int8,amx-bf16"))) inline void tile_products(const void* x, int64_t x_stride,
                                                                                 const void* weight, int64_t tiles,
                                                                                 Out (*out)[16][16]) {
  const char* x0 = static_cast<const char*>(x);
  const char* b0 = static_cast<const char*>(weight);
  const char* b1 = b0 + tiles * 1024;
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kRowTiles == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kt = 0; kt < tiles; ++kt) {
    _tile_loadd(6, b0 + kt * 1024, 64);
    _tile_loadd(7, b1 + kt * 1024, 64);
    _tile_loadd(4, x0 + kt * 64, x_stride);
    LLMC_TILE_DOT(kBf16, 0, 4, 6);
    LLMC_TILE_DOT(kBf16, 1, 4, 7);
    if constexpr (kRowTiles == 2) {
      _tile_loadd(5, x0 + 16 * x_stride + kt * 64, x_stride);
      LLMC_TILE_DOT(kBf16, 2, 5, 6);
      LLMC_TILE_DOT(kBf16, 3, 5, 7);
    }
  }
  _tile_stored(0, out[0], 64);
  _tile_stored(1, out[1], 64);
  if constexpr (kRowTiles == 2) {
    _tile_stored(2, out[2], 64);
    _tile_stored(3, out[3], 64);
  }
}
#undef LLMC_TILE_DOT

// Rows [m0, m0 + 16 * kRowTiles) x columns [n0, n0 + 32) of y into out: the int8 products summed over all
// of Ki in 2 x kRowTiles int32 tiles (each x tile used for 2 weight tiles, each weight tile for kRowTiles
// x tiles), then the outliers' bf16 products in the same tiles, as floats. Expects the tile
// configuration loaded.
template <int kRowTiles>
__attribute__((target("amx-tile,amx-int8,amx-bf16"))) void block_products(const Int8LinearArgs& a, int64_t m0,
                                                                          int64_t n0, BlockSums& out) {
  const PackedWeight& w = *a.w;
  const int64_t Ki = w.Ki, Ko = w.Ko, int8_tiles = Ki / 64, bf16_tiles = Ko / 32;
  tile_products<kRowTiles, false>(a.xq + m0 * Ki, Ki, w.data.data() + (n0 / 16) * int8_tiles * 1024, int8_tiles,
                                  out.sums);
  if (bf16_tiles > 0) {
    tile_products<kRowTiles, true>(a.xo + m0 * Ko, Ko * 2, w.outlier.data() + (n0 / 16) * bf16_tiles * 512,
                                   bf16_tiles, out.outliers);
  }
}

// 16 floats of y at dst, past the caches when streaming (dst on a cache line) or masked to `mask`.
__attribute__((target("avx512f"))) inline void store16(float* dst, __mmask16 mask, __m512 y, bool stream) {
  if (stream && mask == 0xffff && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
    _mm512_stream_ps(dst, y);
  } else {
    _mm512_mask_storeu_ps(dst, mask, y);
  }
}

// Row r of tile t of a block, scaled: sums * row scale * column scales + outliers.
__attribute__((target("avx512f"))) inline __m512 scaled_row(const Int8LinearArgs& a, const BlockSums& block, int t,
                                                            int64_t r, int64_t row0, __m512 col_scales) {
  const __m512 scales = _mm512_mul_ps(_mm512_set1_ps(a.x_scale[row0 + r]), col_scales);
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(block.sums[t][r])), scales);
  return a.w->Ko > 0 ? _mm512_add_ps(y, _mm512_load_ps(block.outliers[t][r])) : y;
}

// Int8LinearGLU's block at (m0, n0): tiles 0 / 2 gate and 1 / 3 up of the same 16 outputs, from n0 / 2.
__attribute__((target("avx512f"))) void store_glu_block(const Int8LinearArgs& a, int64_t m0, int64_t n0,
                                                        const BlockSums& block) {
  const int64_t width = a.y_begin[1] / 2;
  const __m512 gate_scales = _mm512_loadu_ps(a.w->scale.data() + n0), up_scales = _mm512_loadu_ps(a.w->scale.data() + n0 + 16);
  for (int t = 0; t < 4; t += 2) {
    const int64_t row0 = m0 + (t / 2) * 16;
    if (row0 >= a.M) continue;  // a padding tile
    const int64_t rows = std::min<int64_t>(16, a.M - row0);
    float* out = a.y[0] + n0 / 2;
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 y = swiglu16(scaled_row(a, block, t, r, row0, gate_scales), scaled_row(a, block, t + 1, r, row0, up_scales));
      store16(out + (row0 + r) * width, 0xffff, y, a.stream);
    }
  }
}

// y = sums * row scale * column scale + outliers for the block at (m0, n0).
__attribute__((target("avx512f"))) void store_block(const Int8LinearArgs& a, int64_t m0, int64_t n0,
                                                    const BlockSums& block) {
  if (a.glu) {
    store_glu_block(a, m0, n0, block);
    return;
  }
  const PackedWeight& w = *a.w;
  for (int t = 0; t < 4; ++t) {
    const int64_t row0 = m0 + (t / 2) * 16, col0 = n0 + (t % 2) * 16;
    if (col0 >= w.N || row0 >= a.M) continue;  // a padding tile
    int o = 0;  // the output holding these columns
    while (col0 >= a.y_begin[o + 1]) ++o;
    const int64_t width = a.y_begin[o + 1] - a.y_begin[o], cols = std::min<int64_t>(16, a.y_begin[o + 1] - col0);
    float* out = a.y[o] + (col0 - a.y_begin[o]);
    const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
    const __m512 col_scales = _mm512_loadu_ps(w.scale.data() + col0);
    const int64_t rows = std::min<int64_t>(16, a.M - row0);
    for (int64_t r = 0; r < rows; ++r) {
      store16(out + (row0 + r) * width, mask, scaled_row(a, block, t, r, row0, col_scales), a.stream);
    }
  }
}

}  // namespace

// Row block by row block, and within one, column block by column block (the item's weights stay in L2,
// a row block's activations in L1, and y is written in runs of whole rows). A block's products are
// issued before the previous block is scaled and stored, so the epilogue reads sums the tiles stored
// one block earlier instead of right after their tile stores (alone, this measured within noise here;
// the blocking and alignment are what measured faster).
__attribute__((target("amx-tile,amx-int8,amx-bf16,avx512f"))) void run_item(const Int8LinearArgs& a,
                                                                            const GemmItem& item) {
  const bool amx = !a.w->biased;
  if (amx) _tile_loadconfig(&full_tiles());
  thread_local BlockSums blocks[2];
  int64_t pending_m0 = 0, pending_n0 = 0, count = 0;  // the block stored next; blocks run so far
  for (int64_t mb = item.mb_begin; mb < item.mb_end; ++mb) {
    const int64_t m0 = mb * kRowBlock;
    for (int64_t nb = item.nb_begin; nb < item.nb_end; ++nb, ++count) {
      const int64_t n0 = nb * kColBlock;
      BlockSums& current = blocks[count % 2];
      if (!amx) {
        block_products_vnni(a, m0, n0, current);
      } else if (a.M - m0 > 16) {
        block_products<2>(a, m0, n0, current);
      } else {
        block_products<1>(a, m0, n0, current);  // the second row tile would be padding only
      }
      if (count > 0) store_block(a, pending_m0, pending_n0, blocks[(count + 1) % 2]);
      pending_m0 = m0;
      pending_n0 = n0;
    }
  }
  if (count > 0) store_block(a, pending_m0, pending_n0, blocks[(count + 1) % 2]);
  if (a.stream) _mm_sfence();  // the non-temporal stores ordered before the threads' join
}

std::vector<GemmItem> plan_items(const PackedWeight& w, int64_t M) {
  const int64_t row_blocks = padded_rows(M) / kRowBlock, col_blocks = w.Np / kColBlock;
  const int64_t row_bytes = w.Ki + 2 * w.Ko;  // of a weight column (int8 and bf16 outliers)
  // column blocks per item: their weights within kItemWeightBytes, and ~kMinItems items in all (the
  // threads take items as they free up)
  const int64_t panels = (row_blocks + kItemRowBlocks - 1) / kItemRowBlocks;
  const int64_t by_bytes = std::max<int64_t>(1, kItemWeightBytes / (kColBlock * row_bytes));
  const int64_t group = std::max<int64_t>(1, std::min(by_bytes, col_blocks * panels / kMinItems));
  std::vector<GemmItem> items;
  for (int64_t mb = 0; mb < row_blocks; mb += kItemRowBlocks) {
    for (int64_t nb = 0; nb < col_blocks; nb += group) {
      items.push_back({mb, std::min(row_blocks, mb + kItemRowBlocks), nb, std::min(col_blocks, nb + group)});
    }
  }
  return items;
}

}  // namespace llmc
