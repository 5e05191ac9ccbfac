// llmc.Int8Linear on AMX: y[M, N] = sum over blocks b of 64 input channels of (x[M, b] quantized to int8,
// one scale per row and block) . (w[N, b] int8, one scale per output channel and block)^T, in float. The op's ONNX function body
// (compiler/onnx_int8_linear.py) computes the same with MatMulInteger; this kernel runs it on the
// CPU's AMX tiles (TDPBSSD: 16x64 int8 . 64x16 int8 -> 16x16 int32).
#pragma once

#include <cstdint>
#include <vector>

namespace llmc {

// Whether this CPU and OS run AMX int8 tiles (CPUID, XCR0, and Linux's per-process permission).
bool amx_int8_usable();

// The weight in the tiles' layout: [N/16][K/64][16 rows of K/4][16 columns x 4 K] int8, padded with zeros
// to whole tiles; built once per weight.
struct PackedWeight {
  int64_t N = 0, K = 0, Np = 0;
  std::vector<int8_t> data;
  std::vector<float> scale;  // [K / kBlock][Np]: the weight's scales by block, columns contiguous
};
PackedWeight pack_weight(const int8_t* w, const float* scale, int64_t N, int64_t K);  // scale [N, K / kBlock]

struct Int8LinearArgs {
  const float* x;          // [M, K]
  const PackedWeight* w;
  float* y;                // [M, N]
  int64_t M;
  int8_t* xq;              // [Mp, K] scratch: x quantized per row and block (zero rows as padding)
  float* x_scale;          // [Mp, K / kBlock]
};

constexpr int64_t kBlock = 64;     // input channels per activation scale (one AMX tile of K)
constexpr int64_t kRowBlock = 32;  // rows of x per work item (2 tiles)
constexpr int64_t kColBlock = 32;  // columns of y per work item (2 tiles)

int64_t padded_rows(int64_t M);
void quantize_rows(const Int8LinearArgs& a, int64_t row_begin, int64_t row_end);
// One work item: rows [32 * mb, +32) x columns [32 * nb, +32) of y.
void run_block(const Int8LinearArgs& a, int64_t mb, int64_t nb);

}  // namespace llmc
