// AMX int8 GEMM for llmc.Int8Linear (int8_linear.h).
#include "int8_linear.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cpuid.h>
#include <cstring>

namespace llmc {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TileConfig make_config() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {  // 0-3: int32 accumulators, 4-5: x rows, 6-7: weight tiles; all 16 x 64 bytes
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  return config;
}

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

}  // namespace

bool amx_int8_usable() {
  static const bool usable = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = edx & (1u << 24), int8 = edx & (1u << 25);
    if (!tile || !int8) return false;
    if (!__get_cpuid_count(1, 0, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;  // OSXSAVE
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;  // the OS saves the tile state
    // Linux hands out the tile data state per process, on request (else the first tile op is SIGILL).
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

PackedWeight pack_weight(const int8_t* w, const float* scale, int64_t N, int64_t K) {
  PackedWeight p;
  p.N = N;
  p.K = K;
  p.Np = round_up(N, kColBlock);
  p.data.assign(p.Np * K, 0);  // K is a multiple of 64 (the op requires it)
  const int64_t k_tiles = K / 64, blocks = K / kBlock;
  p.scale.assign(blocks * p.Np, 0.0f);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t b = 0; b < blocks; ++b) p.scale[b * p.Np + n] = scale[n * blocks + b];
  }
  for (int64_t n = 0; n < N; ++n) {
    const int64_t nt = n / 16, col = n % 16;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t kt = k / 64, row = (k % 64) / 4, lane = k % 4;
      p.data[((nt * k_tiles + kt) * 16 + row) * 64 + col * 4 + lane] = w[n * K + k];
    }
  }
  return p;
}

int64_t padded_rows(int64_t M) { return round_up(M, kRowBlock); }

void quantize_rows(const Int8LinearArgs& a, int64_t row_begin, int64_t row_end) {
  const int64_t K = a.w->K, blocks = K / kBlock;
  for (int64_t m = row_begin; m < row_end; ++m) {
    int8_t* q = a.xq + m * K;
    float* scales = a.x_scale + m * blocks;
    if (m >= a.M) {  // padding rows
      std::memset(q, 0, K);
      std::fill(scales, scales + blocks, 0.0f);
      continue;
    }
    const float* x = a.x + m * K;
    for (int64_t b = 0; b < blocks; ++b) {  // one scale per row and block of 64 input channels
      const float* xb = x + b * kBlock;
      float amax = 0.0f;
      for (int64_t k = 0; k < kBlock; ++k) amax = std::max(amax, std::fabs(xb[k]));
      const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
      for (int64_t k = 0; k < kBlock; ++k) q[b * kBlock + k] = static_cast<int8_t>(std::nearbyint(xb[k] / scale));
      scales[b] = scale;
    }
  }
}

namespace {

// One whole 16 x 16 tile of y at rows [m0, +16), columns [n0, +16) (all rows real): its float sums stay in
// 16 registers over all K, each block costing one tile product and 3 vector instructions a row (the
// loop of run_tiles keeps them in memory: ~2x the instructions). The blocks' tile products alternate
// between two accumulator tiles, the next one issued before this one is scaled (7-15% faster than one
// accumulator tile at SmolLM2's shapes, measured back to back). Expects the tile configuration loaded.
__attribute__((target("amx-tile,amx-int8,avx512f"))) void run_full_tile(const Int8LinearArgs& a, int64_t m0,
                                                                        int64_t n0) {
  const PackedWeight& w = *a.w;
  const int64_t K = w.K, blocks = K / 64;
  const int8_t* x = a.xq + m0 * K;
  const int8_t* b = w.data.data() + (n0 / 16) * blocks * 1024;
  const float* row_scales = a.x_scale + m0 * blocks;
  alignas(64) int32_t part[16][16];
  __m512 acc[16];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  auto scale_into_acc = [&](int64_t kb) {
    const __m512 col_scales = _mm512_loadu_ps(w.scale.data() + kb * w.Np + n0);
    for (int r = 0; r < 16; ++r) {
      const __m512 scales = _mm512_mul_ps(_mm512_set1_ps(row_scales[r * blocks + kb]), col_scales);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(part[r])), scales, acc[r]);
    }
  };
  // Tiles 0/4/6 and 1/5/7: accumulator, x block, weight block of even and odd blocks.
  _tile_zero(0);
  _tile_loadd(4, x, K);
  _tile_loadd(6, b, 64);
  _tile_dpbssd(0, 4, 6);
  for (int64_t kb = 0; kb < blocks; kb += 2) {
    const bool odd = kb + 1 < blocks;
    if (odd) {
      _tile_zero(1);
      _tile_loadd(5, x + (kb + 1) * 64, K);
      _tile_loadd(7, b + (kb + 1) * 1024, 64);
      _tile_dpbssd(1, 5, 7);
    }
    _tile_stored(0, part, 64);
    scale_into_acc(kb);
    if (!odd) break;
    if (kb + 2 < blocks) {
      _tile_zero(0);
      _tile_loadd(4, x + (kb + 2) * 64, K);
      _tile_loadd(6, b + (kb + 2) * 1024, 64);
      _tile_dpbssd(0, 4, 6);
    }
    _tile_stored(1, part, 64);
    scale_into_acc(kb + 1);
  }
  const int64_t N = w.N, cols = std::min<int64_t>(16, N - n0);
  if (cols <= 0) return;  // a padding tile
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
  for (int r = 0; r < 16; ++r) _mm512_mask_storeu_ps(a.y + (m0 + r) * N + n0, mask, acc[r]);
}

// Rows [m0, m0 + 16 * kRowTiles) x columns [n0, n0 + 32) of y. Each 64-channel block's int32 tile
// products are scaled into float accumulators (the block's row and column scales) for the rows that
// exist only: a decode step's few rows cost little more than their own tile instructions. Expects the
// tile configuration loaded.
template <int kRowTiles>
__attribute__((target("amx-tile,amx-int8,avx512f"))) void run_tiles(const Int8LinearArgs& a, int64_t m0, int64_t n0) {
  const PackedWeight& w = *a.w;
  const int64_t K = w.K, blocks = K / 64;
  const int8_t* x0 = a.xq + m0 * K;
  const int8_t* x1 = x0 + 16 * K;
  const int8_t* b0 = w.data.data() + (n0 / 16) * blocks * 1024;
  const int8_t* b1 = b0 + blocks * 1024;
  int64_t valid[2];  // real rows of each row tile
  for (int t = 0; t < 2; ++t) valid[t] = std::clamp<int64_t>(a.M - m0 - 16 * t, 0, 16);
  alignas(64) int32_t part[2 * kRowTiles][16][16];
  alignas(64) float acc[2 * kRowTiles][16][16] = {};
  static_assert(kBlock == 64, "one scale block is one tile of K");
  for (int64_t kb = 0; kb < blocks; ++kb) {  // each block of input channels has its own activation scales
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(4, x0 + kb * 64, K);
    _tile_loadd(6, b0 + kb * 1024, 64);
    _tile_loadd(7, b1 + kb * 1024, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_stored(0, part[0], 64);
    _tile_stored(1, part[1], 64);
    if constexpr (kRowTiles == 2) {
      _tile_zero(2);
      _tile_zero(3);
      _tile_loadd(5, x1 + kb * 64, K);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
      _tile_stored(2, part[2], 64);
      _tile_stored(3, part[3], 64);
    }
    // This block's weight scales of the 2 x 16 columns (packed [blocks][Np], padded with zeros).
    const __m512 col_scales[2] = {_mm512_loadu_ps(w.scale.data() + kb * w.Np + n0),
                                  _mm512_loadu_ps(w.scale.data() + kb * w.Np + n0 + 16)};
    for (int t = 0; t < 2 * kRowTiles; ++t) {  // acc += float(part) * row scale * column scale, one zmm per row
      const float* row_scales = a.x_scale + (m0 + (t / 2) * 16) * blocks + kb;
      for (int64_t r = 0; r < valid[t / 2]; ++r) {
        const __m512 products = _mm512_cvtepi32_ps(_mm512_load_si512(part[t][r]));
        const __m512 scales = _mm512_mul_ps(_mm512_set1_ps(row_scales[r * blocks]), col_scales[t % 2]);
        _mm512_store_ps(acc[t][r], _mm512_fmadd_ps(products, scales, _mm512_load_ps(acc[t][r])));
      }
    }
  }
  const int64_t N = w.N;
  for (int t = 0; t < 2 * kRowTiles; ++t) {
    const int64_t row0 = m0 + (t / 2) * 16, col0 = n0 + (t % 2) * 16, cols = std::min<int64_t>(16, N - col0);
    if (cols <= 0) continue;  // a padding tile
    for (int64_t r = 0; r < valid[t / 2]; ++r) std::memcpy(a.y + (row0 + r) * N + col0, acc[t][r], cols * sizeof(float));
  }
}

}  // namespace

__attribute__((target("amx-tile,amx-int8,avx512f"))) void run_block(const Int8LinearArgs& a, int64_t mb, int64_t nb) {
  // The tile configuration is per thread and other AMX code (onnxruntime's own kernels) may have changed
  // it since: loading it costs less than 1% of a work item.
  static const TileConfig config = make_config();
  _tile_loadconfig(&config);
  const int64_t m0 = mb * kRowBlock, n0 = nb * kColBlock;
  if (a.M - m0 >= kRowBlock) {  // whole tiles: sums in registers
    for (int64_t r = 0; r < kRowBlock; r += 16) {
      for (int64_t c = 0; c < kColBlock; c += 16) run_full_tile(a, m0 + r, n0 + c);
    }
    return;
  }
  if (a.M - m0 > 16) return run_tiles<2>(a, m0, n0);
  return run_tiles<1>(a, m0, n0);  // the second row tile would be padding only
}

}  // namespace llmc
