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

// A direct (one-copy) message is cut into slices of at least kDirectSliceBytes, at most
// kMaxDirectSlices of them, each a unit of work for one block: a block keeps 64 KiB of loads in
// flight, so that a message of a few slices already spreads over as many SMs. Its receiver never
// sees the slices (the flags below count messages), so the two sides need not cut alike.
constexpr uint64_t kDirectSliceBytes = 64 << 10;
constexpr uint32_t kMaxDirectSlices = 256;

__host__ __device__ inline uint32_t direct_slices(uint64_t bytes) {
  const uint64_t n = (bytes + kDirectSliceBytes - 1) / kDirectSliceBytes;
  return n < kMaxDirectSlices ? uint32_t(n) : kMaxDirectSlices;
}

// One rank's part of a direct (one-copy) all_to_all in one launch. The flag protocol is the
// copy-engine path's: a receiver sets `ready` in each sender's block; a sender waits for its
// `ready`, copies into the receiver's output, then sets `done` in the receiver's block; each rank
// clears the flags it waited on. Null flag pointers mean "no traffic". A message's slices go to
// different blocks: each waits for `ready` (leaving it), copies its slice and counts itself in
// `slices_done`, in this rank's own memory; the last to count clears `ready` and the count and
// sets `done`.
struct AllToAllDirectParams {
  int rank, size;
  int num_blocks;  // the grid: blocks share the (peer, slice) units when fewer
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
};

// The launch's units of work: the peers, rotated from rank + 1 so that the ranks do not all start
// on rank 0, times the most slices a message takes; unit u is peer u % (size - 1)'s slice
// u / (size - 1), none where that message has fewer.
__host__ __device__ inline uint32_t direct_units(const AllToAllDirectParams& p) {
  uint32_t most = 0;
  for (int d = 0; d < p.size; ++d) {
    const uint32_t n = d == p.rank || !p.ready_to_wait[d] ? 0 : direct_slices(p.send_bytes[d]);
    most = n > most ? n : most;
  }
  return most * uint32_t(p.size - 1);
}

cudaError_t launch_all_to_all_direct(const AllToAllDirectParams& params, cudaStream_t stream);

}  // namespace ep::kernels
