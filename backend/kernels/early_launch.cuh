// Programmatic dependent launch (sm_90; all_to_all's kernels unless TORCH_EP_EARLY_LAUNCH=0): a
// kernel launched with `early` set may be scheduled while the kernel before it on its stream still
// runs, once every block of that kernel has called let_next_grid_start() or exited. Its blocks
// then wait in wait_for_prior_grid() until that kernel has ended and its memory is visible, as
// stream order would have it, but without the launch's own latency between the two (1.5-3.6 us a
// kernel boundary in tools/a2a_kernels.py's gaps). Both calls are no-ops in a kernel launched
// plainly, and a kernel that calls neither before exiting lets the next one start as it ends.
//
// Rule for the kernels here: wait_for_prior_grid() before the first access to memory that stream
// order protects (the call's tensors, the flags that tell peers "my output is free") and before a
// wait's deadline starts (the kernel before may itself wait on its peers); a block calls
// let_next_grid_start() once its work that needs SM room is done, so that the next kernel's
// waiting blocks take no room from this kernel's.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace ep::kernels {

__device__ __forceinline__ void wait_for_prior_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

__device__ __forceinline__ void let_next_grid_start() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// kernel<<<grid, threads, 0, stream>>>(args...), or with `early` the same launch marked as one that
// resolves its dependency on the kernel before it itself (see above).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), unsigned grid, unsigned threads, cudaStream_t stream, bool early,
                          Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(threads);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = early ? 1 : 0;
  const cudaError_t launched = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  const cudaError_t last = cudaGetLastError();  // cleared, as a <<<>>> launch's check would
  return launched != cudaSuccess ? launched : last;
}

}  // namespace ep::kernels
