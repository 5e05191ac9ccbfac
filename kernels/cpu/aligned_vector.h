// std::vector with its buffer on a 64-byte boundary: an AMX tile row or an AVX-512 load that straddles
// two cache lines costs two (malloc's 16-byte alignment made every tile row of the int8 GEMM do so:
// ~1.3x slower, measured side by side).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace llmc {

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlignment)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlignment); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace llmc
