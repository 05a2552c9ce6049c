// Tensors shared in place between the ranks of one node (CUDA IPC): the allocations this rank
// exports to its peers, and the peers' allocations it has mapped. MoE dispatch/combine read the
// peers' inputs, and all_to_all's direct path writes the peers' outputs, through these mappings.
//
// A mapping outlives the call that opened it, so that a steady stream of calls over the caching
// allocator's segments opens nothing. But a mapping also keeps its allocation alive: a segment
// that its owner's caching allocator frees (torch.cuda.empty_cache(), or the allocator's retry
// after an out-of-memory) is not given back to the device while any peer still maps it (CUDA
// unmaps an allocation at its last cudaIpcCloseMemHandle), and the mappings of freed segments
// pile up: on one H100, 2 ranks, after torch.cuda.empty_cache() the device lacked 310 MiB after a
// dispatch and combine of 64 MiB a rank, 128 MiB after an all_to_all_single of 64 MiB a rank
// (tests/test_cuda_peer_mappings.py, 57f6e75). Releasing them (the default;
// TORCH_EP_RELEASE_PEER_MAPPINGS=0 keeps every mapping; process_group/cuda/segment_frees.cpp):
//   owner:  the allocator's trace hook reports each freed segment (ExportTable::forget); its
//           exports leave the table and their handles go to this rank's log, in shared memory.
//   mapper: every watchdog poll (PeerMappings::sweep) reads each peer's log; a mapping of a
//           handle found there leaves the open ones at once (a later call that meets the handle
//           maps it again) and is closed once every call tracked before it was found is
//           complete on the device. Calls hold the mappings (hold()) from before their exchange
//           to their tracking, so no sweep runs between a call's lookup and its tracking.
// Every rank makes its log whatever the switch says (ranks that disagree still agree on the
// collective set-up); a rank with the switch off writes nothing and sweeps nothing.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/transport/host/shm_segment.hpp"
#include "backend/transport/rendezvous.hpp"

namespace ep {

// A rank's log of its exports that were freed, in shared memory: written by its owner alone
// (under ExportTable's mutex), read by every peer. A reader that falls more than kEntries behind
// treats every mapping of that owner as freed (mapped again where a call meets it).
struct FreedExportsLog {
  static constexpr uint64_t kEntries = 256;
  std::atomic<uint64_t> count;  // handles written so far; entry i at handles[i % kEntries]
  cudaIpcMemHandle_t handles[kEntries];
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "the log's count is shared between processes");

// This rank's exports, by CUDA buffer id (unique per allocation, never reused), so that a steady
// stream of calls over the caching allocator's segments makes no export call. Thread-safe: the
// allocator's trace hook calls forget() from whichever thread frees a segment.
class ExportTable {
 public:
  explicit ExportTable(ShmSegment log) : log_(std::move(log)) {}

  // One allocation's export, kept for the rest of one call: a pointer inside [base, end) shares
  // it without asking the driver again (all_to_all_single's receive spans are slices of one output).
  struct Export {
    CUdeviceptr base = 0, end = 0;
    cudaIpcMemHandle_t handle{};
  };
  // Exports the allocation holding `ptr` (handle + offset); false when it cannot be exported.
  // `last`, where given, is used when `ptr` lies inside it and refilled otherwise; it holds for one
  // call only, while its tensors are alive (a freed block's addresses may come back as another).
  bool export_allocation(const void* ptr, cudaIpcMemHandle_t* handle, uint64_t* offset, Export* last);
  // The segment [base, base + bytes) is being freed: its exports leave the table and go to the
  // log. Cheap and without CUDA calls: it runs under the caching allocator's lock.
  void forget(uintptr_t base, size_t bytes);
  // Set once the trace hook reports frees to forget(): the table is then bounded by the live
  // segments, and is no longer cleared when it grows (a cleared export could not be logged).
  void frees_reported() { frees_reported_.store(true, std::memory_order_relaxed); }

 private:
  FreedExportsLog* log() const { return reinterpret_cast<FreedExportsLog*>(log_.data()); }
  std::mutex mutex_;
  std::unordered_map<uint64_t, std::pair<CUdeviceptr, cudaIpcMemHandle_t>> exported_;
  ShmSegment log_;
  std::atomic<bool> frees_reported_{false};
};

// The peers' exports mapped here.
class PeerMappings {
 public:
  // Collective over the ranks of `rdv`: every rank's log is created, then mapped by every peer.
  PeerMappings(Rendezvous& rdv, const std::string& tag);
  ~PeerMappings();  // closes every mapping; the caller's work on them must be complete
  PeerMappings(const PeerMappings&) = delete;
  PeerMappings& operator=(const PeerMappings&) = delete;

  // This rank's own log, for its ExportTable (once).
  ShmSegment take_own_log() { return std::move(logs_[size_t(rank_)]); }
  // Held by a call from before its record exchange until it is tracked (or ends without a launch).
  std::unique_lock<std::mutex> hold() { return std::unique_lock<std::mutex>(mutex_); }
  // Maps a peer's exported allocation once; later calls reuse the mapping. The caller holds hold().
  char* open(int peer, const cudaIpcMemHandle_t& handle);
  // The watchdog's poll: `tracked` counts the calls tracked so far, `completed` those of them
  // complete (in tracking order). Mappings of handles new in a peer's log stop being reused now
  // and are closed once `completed` reaches what `tracked` was then: `tracked` is read under the
  // hold, when every call that looked a mapping up has been tracked. Skips a poll while a call
  // holds.
  void sweep(const std::atomic<uint64_t>& tracked, const std::atomic<uint64_t>& completed);
  // For tests: mappings open and reused, and those waiting to be closed.
  size_t open_count();
  size_t closing_count();

 private:
  static std::string key(const cudaIpcMemHandle_t& h) { return std::string(reinterpret_cast<const char*>(&h), sizeof(h)); }
  void retire(int peer, std::unordered_map<std::string, char*>::iterator it, uint64_t tracked);

  int rank_;
  std::mutex mutex_;
  std::vector<std::unordered_map<std::string, char*>> opened_;  // per peer: handle bytes -> mapping
  std::vector<ShmSegment> logs_;                                // every rank's FreedExportsLog
  std::vector<uint64_t> seen_;                                  // per peer, its log's entries read
  struct Closing {
    char* ptr;
    uint64_t after;  // closed once this many tracked calls are complete
  };
  std::vector<Closing> closing_;
};

}  // namespace ep
