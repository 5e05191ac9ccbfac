// What llmc's AMX kernels (int8_linear.cc, paged_attention_amx.cc) share: whether the tiles are usable
// here, the tile configuration they all run with, and float -> bf16 rounding.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#ifdef LLMC_AMX_EMULATION
#include "amx_emulation.h"
#endif

namespace llmc {

// Whether this CPU and OS run AMX int8 and bf16 tiles (CPUID, XCR0, and Linux's per-process permission).
bool amx_usable();
// Whether they run AVX-512 (F, BW, VL) with BF16 (VDPBF16PS): the kernels' path where AMX is missing.
bool avx512_bf16_usable();

// The LDTILECFG operand.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All 8 tiles 16 rows x 64 bytes: what every llmc kernel uses. The configuration is per thread and
// other AMX code (onnxruntime's own kernels) may change it, so kernels load it per work item (it costs
// less than 1% of one).
inline const TileConfig& full_tiles() {
  static const TileConfig config = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.rows[t] = 16;
      c.colsb[t] = 64;
    }
    return c;
  }();
  return config;
}

// float -> bf16, rounding to nearest even (as onnxruntime's Cast), NaN kept a NaN.
inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace llmc
