// Host-side launch helpers shared by the low-latency kernels (low_latency_dispatch.cu and
// low_latency_combine.cu): the block's warp count, grid sizing, the dynamic shared memory
// opt-in and the group's sanity check. Internal linkage, as low_latency_device.cuh: each -rdc
// translation unit keeps its own copy.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/kernels/low_latency.cuh"
#include "backend/kernels/low_latency_device.cuh"  // any_remote

namespace ep::kernels::ll {
namespace {

constexpr int kWarps = kThreads / 32;

// Blocks for `warps_of_work` warp-sized units: enough for one unit a warp, 1 to num_blocks.
int grid_for(int num_blocks, int64_t warps_of_work) {
  const int64_t wanted = (warps_of_work + kWarps - 1) / kWarps;
  return int(wanted < 1 ? 1 : (wanted < num_blocks ? wanted : num_blocks));
}

// Lets `kernel` take `smem` bytes of dynamic shared memory (beyond 48 KiB needs opting in).
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, int64_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
}

// A launcher's check of its group: ranks in range, this rank's buffers, and the remote regions
// wherever a peer is remote.
bool valid_group(const GroupArgs& g) {
  return g.num_ranks >= 1 && g.num_ranks <= kMaxRanks && g.rank >= 0 && g.rank < g.num_ranks && g.half &&
         g.peers[g.rank] && g.num_blocks >= 1 && g.error && g.pending && g.gave_up &&
         (!any_remote(g) || g.layout.remote);
}

}  // namespace
}  // namespace ep::kernels::ll
