// llmc.Int8Linear's block products on AVX-512 VNNI and BF16, for CPUs without AMX (int8_linear.h). A row
// of a packed weight tile is 16 columns x 4 int8 K (or x 2 bf16 K): one zmm operand of VPDPBUSD (or
// VDPBF16PS), multiplied by one row's 4 codes (or 2 bf16 values) broadcast to all 16 lanes.
//
// VPDPBUSD multiplies unsigned by signed bytes, so the weights are packed + 128 (PackedWeight::biased) and
// the activations stay signed: sum_k (w + 128) x = sum_k w x + 128 sum_k x, and quantize_rows gives each
// row's sum_k x.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "int8_linear.h"

namespace llmc {
namespace {

constexpr int kChunkRows = 8;  // rows of a register block (LLMC_ROWS): 8 rows x 2 column zmm = 16 accumulators

// The accumulators are named variables, one per row and column tile, updated by inline assembly: GCC 12
// keeps an array of them on the stack, and copies each one through another register around its
// intrinsic every iteration (either measured ~2x slower). A row's broadcast codes are loaded once for
// both column tiles (a memory operand per instruction made the loop bound by loads).
#define LLMC_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)

inline int32_t load4(const void* bytes) {
  int32_t value;
  std::memcpy(&value, bytes, sizeof(value));
  return value;
}

// acc += w . x: VPDPBUSD (w unsigned, x signed bytes).
__attribute__((target("avx512f,avx512vnni"))) inline void dpbusd(__m512i& acc, __m512i w, __m512i x) {
  __asm__("vpdpbusd %[x], %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "v"(x));
}

// acc += w . x: VDPBF16PS (bf16 pairs).
__attribute__((target("avx512f,avx512bf16"))) inline void dpbf16(__m512& acc, __m512i w, __m512i x) {
  __asm__("vdpbf16ps %[x], %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "v"(x));
}

// out_c[r][0:16] = sum over Ki of x[r] . column tile c (c = 0, 1), r < kChunkRows: x int8 [kChunkRows, Ki]
// (row stride Ki), b0 / b1 the two column tiles' biased codes [Ki / 4][64].
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8_chunk(const int8_t* x, int64_t Ki, const uint8_t* b0,
                                                                       const uint8_t* b1, const int32_t* x_sum,
                                                                       int32_t (*out0)[16], int32_t (*out1)[16]) {
#define LLMC_ZERO(r) __m512i acc0_##r = _mm512_setzero_si512(), acc1_##r = _mm512_setzero_si512();
  LLMC_ROWS(LLMC_ZERO)
#undef LLMC_ZERO
  for (int64_t g = 0; g < Ki / 4; ++g) {  // 4 K at a time
    const __m512i w0 = _mm512_load_si512(b0 + 64 * g), w1 = _mm512_load_si512(b1 + 64 * g);
    const int8_t* column = x + 4 * g;
#define LLMC_DOT(r)                                                   \
  {                                                                   \
    const __m512i codes = _mm512_set1_epi32(load4(column + r * Ki));  \
    dpbusd(acc0_##r, w0, codes);                                      \
    dpbusd(acc1_##r, w1, codes);                                      \
  }
    LLMC_ROWS(LLMC_DOT)
#undef LLMC_DOT
  }
#define LLMC_STORE(r)                                                   \
  {                                                                     \
    const __m512i bias = _mm512_set1_epi32(128 * x_sum[r]);             \
    _mm512_store_si512(out0[r], _mm512_sub_epi32(acc0_##r, bias));      \
    _mm512_store_si512(out1[r], _mm512_sub_epi32(acc1_##r, bias));      \
  }
  LLMC_ROWS(LLMC_STORE)
#undef LLMC_STORE
}

// The same for the bf16 outliers: x [kChunkRows, Ko] bf16, b0 / b1 [Ko / 2][32] bf16, float sums.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void bf16_chunk(const uint16_t* x, int64_t Ko,
                                                                       const uint16_t* b0, const uint16_t* b1,
                                                                       float (*out0)[16], float (*out1)[16]) {
#define LLMC_ZERO(r) __m512 acc0_##r = _mm512_setzero_ps(), acc1_##r = _mm512_setzero_ps();
  LLMC_ROWS(LLMC_ZERO)
#undef LLMC_ZERO
  for (int64_t p = 0; p < Ko / 2; ++p) {  // 2 K at a time
    const __m512i w0 = _mm512_load_si512(b0 + 32 * p), w1 = _mm512_load_si512(b1 + 32 * p);
    const uint16_t* column = x + 2 * p;
#define LLMC_DOT(r)                                                  \
  {                                                                  \
    const __m512i pair = _mm512_set1_epi32(load4(column + r * Ko));  \
    dpbf16(acc0_##r, w0, pair);                                      \
    dpbf16(acc1_##r, w1, pair);                                      \
  }
    LLMC_ROWS(LLMC_DOT)
#undef LLMC_DOT
  }
#define LLMC_STORE(r)                      \
  _mm512_store_ps(out0[r], acc0_##r);      \
  _mm512_store_ps(out1[r], acc1_##r);
  LLMC_ROWS(LLMC_STORE)
#undef LLMC_STORE
}
#undef LLMC_ROWS

}  // namespace

void block_products_vnni(const Int8LinearArgs& a, int64_t m0, int64_t n0, BlockSums& out) {
  const PackedWeight& w = *a.w;
  const int64_t Ki = w.Ki, Ko = w.Ko, tile = n0 / 16;
  const uint8_t* codes = reinterpret_cast<const uint8_t*>(w.data.data()) + tile * Ki * 16;  // [2][Ki / 4][64]
  const uint16_t* outliers = w.outlier.data() + tile * Ko * 16;                          // [2][Ko / 2][32]
  // rows in whole chunks: the scratch rows past M (to a multiple of kRowBlock) are zeros
  const int64_t rows = std::min<int64_t>(kRowBlock, (a.M - m0 + kChunkRows - 1) / kChunkRows * kChunkRows);
  for (int64_t i = 0; i < rows; i += kChunkRows) {
    const int t = static_cast<int>(i / 16) * 2;
    const int64_t r = i % 16, m = m0 + i;
    int8_chunk(a.xq + m * Ki, Ki, codes, codes + Ki * 16, a.x_sum + m, &out.sums[t][r], &out.sums[t + 1][r]);
    if (Ko > 0) {
      bf16_chunk(a.xo + m * Ko, Ko, outliers, outliers + Ko * 16, &out.outliers[t][r], &out.outliers[t + 1][r]);
    }
  }
}

}  // namespace llmc
