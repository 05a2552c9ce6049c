#include "backend/transport/nvshmem/internode_buffer.hpp"

#include <c10/util/Exception.h>
#include <nvshmem.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstring>
#include <thread>

#include "backend/common/errors.hpp"
#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/nvshmem/nvshmem_runtime.hpp"

namespace ep {

namespace ix = kernels::ix;

InternodeBuffer::InternodeBuffer(const Topology& topology, int device, std::chrono::milliseconds timeout,
                                 int64_t capacity, int64_t min_row_bytes, int64_t combine_rows)
    : topology_(topology), device_(device), timeout_(timeout) {
  nvshmem::whatif_copy_puts();  // a bad TORCH_EP_WHATIF_COPY_PUTS raises at set-up, not in a call
  if (topology.size > ix::kMaxRanks || topology.ranks_per_node > ix::kMaxLocal)
    throw CommError("torch_ep: dispatch/combine across nodes on the device support up to " +
                    std::to_string(ix::kMaxRanks) + " ranks of up to " + std::to_string(ix::kMaxLocal) +
                    " per node; this group has " + std::to_string(topology.size) + " ranks of " +
                    std::to_string(topology.ranks_per_node) + " (Options.internode_device=False takes the host route)");
  layout_.num_ranks = topology.size;
  layout_.num_nodes = topology.num_nodes;
  layout_.ranks_per_node = topology.ranks_per_node;
  layout_.capacity = capacity;
  layout_.row_bytes = (std::max<int64_t>(min_row_bytes, 16) + 15) / 16 * 16;
  layout_.combine_rows = combine_rows > 0 ? combine_rows : topology.size * capacity;
  EP_CUDA_CHECK(cudaSetDevice(device));
  EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&error_host_), sizeof(int), cudaHostAllocMapped));
  *error_host_ = 0;
  EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_device_), error_host_, 0));
  EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&ctrl_host_), sizeof(ix::IxHostCtrl), cudaHostAllocMapped));
  std::memset(static_cast<void*>(ctrl_host_), 0, sizeof(ix::IxHostCtrl));
  EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&ctrl_device_), ctrl_host_, 0));
  pinned_one();  // abort()'s source, made now (set_device_flag)
}

InternodeBuffer::~InternodeBuffer() {
  if (error_host_) cudaFreeHost(error_host_);
  if (ctrl_host_) cudaFreeHost(ctrl_host_);
}

void InternodeBuffer::reserve(int64_t row_bytes) {
  if (base_) return;
  layout_.row_bytes = std::max(layout_.row_bytes, (row_bytes + 15) / 16 * 16);
  EP_CUDA_CHECK(cudaSetDevice(device_));
  char* base = static_cast<char*>(nvshmem::malloc_symmetric(size_t(layout_.total_bytes())));  // collective
  // Signals, counters and the call number at zero (every rank, before any peer's first put:
  // malloc_symmetric ends in a barrier, and the memset is done before this returns).
  EP_CUDA_CHECK(cudaMemset(base + layout_.notify_flags(), 0, size_t(layout_.total_bytes() - layout_.notify_flags())));
  EP_CUDA_CHECK(cudaDeviceSynchronize());
  nvshmem_barrier_all();  // no peer puts here before the memset above
  maps_node_peers_ = true;  // a node reads its ranks' combine_in in place only where all map each other
  for (int peer : topology_.node_ranks())
    maps_node_peers_ = maps_node_peers_ && nvshmem::peer_ptr(base, peer) != nullptr;
  int sms = 0;
  EP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_));
  num_blocks_ = std::max(1, sms);
  base_ = base;
  gave_up_.store(reinterpret_cast<uint32_t*>(base + layout_.ctrl() + offsetof(ix::IxCtrl, gave_up)),
                 std::memory_order_release);
}

std::string InternodeBuffer::describe(int code) const {
  const int kind = ix::error_kind(code), peer = ix::error_peer(code);
  const std::string waited = " past the timeout (" + std::to_string(double(timeout_.count()) / 1000.0) + " s)";
  const std::string who = "rank " + std::to_string(topology_.rank);
  switch (kind) {
    case ix::kNotifyTimeout:
      return who + " waited" + waited + " for rank " + std::to_string(peer) + "'s record of a dispatch/combine across "
             "nodes (it never came, or stopped calling)";
    case ix::kForwardTimeout:
      return who + " (forwarding a dispatch across nodes) waited" + waited + " for rank " + std::to_string(peer) +
             "'s rows over the rail";
    case ix::kReceiveTimeout:
      return who + " (receiving a dispatch across nodes) waited" + waited + " for the rows rank " +
             std::to_string(peer) + " forwards";
    case ix::kReduceTimeout:
      return who + " (forwarding a combine across nodes) waited" + waited + " for rank " + std::to_string(peer);
    case ix::kCombineTimeout:
      return who + " (receiving a combine across nodes) waited" + waited + " for the sums of rank " +
             std::to_string(peer);
    case ix::kCombineInTimeout:
      return who + " (combine_buffer) waited" + waited + " for rank " + std::to_string(peer) + " to finish reading "
             "this rank's combine input of the last combine across nodes";
    case ix::kDispatchInTimeout:
      return who + " (dispatch_buffer) waited" + waited + " for rank " + std::to_string(peer) + " to finish reading "
             "this rank's packed rows (its dispatch input) of the last dispatch across nodes";
    case ix::kRejected:
      return "rank " + std::to_string(peer) + " refused a dispatch/combine across nodes whose results no host "
             "waited for (num_worst_tokens; its outputs are padding only); call it without num_worst_tokens to see why";
    case ix::kAborted:
      return who + "'s group was aborted";
    case ix::kOverflow:
      return who + " received more rows in a dispatch across nodes than num_worst_tokens; the rows past it were "
             "dropped";
    default:
      return "a kernel across nodes reported error code " + std::to_string(code);
  }
}

std::string InternodeBuffer::error() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!failed_.empty()) return failed_;
  const int code = *static_cast<volatile int*>(error_host_);
  const int kind = ix::error_kind(code);
  if (code != 0 && kind != ix::kRejected && kind != ix::kOverflow)
    failed_ = describe(code) + "; the group's buffers across nodes are out of step since, so every later call raises";
  return failed_;
}

void InternodeBuffer::abort(const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failed_.empty())
      failed_ = why + "; the group's buffers across nodes are out of step since, so every later call raises";
    // The word names the abort (a pending refusal gives way), so that a wait it ends reports no
    // timeout of its own.
    const int aborted = ix::kAborted * 65536 + topology_.rank + 1;
    int code = __atomic_load_n(error_host_, __ATOMIC_ACQUIRE);
    while ((code == 0 || ix::pending_refusal(code)) &&
           !__atomic_compare_exchange_n(error_host_, &code, aborted, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    }
  }
  if (uint32_t* gave_up = gave_up_.load(std::memory_order_acquire)) set_device_flag(device_, gave_up);
}

void InternodeBuffer::check(const char* op) {
  if (const std::string e = error(); !e.empty()) throw CommError(std::string("torch_ep: ") + op + ": " + e);
  // kRejected and kOverflow are known to this rank only (and at a time of its own): raising them
  // here, before this call's notify, would leave the peers waiting for this rank's record.
  // take_pending() refuses the call through its record instead.
}

ix::Status InternodeBuffer::take_pending(int64_t& detail) {
  // Cleared only while it still holds the code read: a kernel may replace a pending code with a
  // timeout meanwhile (ix::report), which must stay for check() to raise.
  int code = __atomic_load_n(error_host_, __ATOMIC_ACQUIRE);
  while (ix::pending_refusal(code) &&
         !__atomic_compare_exchange_n(error_host_, &code, 0, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
  }
  if (!ix::pending_refusal(code)) return ix::kOk;
  detail = ix::error_peer(code);
  return ix::error_kind(code) == ix::kOverflow ? ix::kOverflowed : ix::kRefusedBefore;
}

int InternodeBuffer::take_late_refusal() {
  return __atomic_exchange_n(&ctrl_host_->refused_by_peers, 0, __ATOMIC_ACQ_REL);
}

void InternodeBuffer::put_back_late_refusal(int notice) {
  int none = 0;  // a notice the device set since stays: either says the same
  __atomic_compare_exchange_n(&ctrl_host_->refused_by_peers, &none, notice, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

std::string InternodeBuffer::describe_late_refusal(int notice) const {
  const std::string me = "rank " + std::to_string(topology_.rank);
  return "an earlier dispatch/combine across nodes whose results no host waited for (num_worst_tokens, or a CUDA "
         "graph) was refused by its peers, told of rank " + std::to_string(notice - 1) + "'s refusal of a call "
         "before it, although " + me + "'s own record accepted it: " + me + "'s outputs of that call are padding only";
}

ix::IxParams InternodeBuffer::params() {
  ix::IxParams p{};
  p.base = base_;
  p.layout = layout_;
  p.rank = topology_.rank;
  p.node = topology_.node;
  p.local = topology_.local_rank;
  p.timeout_ns = uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(timeout_).count());
  p.error = error_device_;
  p.host = ctrl_device_;
  p.num_blocks = num_blocks_;
  p.whatif_copy_puts = nvshmem::whatif_copy_puts();
  p.ticket = ++tickets_;
  return p;
}

void InternodeBuffer::end_call(cudaStream_t stream, bool capturing) {
  // Inside a capture the order is the capture's own (an event recorded in it), as for all_to_all.
  order_.end(stream, capturing ? nullptr : std::make_shared<StreamMark>(device_, stream));
}

const ix::IxHostCtrl& InternodeBuffer::wait_for(int64_t ticket, const char* op) {
  // The notify step's own waits are bounded by the timeout; the stream may hold earlier work
  // (the caller's), so the host allows twice that before it gives up.
  const auto deadline = std::chrono::steady_clock::now() + 2 * timeout_;
  int spins = 0;
  while (ctrl_host_->ticket != ticket) {
    if (std::chrono::steady_clock::now() > deadline)
      throw CommError(std::string("torch_ep: ") + op + ": rank " + std::to_string(topology_.rank) + " waited past " +
                      std::to_string(2 * timeout_.count()) + " ms for the sizes of a call across nodes (the device "
                      "never reached its notify step)");
    if (++spins > 1024) {
      // An abort names itself in the error word (abort()): error() raises it below.
      if (ix::error_kind(__atomic_load_n(error_host_, __ATOMIC_ACQUIRE)) == ix::kAborted) break;
      std::this_thread::yield();
    }
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  if (const std::string e = error(); !e.empty()) throw CommError(std::string("torch_ep: ") + op + ": " + e);
  // The notify gave up on a record, but no timeout shows in the word (another report raced it):
  // the same failure, for good, rather than a refusal in the records' words.
  if (ctrl_host_->timed_out) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failed_.empty())
      failed_ = "rank " + std::to_string(topology_.rank) + " waited past the timeout (" +
                std::to_string(double(timeout_.count()) / 1000.0) + " s) for a peer's record of a dispatch/combine "
                "across nodes; the group's buffers across nodes are out of step since, so every later call raises";
    throw CommError(std::string("torch_ep: ") + op + ": " + failed_);
  }
  return *ctrl_host_;
}

}  // namespace ep
