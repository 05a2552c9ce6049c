// all_to_all's hop between nodes in one launch, driven by the device: the slots, signals and
// counters of NvshmemExchange (backend/transport/nvshmem/nvshmem_exchange.hpp has the protocol)
// without the rounds the host queues. Torch-free and free of NVSHMEM types (host files include it).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ep::kernels {

constexpr int kMaxExchangePeers = 128;
constexpr int kExchangeThreads = 256;

// The rounds of a round-robin schedule over `size` ranks (the circle method): in each round every
// rank has one partner, and a rank's partner's partner is itself. size - 1 rounds for an even
// size, size for an odd one (a rank sits out each round).
__host__ __device__ inline int exchange_rounds(int size) { return size % 2 ? size : size - 1; }
// `rank`'s partner in `round`, or -1 where it sits out.
__host__ __device__ inline int exchange_partner(int round, int rank, int size) {
  const int last = exchange_rounds(size);  // the fixed point of the circle; a dummy rank for odd sizes
  const int partner = rank == last ? round : rank == round ? last : ((2 * round - rank) % last + last) % last;
  return partner < size ? partner : -1;
}

struct ExchangePeer {
  int pe;                     // the peer's group rank (= NVSHMEM PE)
  const char* send;           // this call's bytes to it
  uint64_t send_bytes;
  uint64_t sent_before;       // chunks sent to it by earlier calls
  char* recv;                 // where its bytes go
  uint64_t recv_bytes;
  uint64_t received_before;   // chunks received from it by earlier calls
};

// Grid: 2 x num_peers x num_slots blocks. peers[] lists this call's peers in the order of their
// rounds in exchange_partner's schedule (a peer's partner there is this rank, in the same
// round). Blocks 2i and 2i + 1, pair i = q x num_slots + slot, send the chunks to peers[q] that
// use that slot, in order, and receive those from it; each waits only on the other block of the
// same (round, slot) on that peer. Every rank orders its pairs by (round, slot), so the pair of
// lowest key not yet done anywhere has both its ranks' blocks started and resident (blocks
// start in index order, all before it are done), and it progresses: the grid need not be
// resident at once, and a message past the slots' budget waits for credits without holding up
// their drain. The peer relation must be symmetric (every caller's is: the other nodes' ranks,
// or the same local rank on the other nodes).
struct ExchangeParams {
  char* base;                 // the symmetric buffer (NvshmemExchange's layout)
  int rank, size, num_slots;
  uint64_t chunk_bytes;
  int num_peers;              // the schedule's rounds: exchange_rounds(size)
  ExchangePeer peers[kMaxExchangePeers];
  uint64_t timeout_ns;
  int* error;                 // host-mapped: 1 + the peer a wait timed out on (the first one)
  uint32_t* gave_up;          // device memory: set with *error, and read by every block instead of it
  bool whatif_copy_puts;      // puts to mapped peers as the block's own copy (whatif_puts.cuh)
};

cudaError_t launch_exchange(const ExchangeParams& p, cudaStream_t stream);

}  // namespace ep::kernels
