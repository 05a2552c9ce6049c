// The symmetric buffer of one group's low-latency ops (layout: backend/kernels/low_latency.cuh),
// its mapped error word, and which half the next call of each kind uses.
//
// Created and grown by torch_ep/low_latency.py through reserve(), collectively: every rank calls
// it with the same sizes, in the same order, then the group barriers before any kernel runs.
// Growing frees the old buffer (after a device synchronize) and allocates the union of the
// sizes seen. The buffer is never freed at exit: nvshmem_free is collective, and ranks leave
// at different times.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend/kernels/low_latency.cuh"

namespace ep {

class LowLatencyBuffer {
 public:
  enum Kind : int { kDispatch = 0, kCombine = 1 };

  LowLatencyBuffer(int rank, int size, int device, std::chrono::milliseconds timeout, int num_sms);
  ~LowLatencyBuffer();
  LowLatencyBuffer(const LowLatencyBuffer&) = delete;
  LowLatencyBuffer& operator=(const LowLatencyBuffer&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  bool fits(const kernels::ll::LowLatencyLayout& need) const;
  // Collective: makes the buffer hold at least `need` (true when it allocated). Peers in
  // `remote_ranks`, and those nvshmem_ptr cannot map, are remote: the kernels reach them through
  // NVSHMEM's device API only, which needs need.remote (the same on every rank).
  bool reserve(const kernels::ll::LowLatencyLayout& need, const std::vector<int>& remote_ranks);
  // The ranks reached through NVSHMEM's device API (no load or store reaches them).
  std::vector<int> remote_ranks() const;
  // Whether NVSHMEM itself reaches every remote rank by P2P (ranks forced remote on one node, as
  // the virtual nodes of the tests and benchmarks are), not through a NIC.
  bool remote_by_p2p() const { return remote_by_p2p_; }
  // Raises (naming `op`) what a kernel reported since the last check; timeouts leave the flags
  // out of step with the peers', so after one every call raises.
  void check(const char* op);
  // Whether a timeout (or abort()) has put the buffers out of step (every later call raises), as
  // opposed to a call's own problem (an overflow, a bad expert id) that leaves the group usable.
  bool failed() const;
  // The group was aborted (ProcessGroupEP::abort, from any thread): the failure word names the
  // abort (every later call raises), and every wait of this rank's kernels, queued calls' included, ends at once
  // (GroupArgs::gave_up), except the wait before the caller writes the combine region.
  void abort() noexcept;
  // The half the next call of `kind` uses, alternating.
  int next_half(Kind kind) { return int(calls_[kind]++ & 1); }
  // The half the next call of `kind` will use.
  int peek_half(Kind kind) const { return int(calls_[kind] & 1); }
  kernels::ll::GroupArgs args(int half) const;
  // The phase trace of the last kernels (kernels::ll::kTraceWords), empty unless
  // TORCH_EP_LL_TRACE=1 was set when the buffer was created. Synchronises the device.
  std::vector<uint64_t> trace() const;

 private:
  int rank_, size_, device_;
  std::chrono::milliseconds timeout_;
  int num_blocks_;
  kernels::ll::LowLatencyLayout layout_{};
  char* base_ = nullptr;         // symmetric: two halves
  std::vector<char*> peers_;     // every rank's base_, as this rank maps it; null: remote
  bool remote_by_p2p_ = false;  // set by reserve()
  std::string describe(int code) const;  // a kernel's error code, in words

  // Pinned, mapped: kFailure (GroupArgs::error: a timeout or the abort; never cleared) and
  // kPending (GroupArgs::pending: a call's own problem; cleared once raised).
  enum Word : int { kFailure = 0, kPending = 1, kWords = 2 };
  int* words_host_ = nullptr;
  int* words_device_ = nullptr;
  uint32_t* gave_up_ = nullptr;  // device: GroupArgs::gave_up
  uint64_t* trace_ = nullptr;    // device, kTraceWords; null unless tracing
  uint64_t calls_[2] = {0, 0};
};

// The buffer of the group named `group_name`, or null before torch_ep/low_latency.py set it up.
LowLatencyBuffer* find_low_latency_buffer(const std::string& group_name);
// abort() on the buffer of the group named `group_name`, if it has one.
void abort_low_latency_buffer(const std::string& group_name) noexcept;
// Creates (first call) and grows the group's buffer: collective, see LowLatencyBuffer::reserve.
bool reserve_low_latency_buffer(const std::string& group_name, int rank, int size, int device,
                                std::chrono::milliseconds timeout, int num_sms,
                                const kernels::ll::LowLatencyLayout& need, const std::vector<int>& remote_ranks);

}  // namespace ep
