// 16 floats as one value (GCC/Clang vector extension: one AVX-512 register, or two AVX2 ones), loads
// from float, IEEE half (uint16_t) or int8 memory, and an exp for softmax. Used by paged_attention.cc.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace llmc {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }

// IEEE half -> float, one value (the portable path).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  const uint32_t bits = exponent == 0x1f ? sign | 0x7f800000u | (mantissa << 13)  // inf, nan
                                         : sign | ((exponent + 112) << 23) | (mantissa << 13);
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) { return half_to_float(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }

// 16 int8 codes as floats (unscaled).
inline f32x16 load16(const int8_t* p) {
  f32x16 v;
#if defined(__AVX512F__)
  const __m512 wide = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&v, &wide, sizeof(v));
#else
  for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
#endif
  return v;
}

inline f32x16 load16(const uint16_t* p) {
  f32x16 v;
#if defined(__AVX512F__)
  const __m512 wide = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&v, &wide, sizeof(v));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
#else
  for (int i = 0; i < 16; ++i) v[i] = half_to_float(p[i]);
#endif
  return v;
}

// dst[:n] = src[:n] as floats, 16 at a time.
inline void half_to_float(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(dst + i, load16(src + i));
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

// dst[:n] = a pool row src[:n] as floats: float and half rows as they are, int8 codes times their
// channels' scale[:n] (int8 pools have one static scale per channel; see paged_attention.h).
inline void row_to_float(const float* src, const float*, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void row_to_float(const uint16_t* src, const float*, float* dst, int64_t n) { half_to_float(src, dst, n); }
inline void row_to_float(const int8_t* src, const float* scale, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale[i];
}

// exp(x) for x <= 0 (softmax after subtracting the maximum), ~1e-7 relative error, no vector math
// library: exp(x) = 2^n e^f, n = round(x log2 e) (truncating t - 1/2 rounds t <= 0 to nearest),
// |f| <= ln2 / 2, e^f by its Taylor series to degree 6.
inline f32x16 exp_nonpositive(f32x16 x) {
  const f32x16 t = (x < -87.0f ? f32x16{} - 87.0f : x) * 1.44269504f;
  const i32x16 n = __builtin_convertvector(t - 0.5f, i32x16);
  const f32x16 f = (t - __builtin_convertvector(n, f32x16)) * 0.693147181f;
  f32x16 p = f * (1.0f / 720) + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  return p * reinterpret_cast<f32x16>((n + 127) << 23);  // 2^n, n in [-126, 0]
}

// silu(gate) * up: gate * sigmoid(gate), the sigmoid from exp(-|gate|) <= 1 (no overflow).
inline f32x16 silu_mul(f32x16 gate, f32x16 up) {
  const f32x16 e = exp_nonpositive(gate >= 0.0f ? -gate : gate);
  const f32x16 sigmoid = gate >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
  return gate * sigmoid * up;
}

}  // namespace llmc
