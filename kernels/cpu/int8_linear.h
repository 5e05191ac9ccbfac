// llmc.Int8Linear on AMX: y[M, N] = (q_x[M, Ki] . w[N, Ki]^T) * x_scale[M] * w_scale[N] + bf16(x_o[M, Ko]) . w_o[N, Ko]^T
// in float, over the input channels in the op's order `channels` [K] (the first Ki inlier, the last Ko
// outlier channels): the inliers quantized to int8 with one scale per row, the few outlier channels
// (the calibration's largest activations) in bf16 on their own. The op's ONNX function body
// (compiler/onnx_int8_linear.py) computes the same with MatMulInteger; this kernel runs the int8 part
// on AMX int8 tiles (TDPBSSD: 16x64 . 64x16 -> 16x16 int32, summed over all of Ki in the tiles) and the
// outliers on AMX bf16 tiles (TDPBF16PS: 16x32 . 32x16 -> 16x16 float). On CPUs without AMX that have
// AVX-512 VNNI and BF16 (AMD Zen 4 and 5, Intel Cooper Lake) the same packed layout feeds VPDPBUSD and
// VDPBF16PS instead (int8_linear_vnni.cc): a tile row of the weights is one zmm operand of either.
#pragma once

#include <cstdint>
#include <vector>

#include "aligned_vector.h"
#include "amx_tiles.h"

namespace llmc {

// The weights in the tiles' layouts, padded with zeros to whole tiles; built once per weight.
// Which instructions run the GEMM: AMX tiles, AVX-512 VNNI + BF16, or none (the op is not registered
// and onnxruntime runs its function body).
enum class Int8Backend : int { kNone = 0, kAmx = 1, kAvx512Vnni = 2 };
// The best backend this CPU and OS run; LLMC_INT8_BACKEND=avx512-vnni or none asks for a lesser one (tests,
// A/B runs). Read on each call: a session created after the variable changes sees the new value.
Int8Backend int8_backend();
bool avx512_vnni_usable();

struct PackedWeight {
  int64_t N = 0, Ki = 0, Ko = 0, Np = 0;
  // biased: the codes are stored + 128 as unsigned bytes, VPDPBUSD's unsigned operand (VNNI backend)
  bool biased = false;
  AlignedVector<int8_t> data;       // [Np/16][Ki/64][16 rows of Ki/4][16 columns x 4 K]
  AlignedVector<uint16_t> outlier;  // [Np/16][Ko/32][16 rows of Ko/2][16 columns x 2 K], bf16
  std::vector<float> scale;       // [Np]
  std::vector<int32_t> channels;  // [Ki + Ko]: the input channel of each packed position
  std::vector<uint16_t> inlier_masks;  // [ceil(K / 16)]: bit c of mask i: channel 16 i + c is an inlier
};
// w [N, Ki] int8, w_scale [N], w_outlier [N, Ko] float (bf16 values), channels [Ki + Ko]; packed column n
// is weight row column_order[n] (all rows in order without one).
PackedWeight pack_weight(const int8_t* w, const float* w_scale, const float* w_outlier, const int64_t* channels,
                         int64_t N, int64_t Ki, int64_t Ko, const int64_t* column_order = nullptr,
                         bool biased = false);
// The packed column order of an Int8LinearGLU weight [N = 2 I, K] = gate | up (I a multiple of 16): each
// block of 32 columns is 16 gate columns and the 16 up columns of the same outputs.
std::vector<int64_t> glu_column_order(int64_t N);
constexpr int64_t kStreamBytes = 2 << 20;  // outputs of at least this many bytes are written past the caches

struct Int8LinearArgs {
  const float* x;          // [M, K], or with swiglu [M, 2K]: gate | up, x being silu(gate) * up
  const PackedWeight* w;
  // y[M, N] as up to 3 outputs side by side: columns [y_begin[o], y_begin[o + 1]) in y[o] (rows of
  // y_begin[o + 1] - y_begin[o]); the boundaries are multiples of 16 (whole tiles).
  float* y[3];
  int64_t y_begin[4];
  int64_t M;
  int8_t* xq;              // [Mp, Ki] scratch: the inliers quantized per row (zero rows as padding)
  uint16_t* xo;            // [Mp, Ko] scratch: the outliers in bf16
  float* x_scale;          // [Mp]
  int32_t* x_sum;          // [Mp]: the sum of each row's codes (the VNNI backend takes 128 x it off its sums)
  bool swiglu = false;
  // glu: the packed columns alternate 16 gate and 16 up columns (glu_column_order) and y[0] is [M, N / 2]
  // = silu(gate) * up, applied as the tiles are stored
  bool glu = false;
  bool stream = false;     // write y with non-temporal stores (outputs far larger than the caches)
};

constexpr int64_t kOutputAlign = 16;  // output boundaries of a split Int8Linear: whole tiles of columns

constexpr int64_t kRowBlock = 32;  // rows of a block of y (2 tiles); a work item is a range of blocks
constexpr int64_t kColBlock = 32;  // columns of a block of y (2 tiles)
constexpr int64_t kInlierAlign = 64;   // Ki: whole int8 tiles of K
constexpr int64_t kOutlierAlign = 32;  // Ko: whole bf16 tiles of K

int64_t padded_rows(int64_t M);
void quantize_rows(const Int8LinearArgs& a, int64_t row_begin, int64_t row_end);
// A GEMM work item: row blocks [mb_begin, mb_end) x column blocks [nb_begin, nb_end) of y.
struct GemmItem {
  int64_t mb_begin, mb_end, nb_begin, nb_end;
};
constexpr int64_t kItemRowBlocks = 16;              // 512 rows
constexpr int64_t kItemWeightBytes = 256 * 1024;    // an item's packed weights (L2)
constexpr int64_t kMinItems = 32;
std::vector<GemmItem> plan_items(const PackedWeight& w, int64_t M);
void run_item(const Int8LinearArgs& a, const GemmItem& item);

// One 32 x 32 block's products, as the backends leave them: int8 sums and the outliers' float sums, as
// 4 tiles (t = 2 * row tile + column tile) of 16 x 16.
struct BlockSums {
  alignas(64) int32_t sums[4][16][16];
  alignas(64) float outliers[4][16][16];
};
// The block at rows m0, columns n0 on AVX-512 VNNI + BF16 (rows past M that the padding holds included).
void block_products_vnni(const Int8LinearArgs& a, int64_t m0, int64_t n0, BlockSums& out);

}  // namespace llmc
