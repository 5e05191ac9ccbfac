// llmc.Int4Linear: y[M, N] = x[M, K] . W[N, K]^T for a weight of int4 codes per group of G input channels,
// W[n, k] = scale[n, g] * code[n, k] + offset[n, g] (g = k / G, offset = -scale * zero, both float16), the
// activations quantized to int8 per block of 32 input channels (one scale a block, as onnxruntime's
// MatMulNBits at accuracy level 4). For batch-1 and small-batch decode, where a step streams every weight
// once: per weight 4 bits of code and, per group of 128, 4 bytes of scale and offset (0.53 bytes a weight,
// vs 0.64 for MatMulNBits, which keeps a float scale per block of 32 activations).
//
//   y[m, n] = sum_g scale[n, g] * sum_{b in g} a[m, b] * sum_{k in b} xq[m, k] * code[n, k]
//           + offset[n, g] * xsum[m, g],       xsum[m, g] = sum_{b in g} a[m, b] * sum_{k in b} xq[m, k]
//
// The products run on AVX-512 VNNI (VPDPBUSD: the codes are its unsigned operand, the activations its signed
// one). The op's ONNX function body (compiler/onnx_int4_linear.py) computes the same with standard ops.
#pragma once

#include <cstdint>

#include "aligned_vector.h"

namespace llmc {

constexpr int64_t kInt4Block = 32;  // input channels per activation scale; K and G are multiples of it
constexpr int64_t kInt4Tile = 16;   // output columns of a tile: one zmm of int32 or float lanes
constexpr int64_t kInt4Rows = 4;    // rows of x that share one pass over a tile's codes

// The weight in the kernel's layout, built once per weight. Tile t holds columns [16 t, 16 t + 16) (zero
// codes past N), or with glu its gate (t even) or up (t odd) columns of outputs [8 t, 8 t + 16).
struct PackedInt4 {
  int64_t N = 0, K = 0, group = 0, num_groups = 0, num_tiles = 0;
  bool glu = false;
  // [tiles][K / 8][64]: byte 4 c + i of octet o is code(8 o + i, c) | code(8 o + 4 + i, c) << 4 (column c of
  // the tile): the low nibbles are VPDPBUSD's operand for channels 8 o .. 8 o + 3, the high ones for the next 4
  AlignedVector<uint8_t> codes;
  AlignedVector<uint16_t> scale;   // [tiles][num_groups][16] float16
  AlignedVector<uint16_t> offset;  // [tiles][num_groups][16] float16: -scale * zero
};

// w [N, K / 2] (code of channel 2 j in the low nibble of byte j), scale [N, num_groups] float16, zero [N,
// num_groups] uint8. glu: w is gate | up ([2 I, K]) and the op returns silu(gate) * up [M, I].
PackedInt4 pack_int4(const uint8_t* w, const uint16_t* scale, const uint8_t* zero, int64_t N, int64_t K,
                     int64_t group, bool glu);

// x quantized per block of 32 channels: xq int8 [M, K], a [M, K / 32] the blocks' scales (max |x| / 127, 1
// for a block of zeros), xsum [M, num_groups] as above.
struct Int4Activations {
  int8_t* xq;
  float* a;
  float* xsum;
};
void quantize_int4_rows(const float* x, int64_t row_begin, int64_t row_end, const PackedInt4& w,
                        const Int4Activations& act);

// y's tiles [tile_begin, tile_end) for rows [0, M) (y [M, N], or [M, N / 2] with glu; glu tile ranges even).
void int4_tiles(const PackedInt4& w, const Int4Activations& act, int64_t M, int64_t tile_begin, int64_t tile_end,
                float* y);

// Whether this CPU and OS run the kernel (AVX-512 F, BW, VNNI and F16C, with the zmm state saved).
bool int4_usable();

}  // namespace llmc
