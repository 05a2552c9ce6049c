// All-to-all between the GPUs (or ranks sharing a GPU) of one node, on copy engines and stream
// memory operations: no kernel spins, so ranks never compete for SMs and no wait needs a
// co-resident peer.
//
// Each rank's registered block holds, for every source rank, a region of two slots (double
// buffering). A message streams through its receiver's region in slot-sized chunks:
//   sender (per chunk):   wait empty[dst][s] -> clear it -> copy chunk into dst's slot s ->
//                         set full[me][s] in dst's block
//   receiver (per chunk): wait full[src][s]  -> clear it -> copy slot s out to the output ->
//                         set empty[me][s] in src's block
// Flags go back to their initial values after every call, so a captured CUDA graph replays.
// Each peer has its own stream, forked from and joined back into the caller's stream.
// A watchdog bounds every wait: past the timeout it records an error naming the op and the
// peers that never answered, then releases the stuck waits so no stream hangs forever.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "backend/transport/cuda/peer_buffers.hpp"
#include "backend/transport/host/host_transport.hpp"  // SendBuffer, RecvBuffer
#include "backend/transport/rendezvous.hpp"

namespace ep {

struct CudaTransportConfig {
  int device = 0;
  size_t buffer_bytes = 64 << 20;  // this rank's registered receive block
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};
};

class CudaTransport {
 public:
  // Collective over the ranks of `rdv`.
  CudaTransport(Rendezvous& rdv, const CudaTransportConfig& config, const std::string& tag);
  ~CudaTransport();

  // Enqueues the exchange on `stream` and returns; pointers are device memory. Throws if the
  // transport failed earlier (a timeout), since its flags no longer agree with the peers'.
  void all_to_all(const std::vector<SendBuffer>& sends, const std::vector<RecvBuffer>& recvs, cudaStream_t stream,
                  const char* op_name);

  // The error that stopped this transport, or "" while it is healthy.
  std::string error() const;
  int device() const { return buffers_.device(); }
  size_t chunk_bytes() const { return chunk_bytes_; }

 private:
  struct Inflight {
    std::string op;
    std::chrono::steady_clock::time_point start;
    std::vector<std::pair<int, cudaEvent_t>> peer_done;  // per peer stream
    cudaEvent_t done;
  };

  uint32_t* full_flag(int owner, int src, int slot) const;
  uint32_t* empty_flag(int owner, int dst, int slot) const;
  char* slot_data(int owner, int src, int slot) const;
  void watch();
  void release_waits();  // makes every wait on this rank's flags pass

  int rank_;
  int size_;
  std::chrono::milliseconds timeout_;
  PeerBuffers buffers_;
  size_t chunk_bytes_;
  std::vector<cudaStream_t> peer_streams_;
  cudaStream_t watchdog_stream_ = nullptr;

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Inflight> inflight_;
  std::string error_;
  bool stopping_ = false;
  std::thread watchdog_;
};

}  // namespace ep
