#include "backend/kernels/all_to_all.cuh"
#include "backend/kernels/copy.cuh"
#include "backend/kernels/early_launch.cuh"
#include "backend/kernels/module_kernels.hpp"
#include "backend/kernels/sync.cuh"

#include <algorithm>
#include <numeric>

namespace ep::kernels {
namespace {

constexpr int kThreads = 512;

// A direct (one-copy) message is cut into slices of at least kDirectSliceBytes, at most
// kMaxDirectSlices of them, each a unit of work for one block: a block keeps 64 KiB of loads in
// flight, so that a message of a few slices already spreads over as many SMs. Its receiver never
// sees the slices (the flags count messages), so the two sides need not cut alike.
constexpr uint64_t kDirectSliceBytes = 64 << 10;
constexpr uint32_t kMaxDirectSlices = 256;

__host__ __device__ __forceinline__ uint32_t direct_slices(uint64_t bytes) {
  const uint64_t n = (bytes + kDirectSliceBytes - 1) / kDirectSliceBytes;
  return n < kMaxDirectSlices ? uint32_t(n) : kMaxDirectSlices;
}

// 16-byte loads in flight per thread: 64 KiB per block, a slice's size (kDirectSliceBytes), and
// two blocks an SM (64 registers; the copy is a call of its own, so that only the loop around it
// spills), 128 KiB an SM: what tools/sm_copy_ceiling.cu found a copy needs on the H200.
constexpr int kUnroll = 8;

// Slice `slice` of the message to `dst` (this rank's own included), by the whole block. Slice
// boundaries in 16-byte multiples: each slice's vectors stay aligned as the message's.
__device__ __forceinline__ void copy_slice(const AllToAllDirectParams& p, int dst, uint32_t slice, uint32_t slices) {
  const uint64_t bytes = p.send_bytes[dst];
  const uint64_t share = ((bytes + slices - 1) / slices + 15) / 16 * 16;
  const uint64_t from = share * slice < bytes ? share * slice : bytes;
  const uint64_t to = from + share < bytes ? from + share : bytes;
  block_copy_call<kUnroll, kThreads>(p.remote_recv[dst] + from, p.send[dst] + from, to - from, StreamingLoad{},
                                     PlainStore{});
}

// Block 0 first tells every sender that our output is ready and, last, waits for every sender's
// data; in between every block takes units b, b + gridDim.x, ...: (peer, slice) units below
// peer_units, then the slices of this rank's own message, which wait on no flag and count nowhere.
// kGpu: the flags' accesses and the fences at GPU scope (AllToAllDirectParams::gpu_scope).
template <bool kGpu>
__global__ void __launch_bounds__(kThreads, 2)
    all_to_all_direct_kernel(AllToAllDirectParams p, uint32_t peer_units, uint32_t units) {
  wait_for_prior_grid();  // launched early (p.early_launch): our output is free once the stream says so
  const uint64_t deadline = now_ns() + p.timeout_ns;  // from here: the kernel before may have waited long
  if (blockIdx.x == 0)
    for (int src = threadIdx.x; src < p.size; src += blockDim.x)
      if (p.ready_to_set[src]) scoped_store_release<kGpu>(p.ready_to_set[src], 1);

  __shared__ int go;
  const uint32_t peers = uint32_t(p.size - 1);
  for (uint32_t u = blockIdx.x; u < units; u += gridDim.x) {
    if (u >= peer_units) {  // uniform across the block
      copy_slice(p, p.rank, u - peer_units, direct_slices(p.send_bytes[p.rank]));
      continue;
    }
    const int dst = (p.rank + 1 + int(u % peers)) % p.size;
    const uint32_t slice = u / peers, slices = direct_slices(p.send_bytes[dst]);
    if (!p.ready_to_wait[dst] || slice >= slices) continue;  // uniform across the block
    if (threadIdx.x == 0) {
      go = wait_set<kGpu>(p.ready_to_wait[dst], deadline);  // left set: the message's other slices wait on it too
      if (!go) {
        report_first(p.error, 1 + dst);
        // The message's count can no longer reach its slices: a later launch (a graph replay,
        // which no host check stops) times out on it instead of setting done after a part.
        atomicOr(&p.slices_done[dst], 0x80000000u);
      }
    }
    __syncthreads();
    const bool went = go;
    __syncthreads();  // every thread has read go before thread 0 may write the next unit's
    if (!went) continue;
    copy_slice(p, dst, slice, slices);
    __syncthreads();  // every thread's stores are issued before the fence below
    if (threadIdx.x == 0) {
      // Fence, then count: the last block to count sees every slice's stores ordered before its own
      // fence and release (the fence-then-atomic pattern of a grid's last block).
      scoped_fence<kGpu>();
      if (atomicAdd(&p.slices_done[dst], 1u) + 1 == slices) {
        p.slices_done[dst] = 0;
        *p.ready_to_wait[dst] = 0;  // every slice's block has read it
        scoped_fence<kGpu>();
        scoped_store_release<kGpu>(p.done_to_set[dst], 1);
      }
    }
  }

  if (blockIdx.x == 0) {
    let_next_grid_start();  // the other blocks let it as they exit: the next kernel's launch overlaps the wait below
    for (int src = threadIdx.x; src < p.size; src += blockDim.x)
      if (p.done_to_wait[src] && !take_flag<kGpu>(p.done_to_wait[src], deadline)) report_first(p.error, 1 + src);
  }
}

// The launch's units of work to peers: the peers, rotated from rank + 1 so that the ranks do not
// all start on rank 0, times the most slices a message takes; unit u is peer u % (size - 1)'s
// slice u / (size - 1), none where that message has fewer.
uint32_t direct_peer_units(const AllToAllDirectParams& p) {
  uint32_t most = 0;
  for (int d = 0; d < p.size; ++d)
    if (p.ready_to_wait[d]) most = std::max(most, direct_slices(p.send_bytes[d]));
  return most * uint32_t(p.size - 1);
}

}  // namespace

cudaError_t launch_all_to_all_direct(const AllToAllDirectParams& params, cudaStream_t stream) {
  if (params.size < 1 || params.size > kMaxRanksPerNode || params.num_blocks < 1 || !params.slices_done)
    return cudaErrorInvalidValue;
  // Block 0 sets the ready flags and waits for the data even where this rank sends nothing.
  const uint32_t peer_units = direct_peer_units(params);
  const int self = params.rank;
  const bool self_copy = params.send[self] && params.send_bytes[self];
  const uint32_t units = peer_units + (self_copy ? direct_slices(params.send_bytes[self]) : 0);
  int blocks = units == 0 ? 1 : units < uint32_t(params.num_blocks) ? int(units) : params.num_blocks;
  // Block b takes units b, b + blocks, ...: where blocks are fewer than units, their peers (unit %
  // peers) cycle through every peer only where blocks and peers share no factor, else a large
  // message to one peer would get a fraction of the blocks. A block a unit needs no such care.
  while (blocks > 1 && uint32_t(blocks) < units && std::gcd(blocks, params.size - 1) != 1) --blocks;
  return launch_kernel(params.gpu_scope ? all_to_all_direct_kernel<true> : all_to_all_direct_kernel<false>, blocks,
                       kThreads, stream, params.early_launch, params, peer_units, units);
}

// kernel_preload.cpp loads the whole module, both instantiations.
const void* all_to_all_module_kernel() { return reinterpret_cast<const void*>(all_to_all_direct_kernel<false>); }

}  // namespace ep::kernels
