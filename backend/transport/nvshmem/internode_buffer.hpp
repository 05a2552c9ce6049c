// The symmetric buffer of one group's device-driven dispatch/combine across nodes (layout:
// backend/kernels/internode_device.cuh), its host-mapped error word and notify results.
//
// Allocated collectively by the group's first such dispatch, sized by the capacity C (tokens per
// rank per call, Options.internode_capacity), the row stride W (the larger of that call's
// rows, a bf16 combine of its hidden size, and Options.internode_row_bytes; the dispatches' row
// stride since) and the rows of the zero-copy combine input (Options.internode_combine_rows, 0: R x C); never grown, so
// that a captured CUDA graph stays valid: a call needing more is refused on every rank. Never
// freed: nvshmem_free is collective and ranks leave at different times.
// Header without NVSHMEM types.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

#include "backend/kernels/internode_device.cuh"
#include "backend/transport/cuda/call_order.hpp"
#include "backend/transport/topology.hpp"

namespace ep {

class InternodeBuffer {
 public:
  // combine_rows: rows of W bytes in combine_in, 0 for R x capacity (every row a rank can receive).
  InternodeBuffer(const Topology& topology, int device, std::chrono::milliseconds timeout, int64_t capacity,
                  int64_t min_row_bytes, int64_t combine_rows);
  ~InternodeBuffer();
  InternodeBuffer(const InternodeBuffer&) = delete;
  InternodeBuffer& operator=(const InternodeBuffer&) = delete;

  // Collective on the first call: allocates for rows of `row_bytes` (at least). Later calls
  // allocate nothing. Must not run during a CUDA-graph capture the first time.
  void reserve(int64_t row_bytes);
  bool allocated() const { return base_ != nullptr; }
  int64_t capacity() const { return layout_.capacity; }
  int64_t row_bytes() const { return layout_.row_bytes; }
  // The zero-copy combine input (combine_buffer), this rank's region, and its size in bytes.
  char* combine_in() const { return base_ ? base_ + layout_.combine_in() : nullptr; }
  int64_t combine_in_bytes() const { return layout_.combine_in_bytes(); }
  // This rank's packed rows (dispatch_buffer's region: C rows of row_bytes()), and whether `ptr`
  // lies in them.
  char* dispatch_in() const { return base_ ? base_ + layout_.dispatch_in(topology_.node) : nullptr; }
  bool in_dispatch_in(const void* ptr) const {
    const char* c = static_cast<const char*>(ptr);
    return base_ && c >= dispatch_in() && c < dispatch_in() + layout_.capacity * layout_.row_bytes;
  }
  // Whether NVSHMEM maps every rank of this node here (load/store through nvshmem_ptr): where
  // one rank of a node does not, none of its ranks' combine inputs are read in place.
  bool maps_node_peers() const { return maps_node_peers_; }
  // Raises (naming `op`) a timeout a kernel reported. Timeouts leave the buffer's signals out
  // of step with the peers', so after one every call raises.
  void check(const char* op);
  // What a kernel reported that this rank's next call must refuse with (clears it): kOverflowed
  // (a dispatch received more rows than num_worst_tokens), kRefusedBefore with `detail` the
  // refusing rank (a call no host waited for was refused), else kOk. The caller puts it in its
  // record, so that every rank refuses that call together; raising it before the call instead
  // would leave this rank out of the call's notify alone.
  kernels::ix::Status take_pending(int64_t& detail);
  // A notice that an earlier call no host waited for was refused by the peers' records while this
  // rank's own accepted it (IxHostCtrl::refused_by_peers; 0: none), which the caller raises once
  // its own call is queued (the peers are in that call too), or puts back if that call raises for
  // another reason first; and its text.
  int take_late_refusal();
  void put_back_late_refusal(int notice);
  std::string describe_late_refusal(int notice) const;
  // Work.wait()'s view of check(): the failure's text, or "" (does not clear it).
  std::string error();
  // The group was aborted (`why`): every later call raises, and every wait of this rank's kernels,
  // queued calls' included, ends at once (IxCtrl::gave_up) rather than at its timeout. Any thread.
  void abort(const std::string& why);
  // The group's parameters with this call's ticket (host_waits callers wait for it).
  kernels::ix::IxParams params();
  // Waits (bounded by the timeout) until the notify step of the call with `ticket` wrote its
  // results; raises naming `op` otherwise.
  const kernels::ix::IxHostCtrl& wait_for(int64_t ticket, const char* op);
  int num_blocks() const { return num_blocks_; }
  // Calls share the buffer's records, signals and counters, and each rests on this rank's
  // previous call's kernels having ended before its own start (its record goes out after them):
  // a call queued on another stream than the last one's waits for it (CallOrder). begin_call
  // before a call's first launch, end_call after its last, on every way out once one is queued
  // (a refusal raised after the notify ran included). `capturing`: the stream is being captured.
  void begin_call(cudaStream_t stream) { order_.begin(stream); }
  void end_call(cudaStream_t stream, bool capturing);

 private:
  std::string describe(int code) const;

  Topology topology_;
  int device_;
  std::chrono::milliseconds timeout_;
  int num_blocks_ = 1;
  kernels::ix::IxLayout layout_{};
  char* base_ = nullptr;  // symmetric
  bool maps_node_peers_ = false;
  int* error_host_ = nullptr;  // pinned, mapped
  int* error_device_ = nullptr;
  kernels::ix::IxHostCtrl* ctrl_host_ = nullptr;  // pinned, mapped
  kernels::ix::IxHostCtrl* ctrl_device_ = nullptr;
  int64_t tickets_ = 0;
  CallOrder order_;
  std::mutex mutex_;
  std::string failed_;  // set after a timeout or an abort
  std::atomic<uint32_t*> gave_up_{nullptr};  // IxCtrl::gave_up once allocated, for abort() from any thread
};

}  // namespace ep
