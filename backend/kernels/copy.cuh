// Device-side copies shared by the kernel families.
#pragma once

#include <cstdint>

namespace ep::kernels {

// The whole block copies `bytes`: 16 bytes per access where both ends sit at the same offset
// within 16 bytes (after a head of single bytes), else 4 bytes per access where both ends allow
// it, else single bytes. `Load` reads an int4, int or char (plain, or __ldcg where the source is
// rewritten by another process meanwhile). kUnroll > 1 keeps that many loads of each thread in
// flight before it stores (the ranges must not overlap): what bulk copies need to cover memory
// latency.
template <int kUnroll = 1, typename Load>
__device__ __forceinline__ void block_copy(char* dst, const char* src, uint64_t bytes, Load load) {
  const uintptr_t d_addr = reinterpret_cast<uintptr_t>(dst), s_addr = reinterpret_cast<uintptr_t>(src);
  uint64_t done = 0;
  if (((d_addr ^ s_addr) & 15) == 0) {
    const uint64_t head = ((16 - (d_addr & 15)) & 15) < bytes ? (16 - (d_addr & 15)) & 15 : bytes;
    for (uint64_t i = threadIdx.x; i < head; i += blockDim.x) dst[i] = load(src + i);
    const uint64_t vectors = (bytes - head) / 16;
    auto* d = reinterpret_cast<int4*>(dst + head);
    const auto* s = reinterpret_cast<const int4*>(src + head);
    uint64_t i = threadIdx.x;
    for (; i + uint64_t(kUnroll - 1) * blockDim.x < vectors; i += uint64_t(kUnroll) * blockDim.x) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load(s + i + uint64_t(u) * blockDim.x);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) d[i + uint64_t(u) * blockDim.x] = v[u];
    }
    for (; i < vectors; i += blockDim.x) d[i] = load(s + i);
    done = head + vectors * 16;
  } else if (((d_addr | s_addr) & 3) == 0) {
    const uint64_t words = bytes / 4;
    auto* d = reinterpret_cast<int*>(dst);
    const auto* s = reinterpret_cast<const int*>(src);
    for (uint64_t i = threadIdx.x; i < words; i += blockDim.x) d[i] = load(s + i);
    done = words * 4;
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

template <int kUnroll = 1>
__device__ __forceinline__ void block_copy(char* dst, const char* src, uint64_t bytes) {
  block_copy<kUnroll>(dst, src, bytes, PlainLoad{});
}

}  // namespace ep::kernels
