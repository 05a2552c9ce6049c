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

// One rank's part of a direct (one-copy) all_to_all of small messages, in one launch. The flag
// protocol is the copy-engine path's: a receiver sets `ready` in each sender's block; a sender
// waits for its `ready`, copies into the receiver's output, then sets `done` in the receiver's
// block; each rank clears the flags it waited on. Null flag pointers mean "no traffic".
struct AllToAllSmallParams {
  int size;
  int num_blocks;  // the SM budget: blocks share the peers when fewer than `size`
  const char* send[kMaxRanksPerNode];       // this rank's block for peer p
  char* remote_recv[kMaxRanksPerNode];      // where it lands in peer p's output (mapped)
  uint64_t send_bytes[kMaxRanksPerNode];
  uint32_t* ready_to_wait[kMaxRanksPerNode];  // in our block: peer p's output is ready
  uint32_t* ready_to_set[kMaxRanksPerNode];   // in peer p's block: our output is ready for p
  uint32_t* done_to_set[kMaxRanksPerNode];    // in peer p's block: our data has landed there
  uint32_t* done_to_wait[kMaxRanksPerNode];   // in our block: peer p's data has landed here
  uint64_t timeout_ns;  // bound of every wait (globaltimer)
  int* error;           // host-mapped; on a timeout set to 1 + the peer waited for
};

cudaError_t launch_all_to_all_small(const AllToAllSmallParams& params, cudaStream_t stream);

}  // namespace ep::kernels
