// Device-side synchronisation shared by the kernel families: system-scope flag loads and stores
// (peers on other GPUs or in other processes see them), and waits bounded by the group's
// timeout so that a peer that never comes cannot hang a kernel.
#pragma once

#include <cstdint>

namespace ep::kernels {

__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// The deadline `times` (>= 1) x timeout_ns from now, saturating: a timeout near UINT64_MAX (no
// bound) must not wrap into a deadline already past.
__device__ __forceinline__ uint64_t deadline_after(uint64_t timeout_ns, uint64_t times = 1) {
  const uint64_t now = now_ns(), room = UINT64_MAX - now;
  return timeout_ns <= room / times ? now + timeout_ns * times : UINT64_MAX;
}

// A kernel's report in a host-mapped word: the first one wins, mostly. A plain check-then-store (a
// race only picks which report shows), as the word is pinned host memory, where device atomics are
// not guaranteed on every platform; fenced, so that the host sees it before what follows.
__device__ __forceinline__ void report_first(int* word, int code) {
  volatile int* w = word;
  if (*w == 0) *w = code;
  __threadfence_system();
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// A flag's accesses at system scope (kGpu false: the functions above) or GPU scope (kGpu true):
// enough where every thread that reads or writes the word runs on this GPU (ranks that share it
// under MPS, each in its own process), not for a peer on another GPU.
template <bool kGpu>
__device__ __forceinline__ uint32_t scoped_load_acquire(const uint32_t* p) {
  if constexpr (!kGpu) return load_acquire(p);
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

template <bool kGpu>
__device__ __forceinline__ void scoped_store_release(uint32_t* p, uint32_t v) {
  if constexpr (!kGpu) store_release(p, v);
  else asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

template <bool kGpu>
__device__ __forceinline__ void scoped_fence() {
  if constexpr (kGpu) __threadfence();
  else __threadfence_system();
}

// The same with the scope chosen at run time: `gpu` a kernel parameter, alike in every thread.
__device__ __forceinline__ uint32_t load_acquire_in(const uint32_t* p, bool gpu) {
  return gpu ? scoped_load_acquire<true>(p) : load_acquire(p);
}
__device__ __forceinline__ void store_release_in(uint32_t* p, uint32_t v, bool gpu) {
  if (gpu) scoped_store_release<true>(p, v);
  else store_release(p, v);
}
__device__ __forceinline__ void fence_in(bool gpu) {
  if (gpu) __threadfence();
  else __threadfence_system();
}

// Waits until *flag != 0, leaving it; false after the deadline (the peer never came). No abort
// word: its callers' flags are a CudaTransport's, whose watchdog releases a failed transport's
// waits by setting them (CudaTransport::release_waits).
template <bool kGpu = false>
__device__ __forceinline__ bool wait_set(const uint32_t* flag, uint64_t deadline) {
  while (scoped_load_acquire<kGpu>(flag) == 0) {
    if (now_ns() > deadline) return false;
    __nanosleep(100);
  }
  return true;
}

// wait_set, then clears the flag.
template <bool kGpu = false>
__device__ __forceinline__ bool take_flag(uint32_t* flag, uint64_t deadline) {
  if (!wait_set<kGpu>(flag, deadline)) return false;
  *flag = 0;
  return true;
}

// Waits until *flag == value, leaving it; false after the deadline or once the group is aborted
// (*abort, a host-mapped word: read only every few polls). `gpu`: the loads at GPU scope.
__device__ __forceinline__ bool wait_for(const uint32_t* flag, uint32_t value, uint64_t deadline, const int* abort,
                                         bool gpu = false) {
  for (uint32_t polls = 1; load_acquire_in(flag, gpu) != value; ++polls) {
    if (now_ns() > deadline) return false;
    if (polls % 64 == 0 && *reinterpret_cast<const volatile int*>(abort)) return false;
    __nanosleep(100);
  }
  return true;
}

// Waits until *flag != 0, then clears it; false as wait_for.
__device__ __forceinline__ bool take(uint32_t* flag, uint64_t deadline, const int* abort, bool gpu = false) {
  for (uint32_t polls = 1; load_acquire_in(flag, gpu) == 0; ++polls) {
    if (now_ns() > deadline) return false;
    if (polls % 64 == 0 && *reinterpret_cast<const volatile int*>(abort)) return false;
    __nanosleep(100);
  }
  *flag = 0;
  return true;
}

}  // namespace ep::kernels
