// Communication memory registered once per group: each rank cudaMallocs one block, exports it
// with a CUDA IPC handle through the Rendezvous, and maps every peer's block. Kernels and copy
// engines then write peers' memory directly (NVLink between GPUs, HBM on a shared GPU).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <vector>

#include "backend/transport/rendezvous.hpp"

namespace ep {

class PeerBuffers {
 public:
  // Collective over the ranks of `rdv`; `bytes` is this group's common block size.
  PeerBuffers(Rendezvous& rdv, int device, size_t bytes, const std::string& tag);
  ~PeerBuffers();
  PeerBuffers(const PeerBuffers&) = delete;
  PeerBuffers& operator=(const PeerBuffers&) = delete;

  // Rank r's block as mapped in this process (ours for r == rank; null once close_peers ran).
  char* block(int r) const { return blocks_[r]; }
  // Unmaps the peers' blocks now (idempotent); ours stays until the destructor.
  void close_peers();
  size_t bytes() const { return bytes_; }
  int device() const { return device_; }
  // Whether every peer's block lies on this rank's GPU (ranks that share it under MPS): then the
  // flags in the blocks need only GPU scope.
  bool all_on_this_gpu() const;

 private:
  int rank_;
  int device_;
  size_t bytes_;
  std::vector<char*> blocks_;
};

}  // namespace ep
