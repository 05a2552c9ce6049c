// Launchers of the all_to_all kernels. Torch-free: raw pointers and one POD parameter struct.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ep::kernels {

constexpr int kMaxRanksPerNode = 32;

// A kernel's error word (host-mapped, CudaTransport::kernel_error) holds 1 + the peer a bounded
// wait gave up on, or this where the wait was on no peer (an all_to_all_v block waiting for its own
// rank's plan): the host's message then names none.
constexpr int kErrorNoPeer = -1;

// One rank's part of a direct (one-copy) all_to_all in one launch. The flag protocol is the
// copy-engine path's: a receiver sets `ready` in each sender's block; a sender waits for its
// `ready`, copies into the receiver's output, then sets `done` in the receiver's block; each rank
// clears the flags it waited on. Null flag pointers mean "no traffic". A message's slices
// (all_to_all.cu; only the sender sees them) go to different blocks: each waits for `ready`
// (leaving it), copies its slice and counts itself in `slices_done`, in this rank's own memory;
// the last to count clears `ready` and the count and sets `done`. This rank's own message (entry
// `rank`: send, remote_recv its own output, send_bytes; no flags) goes in slices too, after the
// peers' units: no copy of its own to launch.
struct AllToAllDirectParams {
  int rank, size;
  int num_blocks;  // the most blocks: a block a (peer, slice) unit, or blocks share them when fewer
  const char* send[kMaxRanksPerNode];       // this rank's block for peer p
  char* remote_recv[kMaxRanksPerNode];      // where it lands in peer p's output (mapped)
  uint64_t send_bytes[kMaxRanksPerNode];
  uint32_t* ready_to_wait[kMaxRanksPerNode];  // in our block: peer p's output is ready
  uint32_t* ready_to_set[kMaxRanksPerNode];   // in peer p's block: our output is ready for p
  uint32_t* done_to_set[kMaxRanksPerNode];    // in peer p's block: our data has landed there
  uint32_t* done_to_wait[kMaxRanksPerNode];   // in our block: peer p's data has landed here
  uint32_t* slices_done;  // in our block, a word per peer, 0 between launches
  uint64_t timeout_ns;    // bound of every wait (globaltimer)
  int* error;             // host-mapped; on a timeout set to 1 + the peer waited for
  // The flags and the data's fences at GPU scope, not system scope: only where every peer
  // shares this GPU (ranks under MPS), which GPU scope covers (CudaTransport decides).
  bool gpu_scope;
  // Launched early (early_launch.cuh; TORCH_EP_EARLY_LAUNCH): scheduled while the stream's kernel
  // before it ends; block 0 lets the next kernel start before its last wait.
  bool early_launch;
};

cudaError_t launch_all_to_all_direct(const AllToAllDirectParams& params, cudaStream_t stream);

}  // namespace ep::kernels
