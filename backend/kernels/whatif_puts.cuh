// A what-if for measurements on one machine (TORCH_EP_WHATIF_COPY_PUTS=1; never the default): a put
// whose destination NVSHMEM maps here (P2P: the virtual nodes of one GPU) moves its bytes by the
// kernel's own copy, several 16-byte loads a lane in flight, then fences and signals. Everywhere
// else (a NIC, a rank nvshmem_ptr does not map) it is NVSHMEM's put, as without the switch.
//
// Why: over P2P, NVSHMEM's put is a copy by the calling threads with one load in flight per
// thread (nvshmemi_memcpy_threadgroup), so on one GPU the hops "across nodes" run at that loop's
// rate, where a NIC would move the bytes by DMA. Timing a route with and without the switch, in
// one run, measures how much of its cost on this machine is that loop. The product path keeps
// NVSHMEM's device API for every access across nodes (issue 15): a raw nvshmem_ptr pointer is
// what no NIC can serve.
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "backend/kernels/copy.cuh"
#include "backend/kernels/low_latency_device.cuh"  // ll::warp_copy_l2

namespace ep::kernels {
// Internal linkage throughout: each -rdc translation unit that includes this keeps its own copy.
namespace {

// The what-if's put: false where NVSHMEM does not map `dst` on `pe` or an end is not 16-byte
// aligned (the caller puts as usual). Not inlined, so that the kernels' registers stay what they
// are without the switch.
__device__ __noinline__ bool whatif_copy_put(void* dst, const void* src, size_t bytes, uint64_t* signal,
                                             uint64_t value, int op, int pe) {
  char* mapped = static_cast<char*>(nvshmem_ptr(dst, pe));
  if (!mapped || ((reinterpret_cast<uintptr_t>(mapped) | reinterpret_cast<uintptr_t>(src)) & 15) != 0) return false;
  const int lane = threadIdx.x & 31;
  ll::warp_copy_l2(reinterpret_cast<uint4*>(mapped), static_cast<const uint4*>(src), int64_t(bytes / 16), lane);
  for (size_t i = bytes / 16 * 16 + lane; i < bytes; i += 32) mapped[i] = static_cast<const char*>(src)[i];
  __threadfence_system();  // every lane's stores, before the signal that says they landed
  __syncwarp();
  if (lane == 0) nvshmemx_signal_op(signal, value, op, pe);
  __syncwarp();
  return true;
}

// nvshmemx_putmem_signal_nbi_warp, or in the what-if's kernel instances (kCopy) the warp's own copy
// where it applies. Every lane of the warp calls it.
template <bool kCopy>
__device__ __forceinline__ void put_signal_nbi_warp(void* dst, const void* src, size_t bytes, uint64_t* signal,
                                                    uint64_t value, int op, int pe) {
  if constexpr (kCopy)
    if (whatif_copy_put(dst, src, bytes, signal, value, op, pe)) return;
  nvshmemx_putmem_signal_nbi_warp(dst, src, bytes, signal, value, op, pe);
}

// The block's what-if put: false where NVSHMEM does not map `dst` on `pe` (the caller puts as
// usual). Every thread of the block calls it.
__device__ __noinline__ bool whatif_copy_put_block(void* dst, const void* src, size_t bytes, uint64_t* signal,
                                                   uint64_t value, int op, int pe) {
  char* mapped = static_cast<char*>(nvshmem_ptr(dst, pe));
  if (!mapped) return false;
  block_copy<4>(mapped, static_cast<const char*>(src), bytes);
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) nvshmemx_signal_op(signal, value, op, pe);
  __syncthreads();
  return true;
}

// nvshmemx_putmem_signal_block (kBlocking) or its nbi kind, or in the what-if's kernel instances
// (kCopy) the block's own copy where it applies (complete on return, as either kind allows).
template <bool kCopy, bool kBlocking>
__device__ __forceinline__ void put_signal_block(void* dst, const void* src, size_t bytes, uint64_t* signal,
                                                 uint64_t value, int op, int pe) {
  if constexpr (kCopy)
    if (whatif_copy_put_block(dst, src, bytes, signal, value, op, pe)) return;
  if constexpr (kBlocking)
    nvshmemx_putmem_signal_block(dst, src, bytes, signal, value, op, pe);
  else
    nvshmemx_putmem_signal_nbi_block(dst, src, bytes, signal, value, op, pe);
}

}  // namespace
}  // namespace ep::kernels
