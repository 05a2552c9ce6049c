#include "backend/kernels/internode.cuh"
#include "backend/kernels/module_kernels.hpp"
#include "backend/kernels/sync.cuh"

namespace ep::kernels {
namespace {

// One thread per signal. NVSHMEM sets a signal only after the data of its put is visible, so
// once every thread has seen its value the copies queued after this kernel read whole chunks.
__global__ void wait_signals_kernel(const WaitSignalsParams p) {
  const int i = threadIdx.x;
  if (i < p.count) {
    const uint64_t deadline = now_ns() + p.timeout_ns;
    while (load_acquire(p.signal[i]) < p.at_least[i]) {
      if (now_ns() > deadline) {
        report_first(p.error, 1 + p.peer[i]);  // the stream goes on; the host raises at the next call
        break;
      }
      __nanosleep(200);
    }
  }
  __syncthreads();
  __threadfence_system();
}

}  // namespace

cudaError_t launch_wait_signals(const WaitSignalsParams& params, cudaStream_t stream) {
  if (params.count <= 0) return cudaSuccess;
  wait_signals_kernel<<<1, kMaxWaitSignals, 0, stream>>>(params);
  return cudaGetLastError();
}

const void* internode_module_kernel() { return reinterpret_cast<const void*>(wait_signals_kernel); }

}  // namespace ep::kernels
