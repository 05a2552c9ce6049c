// Device code shared by the MoE pull kernels (moe.cu, moe_unroll.cu, moe_bulk.cu): the flag
// handshake around a pull, where a dispatch's rows come from, the payload element types combine
// sums; and the launchers' grid and alignment helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <type_traits>

#include "backend/kernels/moe.cuh"
#include "backend/kernels/sync.cuh"

namespace ep::kernels {

// Before a pull kernel reads any peer: block 0 says this rank's inputs are ready, and every
// block waits (without clearing) for the peers' word.
__device__ inline void handshake_begin(const Handshake& h, int num_ranks) {
  const int peer = threadIdx.x;
  if (peer < num_ranks) {
    if (blockIdx.x == 0 && h.ready_to_set[peer]) {
      __threadfence_system();
      store_release(h.ready_to_set[peer], 1);
    }
    if (h.ready_to_wait[peer]) {
      const uint64_t deadline = now_ns() + h.timeout_ns;
      while (load_acquire(h.ready_to_wait[peer]) == 0) {
        if (now_ns() > deadline) {
          atomicExch(h.error, 1 + peer);
          break;
        }
        __nanosleep(100);
      }
    }
  }
  __syncthreads();
}

// After a block's last read of a peer. The last block of the grid clears the ready flags it
// waited on (before its done flag lets a peer's next call set them again), says done, and
// waits until every peer is done reading this rank's inputs.
__device__ inline void handshake_end(const Handshake& h, int num_ranks) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(h.blocks_finished, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  const int peer = threadIdx.x;
  if (peer < num_ranks) {
    if (h.ready_to_wait[peer]) *h.ready_to_wait[peer] = 0;
    if (h.done_to_set[peer]) {
      __threadfence_system();
      store_release(h.done_to_set[peer], 1);
    }
    if (h.done_to_wait[peer] && !take_flag(h.done_to_wait[peer], now_ns() + h.timeout_ns))
      atomicExch(h.error, 1 + peer);
  }
  if (threadIdx.x == 0) *h.blocks_finished = 0;
}

// The rows a dispatch copies of those this rank received: at most capacity. Block 0 reports an
// overflow (more received than the outputs hold).
__device__ inline int64_t rows_within_capacity(const DispatchParams& p, int64_t received) {
  if (received > p.capacity && blockIdx.x == 0 && threadIdx.x == 0 &&
      atomicCAS(&p.overflow->state, 0, 1) == 0) {  // the first overflow since the host took the last one
    p.overflow->call_id = p.call_id;
    p.overflow->received = received;
    p.overflow->capacity = p.capacity;
    __threadfence_system();
    atomicExch(&p.overflow->state, 2);
  }
  return received < p.capacity ? received : p.capacity;
}

// Where each source's rows start among this rank's received rows (first_row[R]: rows received),
// thread 0 reading the sources' counts; then rows_within_capacity. Every thread of the block calls it.
__device__ inline int64_t dispatch_rows(const DispatchParams& p, int64_t* first_row) {
  const int R = p.num_ranks;
  if (threadIdx.x == 0) {
    int64_t at = 0;
    for (int s = 0; s < R; ++s) {
      first_row[s] = at;
      at += p.src[s].meta[MetaLayout::tokens_per_rank() + p.rank];
    }
    first_row[R] = at;
  }
  __syncthreads();
  return rows_within_capacity(p, first_row[R]);
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ float from_float(float v) { return v; }

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// ---- host side of the launchers
inline bool aligned(const void* p, int bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

// Blocks of kThreads for `warps_of_work` warps' work (a warp per row or token): at most the SM budget.
inline int grid_for_warps(int num_blocks, int64_t warps_of_work) {
  constexpr int kWarpsPerBlock = kThreads / 32;
  const int64_t wanted = (warps_of_work + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return int(wanted < 1 ? 1 : (wanted < num_blocks ? wanted : num_blocks));
}

// Calls launch(V{}) with V the access type of `vec` bytes (16, 8, 4, 2; else 1): the dispatch
// launchers' choice of kernel instance.
template <typename Launch>
inline void with_access_type(int vec, Launch&& launch) {
  switch (vec) {
    case 16: launch(int4{}); break;
    case 8: launch(int2{}); break;
    case 4: launch(int{}); break;
    case 2: launch(short{}); break;
    default: launch(char{}); break;
  }
}

// Whether combine may move `vector` elements per access: 16 bytes where the hidden size, the
// output and every rank's input allow it.
inline bool combine_wide(const CombineParams& p, int vector) {
  bool wide = p.hidden % vector == 0 && aligned(p.out, 16);
  for (int d = 0; d < p.num_ranks; ++d) wide = wide && (!p.x[d] || aligned(p.x[d], 16));
  return wide;
}

// Returns launch(T{}) with T the element type of `dtype` (bf16, fp16, fp32): the combine
// launchers' dtype switch; cudaErrorInvalidValue for another.
template <typename Launch>
inline cudaError_t with_element_type(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kBFloat16: return launch(__nv_bfloat16{});
    case DType::kFloat16: return launch(__half{});
    case DType::kFloat32: return launch(float{});
  }
  return cudaErrorInvalidValue;
}

// Calls launch(T{}, std::integral_constant<int, V>{}) for combine's element type T and its
// elements per access V (16 bytes' worth where combine_wide allows, else 1), then returns the
// launch's error: the warp kernels' choice of instance.
template <typename Launch>
inline cudaError_t with_combine_instance(const CombineParams& p, Launch&& launch) {
  return with_element_type(p.dtype, [&](auto t) {
    constexpr int kVector = 16 / int(sizeof(t));
    if (combine_wide(p, kVector)) launch(t, std::integral_constant<int, kVector>{});
    else launch(t, std::integral_constant<int, 1>{});
    return cudaGetLastError();
  });
}

}  // namespace ep::kernels
