// A scalar model of the AMX instructions llmc's kernels use (LDTILECFG, TILEZERO, TILELOADD,
// TILESTORED, TDPBF16PS, TDPBSSD), following their definitions in Intel's ISA reference. Compiled in
// with -DLLMC_AMX_EMULATION by the tests only, so that the AMX kernels are checked on CPUs without AMX
// (slowly); the library engines load never has it. Included by amx_tiles.h after <immintrin.h>: its
// macros replace the intrinsics of the same names.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace llmc::amx_emulation {

struct Tiles {
  int rows[8] = {};
  int colsb[8] = {};
  alignas(64) uint8_t data[8][16][64] = {};
};

inline Tiles& tiles() {
  thread_local Tiles state;
  return state;
}

inline void load_config(const void* config) {
  const uint8_t* c = static_cast<const uint8_t*>(config);
  for (int t = 0; t < 8; ++t) {
    uint16_t colsb;
    std::memcpy(&colsb, c + 16 + 2 * t, sizeof(colsb));
    tiles().colsb[t] = colsb;
    tiles().rows[t] = c[48 + t];
  }
}

inline void zero(int t) { std::memset(tiles().data[t], 0, sizeof(tiles().data[t])); }

inline void load(int t, const void* base, int64_t stride) {
  zero(t);
  for (int r = 0; r < tiles().rows[t]; ++r) {
    std::memcpy(tiles().data[t][r], static_cast<const uint8_t*>(base) + r * stride, tiles().colsb[t]);
  }
}

inline void store(int t, void* base, int64_t stride) {
  for (int r = 0; r < tiles().rows[t]; ++r) {
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, tiles().data[t][r], tiles().colsb[t]);
  }
}

template <typename T>
inline T element(int t, int row, int index) {
  T value;
  std::memcpy(&value, tiles().data[t][row] + index * sizeof(T), sizeof(T));
  return value;
}

inline float bf16_value(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// C[m][n] (float) += sum_k A[m][2k + i] * B[k][2n + i], i = 0, 1 (bf16 pairs).
inline void dpbf16ps(int c, int a, int b) {
  for (int m = 0; m < tiles().rows[c]; ++m) {
    for (int n = 0; n < tiles().colsb[c] / 4; ++n) {
      float sum = element<float>(c, m, n);
      for (int k = 0; k < tiles().colsb[a] / 4; ++k) {
        for (int i = 0; i < 2; ++i) {
          sum += bf16_value(element<uint16_t>(a, m, 2 * k + i)) * bf16_value(element<uint16_t>(b, k, 2 * n + i));
        }
      }
      std::memcpy(tiles().data[c][m] + 4 * n, &sum, sizeof(sum));
    }
  }
}

// C[m][n] (int32) += sum_k A[m][4k + i] * B[k][4n + i], i = 0..3 (signed bytes).
inline void dpbssd(int c, int a, int b) {
  for (int m = 0; m < tiles().rows[c]; ++m) {
    for (int n = 0; n < tiles().colsb[c] / 4; ++n) {
      int32_t sum = element<int32_t>(c, m, n);
      for (int k = 0; k < tiles().colsb[a] / 4; ++k) {
        for (int i = 0; i < 4; ++i) sum += element<int8_t>(a, m, 4 * k + i) * element<int8_t>(b, k, 4 * n + i);
      }
      std::memcpy(tiles().data[c][m] + 4 * n, &sum, sizeof(sum));
    }
  }
}

}  // namespace llmc::amx_emulation

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#undef _tile_dpbssd
#define _tile_loadconfig(config) ::llmc::amx_emulation::load_config(config)
#define _tile_zero(t) ::llmc::amx_emulation::zero(t)
#define _tile_loadd(t, base, stride) ::llmc::amx_emulation::load(t, base, stride)
#define _tile_stored(t, base, stride) ::llmc::amx_emulation::store(t, base, stride)
#define _tile_dpbf16ps(c, a, b) ::llmc::amx_emulation::dpbf16ps(c, a, b)
#define _tile_dpbssd(c, a, b) ::llmc::amx_emulation::dpbssd(c, a, b)
