// All-to-all between the GPUs (or ranks sharing a GPU) of one node, on copies and stream memory
// operations: no kernel spins, so ranks never compete for SMs and no wait needs a co-resident
// peer. Everything a rank does runs on the caller's (comm) stream: one blocking stream per rank
// (several per rank alias onto shared hardware queues under MPS and can deadlock).
//
// Each call starts with a control exchange over shared memory: every rank tells every peer how
// many bytes it sends and expects, and exports the receive buffer (CUDA IPC handle + offset).
// Sizes that disagree raise on both ranks of the pair before anything is queued.
//
// Direct path (one copy), when every receive buffer could be exported:
//   receiver: set ready[me] in each sender's block; later wait done[src] for each sender
//   sender:   wait ready[dst] -> copy straight into dst's output -> set done[me] in dst's block
// A rank whose messages are all small runs its side as one kernel (backend/kernels) that polls
// every flag at once; larger ones use copies and stream memory operations. The flags are the
// same either way, so each rank chooses alone.
// Staged path (two copies), the fallback: each rank's registered block holds, for every source,
// a region of two slots, and a message streams through it in slot-sized chunks:
//   sender (per chunk):   wait empty[dst][s] -> clear it -> copy chunk into dst's slot s ->
//                         set full[me][s] in dst's block
//   receiver (per chunk): wait full[src][s]  -> clear it -> copy slot s out to the output ->
//                         set empty[me][s] in src's block
// Flags go back to their initial values after every call, so a captured CUDA graph replays.
// A watchdog bounds every wait: past the timeout it records an error naming the op and the
// peers that never answered, then releases the stuck waits so no stream hangs forever.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "backend/kernels/moe.cuh"  // DispatchOverflow
#include "backend/transport/cuda/call_order.hpp"
#include "backend/transport/cuda/peer_buffers.hpp"
#include "backend/transport/cuda/peer_mappings.hpp"
#include "backend/transport/host/host_transport.hpp"  // SendBuffer, RecvBuffer
#include "backend/transport/rendezvous.hpp"

namespace ep {

struct CudaTransportConfig {
  int device = 0;
  size_t buffer_bytes = 64 << 20;  // this rank's registered receive block
  int num_sms = 0;                 // blocks of the transport's kernels; 0 = a block a unit of work, at most 512
  // all_to_all: messages up to this size (the largest to any peer) go through one kernel, larger
  // ones by the copy engines (Options.all_to_all_kernel_bytes).
  size_t kernel_bytes = size_t(8) << 20;
  size_t control_slot_bytes = 256;  // chunk of the per-call control exchange over shared memory
  // A region past the staging regions for the MoE device records (kernels/moe_records.cuh,
  // MoeRecordsLayout::kBytes); 0: none. Its first `records_flag_bytes` are flags that the release
  // of stuck waits sets too.
  size_t records_bytes = 0;
  size_t records_flag_bytes = 0;
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};
};

class CudaTransport {
 public:
  // Collective over the ranks of `rdv`.
  CudaTransport(Rendezvous& rdv, const CudaTransportConfig& config, const std::string& tag);
  ~CudaTransport();

  static constexpr int kSlots = 2;  // staging slots of each (owner, source) region

  // Enqueues the exchange on `stream`, after this transport's previous one whatever stream that
  // ran on, and returns its end (track); pointers are device memory. Throws if the transport
  // failed earlier (a timeout), since its flags no longer agree with the peers'. The host
  // protocol, host_protocol.cpp.
  std::shared_ptr<StreamMark> all_to_all(const std::vector<SendBuffer>& sends, const std::vector<RecvBuffer>& recvs,
                                         cudaStream_t stream, const char* op_name);

  // The error that stopped this transport, or "" while it is healthy.
  std::string error() const;
  // `listener` hears, once and from whichever thread found it (often the watchdog's), the error
  // that stops this transport: the group then refuses every later call, delegated ones too.
  void on_failure(std::function<void(const std::string&)> listener);
  // Stops the transport now (the group's abort()): calls in flight on this rank are released
  // at the watchdog's next poll, and later calls raise `why`.
  void abort(const std::string& why);
  int device() const { return buffers_.device(); }
  int rank() const { return rank_; }
  int size() const { return size_; }
  // Whether all_to_all moves a call with these sends by its one kernel (where every receiver
  // exported its output; else it stages through the copy engines): the largest message to a peer
  // has at most CudaTransportConfig::kernel_bytes. Else the copy engines move it, on no SM.
  bool moves_by_kernel(const std::vector<SendBuffer>& sends) const;
  // The most blocks the direct kernel launches (it takes fewer where a call has fewer units of work).
  int direct_blocks() const;
  // all_to_all's kernels launched early (backend/kernels/early_launch.cuh): on unless
  // TORCH_EP_EARLY_LAUNCH=0, read once.
  bool early_launch() const { return early_launch_; }

  // ---- for kernels that read peers' memory directly (MoE dispatch/combine, backend/ops) ----
  // Throws naming `op_name` once the transport has failed, or once a kernel's bounded wait gave
  // up (read from the mapped error word now, not at the watchdog's next poll: a synchronised
  // caller learns it at once).
  void check_healthy(const char* op_name);
  // Sends mine[p] (record_bytes each) to every rank p and returns what each sent us, over shared
  // memory; raises on timeouts like all_to_all.
  void exchange(const void* mine, void* theirs, size_t record_bytes, const char* op_name);
  // How many exchanges this rank made (for tests: a call with device records makes none).
  uint64_t exchanges() const { return exchanges_.load(std::memory_order_relaxed); }
  using Export = ExportTable::Export;
  // Exports the allocation holding `ptr` (ExportTable::export_allocation).
  bool export_allocation(const void* ptr, cudaIpcMemHandle_t* handle, uint64_t* offset, Export* last = nullptr) {
    return exports_->export_allocation(ptr, handle, offset, last);
  }
  // Maps a peer's exported allocation once; later calls reuse the mapping. The caller holds
  // hold_mappings() until its call is tracked.
  char* open_peer_allocation(int peer, const cudaIpcMemHandle_t& handle) { return mappings_.open(peer, handle); }
  // What a call that opens peers' allocations holds from before its record exchange until it is
  // tracked (peer_mappings.hpp): no sweep closes a mapping in between.
  std::unique_lock<std::mutex> hold_mappings() { return mappings_.hold(); }
  // Whether freed segments' mappings are released (unless TORCH_EP_RELEASE_PEER_MAPPINGS=0, read at
  // construction): the torch side then reports this rank's freed segments to exports().
  bool releases_mappings() const { return release_mappings_; }
  // This rank's exports, for the allocator's trace hook (which holds it weakly).
  std::shared_ptr<ExportTable> exports() const { return exports_; }
  PeerMappings& mappings() { return mappings_; }
  // Handshake flags: a set ready/done flag in `owner`'s block at index `peer`.
  uint32_t* ready_flag(int owner, int peer) const;
  uint32_t* done_flag(int owner, int peer) const;
  // A pushing MoE dispatch's row of the send matrix from `sender` in `owner`'s block
  // (kernels::kPushCountsStride int32); null in groups of more than kMaxRanksPerNode ranks.
  int32_t* push_counts(int owner, int sender) const;
  // A counter in this rank's own block, 0 between kernels: a kernel's blocks count themselves
  // done on it, and the last one resets it.
  uint32_t* grid_counter() const;
  uint32_t* slices_done() const;  // the direct kernel's, in this rank's block
  int* kernel_error() const { return kernel_error_device_; }
  // Host-mapped, non-zero once this transport has failed (fail(): any failure, abort() included),
  // for kernels whose bounded waits poll it (all_to_all_v's); it lives as long as the transport.
  const int* kernel_abort() const { return kernel_abort_device_; }
  // `owner`'s records region (CudaTransportConfig::records_bytes) as mapped here; null without one.
  char* records(int owner) const;
  // Where MoE notify kernels report what they found (kernels::kMoeReportWords int64, host-mapped;
  // device pointer; null without a records region), and the report taken (empty when there is
  // none), cleared: one caller takes each report, whatever the threads.
  int64_t* moe_report() const { return moe_report_device_; }
  // Where a dispatch's first round of device records writes the sizes its host waits for
  // (kernels::MoeSizesWord): the device's pointer, and the host's; null without a records region.
  int64_t* moe_sizes() const;
  const volatile int64_t* moe_sizes_host() const;
  std::vector<int64_t> take_moe_report();
  // The next MoE call with device records, counted on this rank (kernels::MoeNotifyParams::call_seq).
  int64_t next_moe_call() { return moe_calls_.fetch_add(1, std::memory_order_relaxed) + 1; }
  // Where dispatch kernels report receiving more rows than num_worst_tokens (device pointer).
  kernels::DispatchOverflow* dispatch_overflow() const { return overflow_device_; }
  // The overflow a finished dispatch kernel reported, as the error to raise, and clears it; ""
  // when none did. Bad input, not a transport failure: the transport stays healthy.
  std::string take_dispatch_overflow();
  std::chrono::milliseconds timeout() const { return timeout_; }
  // Lets the watchdog bound what was just queued on `stream`; returns the mark it watches, the
  // end of that work (null while capturing a graph: a no-op then).
  std::shared_ptr<StreamMark> track(const char* op_name, cudaStream_t stream, std::vector<int> peers);
  // The same for a call that waits on every other rank of the transport.
  std::shared_ptr<StreamMark> track(const char* op_name, cudaStream_t stream);
  // The same where the caller already asked whether `stream` captures (a driver call spared). A
  // name of its own: an overload on bool would take the `{}` of a call that names no peers.
  std::shared_ptr<StreamMark> track_known_capture(const char* op_name, cudaStream_t stream, bool capturing);

 private:
  struct Inflight {
    std::string op;
    std::chrono::steady_clock::time_point start;
    std::vector<int> peers;  // ranks this call exchanges data with
    std::shared_ptr<StreamMark> done;
  };

  // track() on a stream known not to be capturing.
  std::shared_ptr<StreamMark> track_uncaptured(const char* op_name, cudaStream_t stream, std::vector<int> peers);
  uint32_t* full_flag(int owner, int src, int slot) const;
  uint32_t* empty_flag(int owner, int dst, int slot) const;
  char* slot_data(int owner, int src, int slot) const;
  void enqueue_direct(const std::vector<SendBuffer>& sends, const std::vector<char*>& remote_outputs,
                      const std::vector<RecvBuffer>& recvs, cudaStream_t stream);
  // with_self: the kernel copies this rank's own message too (else all_to_all copied it apart).
  void launch_direct_kernel(const std::vector<SendBuffer>& sends, const std::vector<char*>& remote_outputs,
                           const std::vector<RecvBuffer>& recvs, bool with_self, cudaStream_t stream);
  void enqueue_staged(const std::vector<SendBuffer>& sends, const std::vector<RecvBuffer>& recvs,
                      cudaStream_t stream);
  void watch();
  // control_.all_to_all; a failure there fails the transport.
  void control_exchange(const std::vector<SendBuffer>& sends, const std::vector<RecvBuffer>& recvs,
                        const char* op_name);
  // Records the first error and tells the listener (called without mutex_ held).
  void fail(const std::string& why);
  void release_waits();  // makes every wait on this rank's flags pass
  // What a dispatch's timeout adds where device records are on: the likely cause.
  std::string device_records_hint(const std::string& op) const;

  int rank_;
  int size_;
  // Each member's rank in the whole group (a node's transport across nodes is a subset of it):
  // what errors name, as the user counts ranks.
  std::vector<int> group_ranks_;
  std::string name(int member) const {
    return member >= 0 && member < int(group_ranks_.size()) ? std::to_string(group_ranks_[size_t(member)])
                                                             : std::to_string(member);
  }
  // What a kernel's error word (1 + a peer, or kernels::kErrorNoPeer) says its wait was for.
  std::string kernel_waited_for(int waited_for) const;
  std::chrono::milliseconds timeout_;
  int num_sms_;
  size_t kernel_bytes_;
  bool direct_gpu_scope_ = false;  // the direct kernel at GPU scope: every peer shares this GPU
  bool early_launch_ = false;
  PeerBuffers buffers_;
  size_t chunk_bytes_;
  HostTransport control_;  // per-call exchange of sizes and receive-buffer handles
  PeerMappings mappings_;                 // the peers' allocations mapped here
  std::shared_ptr<ExportTable> exports_;  // ours, exported to the peers
  bool release_mappings_ = false;
  std::atomic<uint64_t> tracked_{0};      // calls tracked so far
  std::atomic<uint64_t> completed_{0};    // of those, complete in tracking order (the watchdog's)
  CallOrder all_to_all_order_;  // all_to_all's calls share the flags and slots (caller's thread)
  cudaStream_t watchdog_stream_ = nullptr;
  cudaStream_t self_copy_stream_ = nullptr;  // all_to_all's large self copy, beside the peers' traffic
  int* kernel_error_host_ = nullptr;  // pinned, mapped: 1 + the peer a kernel's wait timed out on
  int* kernel_error_device_ = nullptr;
  int* kernel_abort_host_ = nullptr;  // pinned, mapped: set by fail()
  int* kernel_abort_device_ = nullptr;
  kernels::DispatchOverflow* overflow_host_ = nullptr;  // pinned, mapped
  kernels::DispatchOverflow* overflow_device_ = nullptr;
  std::atomic<uint64_t> exchanges_{0};
  size_t records_offset_ = 0;  // of the records region in every block; 0: none
  size_t records_flag_bytes_ = 0;
  int64_t* moe_report_host_ = nullptr;  // pinned, mapped
  int64_t* moe_report_device_ = nullptr;
  std::mutex moe_report_mutex_;  // take_moe_report's read-and-clear
  std::atomic<int64_t> moe_calls_{0};

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Inflight> inflight_;
  std::string error_;
  std::string last_op_;  // of the last tracked call: what a kernel's timeout is reported against
  std::function<void(const std::string&)> failure_listener_;
  bool stopping_ = false;
  std::thread watchdog_;
};

}  // namespace ep
