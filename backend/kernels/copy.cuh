// Device-side copies shared by the kernel families.
#pragma once

#include <cstdint>

namespace ep::kernels {

// The whole block copies `bytes`: 16 bytes per access where both ends sit at the same offset
// within 16 bytes (after a head of single bytes), else 4 bytes per access where both ends allow
// it, else single bytes. `Load` reads an int4, int or char (plain, or __ldcg where the source is
// rewritten by another process meanwhile, or evict-first); `Store` writes one (plain or
// evict-first). kUnroll > 1 keeps that many loads of each thread in
// flight before it stores (the ranges must not overlap): what bulk copies need to cover memory
// latency. kThreads, where given, is blockDim.x known at compile time: the addresses of a thread's
// loads then differ by constants, which spares the registers that many loads in flight need.
template <int kUnroll = 1, int kThreads = 0, typename Load, typename Store>
__device__ __forceinline__ void block_copy(char* dst, const char* src, uint64_t bytes, Load load, Store store) {
  const uint32_t threads = kThreads > 0 ? uint32_t(kThreads) : blockDim.x;
  const uintptr_t d_addr = reinterpret_cast<uintptr_t>(dst), s_addr = reinterpret_cast<uintptr_t>(src);
  uint64_t done = 0;
  if (((d_addr ^ s_addr) & 15) == 0) {
    const uint64_t head = ((16 - (d_addr & 15)) & 15) < bytes ? (16 - (d_addr & 15)) & 15 : bytes;
    for (uint64_t i = threadIdx.x; i < head; i += threads) store(dst + i, load(src + i));
    const uint64_t vectors = (bytes - head) / 16;
    auto* d = reinterpret_cast<int4*>(dst + head);
    const auto* s = reinterpret_cast<const int4*>(src + head);
    uint64_t i = threadIdx.x;
    for (; i + uint64_t(kUnroll - 1) * threads < vectors; i += uint64_t(kUnroll) * threads) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load(s + i + uint64_t(u) * threads);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) store(d + i + uint64_t(u) * threads, v[u]);
    }
    // The rest (under kUnroll passes of the block) in one predicated pass: its loads in flight
    // together too, not one round trip each.
    if (i < vectors) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        v[u] = i + uint64_t(u) * threads < vectors ? load(s + i + uint64_t(u) * threads) : int4{};
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (i + uint64_t(u) * threads < vectors) store(d + i + uint64_t(u) * threads, v[u]);
    }
    done = head + vectors * 16;
  } else if (((d_addr | s_addr) & 3) == 0) {
    const uint64_t words = bytes / 4;
    auto* d = reinterpret_cast<int*>(dst);
    const auto* s = reinterpret_cast<const int*>(src);
    for (uint64_t i = threadIdx.x; i < words; i += threads) store(d + i, load(s + i));
    done = words * 4;
  }
  for (uint64_t i = done + threadIdx.x; i < bytes; i += threads) store(dst + i, load(src + i));
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

// For a source read once (the caller's input): evict-first in L1 and L2, so that a bulk copy
// leaves the caches to what is read again soon (the staging slots between their fill and drain).
struct StreamingLoad {
  template <typename T>
  __device__ __forceinline__ T operator()(const T* p) const { return __ldcs(p); }
};

struct PlainStore {
  template <typename T>
  __device__ __forceinline__ void operator()(T* p, const T& v) const { *p = v; }
};

// For a destination written once and not read by this kernel (the caller's output): evict-first.
struct StreamingStore {
  template <typename T>
  __device__ __forceinline__ void operator()(T* p, const T& v) const { __stcs(p, v); }
};

// block_copy as a call of its own, for bulk copies inside kernels that keep much state across
// them: its loads in flight get the registers to themselves instead of spilling that state.
template <int kUnroll, int kThreads, typename Load, typename Store>
__device__ __noinline__ void block_copy_call(char* dst, const char* src, uint64_t bytes, Load load, Store store) {
  block_copy<kUnroll, kThreads>(dst, src, bytes, load, store);
}

template <int kUnroll = 1, int kThreads = 0, typename Load>
__device__ __forceinline__ void block_copy(char* dst, const char* src, uint64_t bytes, Load load) {
  block_copy<kUnroll, kThreads>(dst, src, bytes, load, PlainStore{});
}

template <int kUnroll = 1, int kThreads = 0>
__device__ __forceinline__ void block_copy(char* dst, const char* src, uint64_t bytes) {
  block_copy<kUnroll, kThreads>(dst, src, bytes, PlainLoad{}, PlainStore{});
}

}  // namespace ep::kernels
