// Device-side copies shared by the kernel families.
#pragma once

#include <cstdint>

namespace ep::kernels {

// The whole block copies `bytes`: 16 bytes per access where both ends allow it. `Load` reads an
// int4 or a char (plain, or __ldcg where the source is rewritten by another process meanwhile).
template <typename Load>
__device__ __forceinline__ void block_copy(char* dst, const char* src, uint64_t bytes, Load load) {
  uint64_t done = 0;
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0) {
    const uint64_t vectors = bytes / 16;
    auto* d = reinterpret_cast<int4*>(dst);
    const auto* s = reinterpret_cast<const int4*>(src);
    for (uint64_t i = threadIdx.x; i < vectors; i += blockDim.x) d[i] = load(s + i);
    done = vectors * 16;
  }
  for (uint64_t i = done + threadIdx.x; i < bytes; i += blockDim.x) dst[i] = load(src + i);
}

struct PlainLoad {
  template <typename T>
  __device__ __forceinline__ T operator()(const T* p) const { return *p; }
};

// Bypasses L1: for memory another process rewrites while this kernel runs (staging slots).
struct CachedGlobalLoad {
  template <typename T>
  __device__ __forceinline__ T operator()(const T* p) const { return __ldcg(p); }
};

__device__ __forceinline__ void block_copy(char* dst, const char* src, uint64_t bytes) {
  block_copy(dst, src, bytes, PlainLoad{});
}

}  // namespace ep::kernels
