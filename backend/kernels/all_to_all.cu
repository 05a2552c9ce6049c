#include "backend/kernels/all_to_all.cuh"
#include "backend/kernels/copy.cuh"
#include "backend/kernels/sync.cuh"

namespace ep::kernels {
namespace {

constexpr int kThreads = 512;

// Block b sends to peers b, b + gridDim.x, ...; block 0 first tells every sender that our
// output is ready and, last, waits for every sender's data.
__global__ void __launch_bounds__(kThreads) all_to_all_small_kernel(AllToAllSmallParams p) {
  const uint64_t deadline = now_ns() + p.timeout_ns;
  if (blockIdx.x == 0)
    for (int src = threadIdx.x; src < p.size; src += blockDim.x)
      if (p.ready_to_set[src]) store_release(p.ready_to_set[src], 1);

  __shared__ int go;
  for (int dst = blockIdx.x; dst < p.size; dst += gridDim.x) {
    if (!p.ready_to_wait[dst]) continue;
    if (threadIdx.x == 0) {
      go = take_flag(p.ready_to_wait[dst], deadline);
      if (!go) atomicExch(p.error, 1 + dst);
    }
    __syncthreads();
    if (go) block_copy(p.remote_recv[dst], p.send[dst], p.send_bytes[dst]);
    __syncthreads();  // every thread's stores are issued before the release below
    if (threadIdx.x == 0 && go) {
      __threadfence_system();
      store_release(p.done_to_set[dst], 1);
    }
  }

  if (blockIdx.x == 0)
    for (int src = threadIdx.x; src < p.size; src += blockDim.x)
      if (p.done_to_wait[src] && !take_flag(p.done_to_wait[src], deadline)) atomicExch(p.error, 1 + src);
}

}  // namespace

cudaError_t launch_all_to_all_small(const AllToAllSmallParams& params, cudaStream_t stream) {
  if (params.size < 1 || params.size > kMaxRanksPerNode || params.num_blocks < 1) return cudaErrorInvalidValue;
  // At most one block per peer: the grid stays small enough to be resident next to other
  // ranks' work (ranks sharing a GPU under MPS each hold a slice of the SMs).
  const int blocks = params.num_blocks < params.size ? params.num_blocks : params.size;
  all_to_all_small_kernel<<<blocks, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace ep::kernels
