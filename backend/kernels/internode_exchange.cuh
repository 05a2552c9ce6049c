// all_to_all's hop between nodes in one launch, driven by the device: the slots, signals and
// counters of NvshmemExchange (backend/transport/nvshmem/nvshmem_exchange.hpp has the protocol)
// without the rounds the host queues. Torch-free and free of NVSHMEM types (host files include it).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ep::kernels {

constexpr int kMaxExchangePeers = 128;
constexpr int kExchangeThreads = 256;

struct ExchangePeer {
  int pe;                     // the peer's group rank (= NVSHMEM PE)
  const char* send;           // this call's bytes to it
  uint64_t send_bytes;
  uint64_t sent_before;       // chunks sent to it by earlier calls
  char* recv;                 // where its bytes go
  uint64_t recv_bytes;
  uint64_t received_before;   // chunks received from it by earlier calls
};

// Grid: 2 x num_peers x num_slots blocks. Block (peer, slot) of the first half sends the
// chunks of that peer that use that slot, in order; of the second half, receives them. A block
// waits only on the matching block of the peer, never on another block of its own grid.
struct ExchangeParams {
  char* base;                 // the symmetric buffer (NvshmemExchange's layout)
  int rank, size, num_slots;
  uint64_t chunk_bytes;
  int num_peers;
  ExchangePeer peers[kMaxExchangePeers];
  uint64_t timeout_ns;
  int* error;                 // host-mapped: 1 + the peer a wait timed out on (the first one)
};

cudaError_t launch_exchange(const ExchangeParams& p, cudaStream_t stream);

}  // namespace ep::kernels
