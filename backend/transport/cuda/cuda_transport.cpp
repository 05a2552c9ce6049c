#include "backend/transport/cuda/cuda_transport.hpp"

#include <cuda.h>

#include <algorithm>
#include <cstring>

#include "backend/common/env_switch.hpp"
#include "backend/kernels/all_to_all.cuh"
#include "backend/kernels/moe_records.cuh"  // kMoeReportWords
#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/cuda/kernel_preload.hpp"

namespace ep {
namespace {

// Block layout: flags, then the staging regions.
//   [full: size x 2][empty: size x 2][ready: size][done: size] (uint32) ...
//   [push counts at kPushCountsOffset: kMaxRanksPerNode rows of kPushCountsStride int32]
//   [slices done at kSlicesDoneOffset: kMaxRanksPerNode uint32] ... [grid counter]
//   [regions at kDataOffset] [records region, where CudaTransportConfig::records_bytes asks for one]
// Region `src` (2 slots of chunk_bytes) starts at kDataOffset + src * 2 * chunk_bytes.
constexpr size_t kDataOffset = 64 << 10;
constexpr size_t kChunkAlign = 4096;
// The direct kernel's grid without an SM budget: a block for each unit of work (a slice of a
// message, kernels/all_to_all.cu), at most kMaxDirectBlocks, in waves where the client's share of
// the SMs holds fewer. H100, replayed, against the grids before (32 blocks; 96 at 2 ranks from
// 2 MiB a message): 2 ranks, 16 MiB a rank 27.8-27.9 us against 29.5-29.7, 64 MiB (the kernel
// forced: TORCH_EP_ALL_TO_ALL_KERNEL_BYTES) 101.7-103.0 against 105.7-106.0, and one wave of 132
// blocks 103.6-103.9; 4 ranks, 4 / 16 MiB 15.8 / 57.9 against 17.6 / 61.3; 8 ranks within 1.5 %.
// Smaller calls have no more units than those grids held, and run as before
// (results/h100_2026-12-07, e0da301, as TORCH_EP_NUM_SMS=512).
constexpr int kMaxDirectBlocks = 512;
constexpr int kMaxRanks = 2048;  // flags of kMaxRanks ranks fit before kPushCountsOffset
// A pushing MoE dispatch's send matrix rows (kernels/moe.cuh, DispatchPushParams::counts): past
// every flag (kMaxRanks x 6 words = 48 KiB), before the grid counter.
constexpr size_t kPushCountsOffset = 56 << 10;
static_assert(kPushCountsOffset >= size_t(kMaxRanks) * 6 * sizeof(uint32_t) &&
                  kPushCountsOffset + sizeof(int32_t) * kernels::kMaxRanksPerNode * kernels::kPushCountsStride <
                      kDataOffset - sizeof(uint32_t),
              "the push counts fit between the flags and the grid counter");
// The direct kernel's count of a message's slices copied, a word per peer (kernels/all_to_all.cuh).
constexpr size_t kSlicesDoneOffset = 60 << 10;
static_assert(kSlicesDoneOffset >= kPushCountsOffset + sizeof(int32_t) * kernels::kMaxRanksPerNode *
                                                           kernels::kPushCountsStride &&
                  kSlicesDoneOffset + sizeof(uint32_t) * kernels::kMaxRanksPerNode < kDataOffset - sizeof(uint32_t),
              "the slice counts fit between the push counts and the grid counter");

size_t chunk_bytes_for(size_t buffer_bytes, int size) {
  return std::max<size_t>(buffer_bytes / (size_t(size) * CudaTransport::kSlots * kChunkAlign), 1) * kChunkAlign;
}

HostTransportConfig control_config(std::chrono::milliseconds timeout, size_t slot_bytes) {
  HostTransportConfig c;
  c.slot_bytes = slot_bytes;  // all_to_all: one ControlRecord per message
  c.num_slots = 4;
  c.one_copy = false;  // records are tiny
  c.timeout = timeout;
  return c;
}

}  // namespace

uint32_t* CudaTransport::full_flag(int owner, int src, int slot) const {
  return reinterpret_cast<uint32_t*>(buffers_.block(owner)) + src * kSlots + slot;
}
uint32_t* CudaTransport::empty_flag(int owner, int dst, int slot) const {
  return reinterpret_cast<uint32_t*>(buffers_.block(owner)) + size_ * kSlots + dst * kSlots + slot;
}
uint32_t* CudaTransport::ready_flag(int owner, int receiver) const {
  return reinterpret_cast<uint32_t*>(buffers_.block(owner)) + size_ * kSlots * 2 + receiver;
}
uint32_t* CudaTransport::done_flag(int owner, int sender) const {
  return reinterpret_cast<uint32_t*>(buffers_.block(owner)) + size_ * kSlots * 2 + size_ + sender;
}
int32_t* CudaTransport::push_counts(int owner, int sender) const {
  if (size_ > kernels::kMaxRanksPerNode) return nullptr;
  return reinterpret_cast<int32_t*>(buffers_.block(owner) + kPushCountsOffset) + sender * kernels::kPushCountsStride;
}
uint32_t* CudaTransport::slices_done() const {
  return reinterpret_cast<uint32_t*>(buffers_.block(rank_) + kSlicesDoneOffset);
}
uint32_t* CudaTransport::grid_counter() const {
  return reinterpret_cast<uint32_t*>(buffers_.block(rank_) + kDataOffset) - 1;  // past every flag
}
char* CudaTransport::slot_data(int owner, int src, int slot) const {
  return buffers_.block(owner) + kDataOffset + (size_t(src) * kSlots + slot) * chunk_bytes_;
}

CudaTransport::CudaTransport(Rendezvous& rdv, const CudaTransportConfig& config, const std::string& tag)
    : rank_(rdv.rank()),
      size_(rdv.size()),
      timeout_(config.timeout),
      num_sms_(config.num_sms),
      kernel_bytes_(config.kernel_bytes),
      buffers_(rdv, config.device,
               kDataOffset + chunk_bytes_for(config.buffer_bytes, rdv.size()) * rdv.size() * kSlots + config.records_bytes,
               tag + "/buffers"),
      chunk_bytes_(chunk_bytes_for(config.buffer_bytes, rdv.size())),
      control_(rdv, control_config(config.timeout, config.control_slot_bytes), tag + "/control"),
      mappings_(rdv, tag + "/mappings"),
      exports_(std::make_shared<ExportTable>(mappings_.take_own_log())),
      release_mappings_(env_switch_on_by_default("TORCH_EP_RELEASE_PEER_MAPPINGS")) {
  for (int r = 0; r < size_; ++r) group_ranks_.push_back(rdv.group_rank(r));
  if (size_ > kMaxRanks) throw CommError("torch_ep: the CUDA transport supports up to 2048 ranks per node");
  EP_CUDA_CHECK(cudaSetDevice(config.device));
  preload_kernels(config.device);  // before any kernel of ours can spin (kernel_preload.hpp)
  // full = 0 (nothing sent), empty = 1 (every slot free), ready = done = 0.
  std::vector<uint32_t> flags(size_t(size_) * (kSlots * 2 + 2), 0);
  std::fill(flags.begin() + size_ * kSlots, flags.begin() + size_ * kSlots * 2, 1u);
  EP_CUDA_CHECK(cudaMemcpy(buffers_.block(rank_), flags.data(), flags.size() * sizeof(uint32_t),
                           cudaMemcpyHostToDevice));
  EP_CUDA_CHECK(cudaMemset(grid_counter(), 0, sizeof(uint32_t)));
  EP_CUDA_CHECK(cudaMemset(slices_done(), 0, sizeof(uint32_t) * kernels::kMaxRanksPerNode));
  // The direct kernel's flags and fences at GPU scope where every peer's block lies on this GPU
  // (as mapped here: ranks sharing it under MPS), which that scope covers; system scope where a
  // peer is another GPU. H100, 2 ranks, alternating three times: replayed 6.1-6.4 us a call
  // against 7.4-7.9 at 4-16 KiB, 9.4-9.6 against 10.2-10.4 at 4 MiB; the same at 64 MiB
  // (results/h100_2026-12-06/direct_whatif_ab_2ba59cc.md). TORCH_EP_DIRECT_GPU_SCOPE=0 keeps system scope.
  direct_gpu_scope_ = env_switch_on_by_default("TORCH_EP_DIRECT_GPU_SCOPE") && buffers_.all_on_this_gpu();
  // all_to_all's kernels launched early (backend/kernels/early_launch.cuh): the next kernel's launch
  // overlaps the end of the one before it. H100, 2 ranks, with the device protocol's GPU scope, two
  // runs: the default's eager 16 MiB 27.9-28.0 us against 29.2-29.4, the device protocol's calls
  // 2-5 us less up to 4 MiB and 13-24 us less at 8 ranks (results/h100_2026-12-07/
  // all_to_all_whatifs_*_4e4ab08.md). TORCH_EP_EARLY_LAUNCH=0 launches them in stream order.
  early_launch_ = env_switch_on_by_default("TORCH_EP_EARLY_LAUNCH");
  if (config.records_bytes) {  // every slot free (flags 0), no plan
    records_offset_ = kDataOffset + chunk_bytes_ * size_t(size_) * kSlots;
    records_flag_bytes_ = config.records_flag_bytes;
    // Zeroed before any peer writes a flag in it: the cudaDeviceSynchronize below, before the
    // barrier, covers this memset too.
    EP_CUDA_CHECK(cudaMemset(buffers_.block(rank_) + records_offset_, 0, config.records_bytes));
    // The report, then the sizes a dispatch's first round writes (kernels/moe_records.cuh).
    const size_t words = kernels::kMoeReportWords + kernels::kMoeSizesWords;
    EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&moe_report_host_), words * sizeof(int64_t),
                                cudaHostAllocMapped));
    std::memset(moe_report_host_, 0, words * sizeof(int64_t));
    EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&moe_report_device_), moe_report_host_, 0));
  }
  EP_CUDA_CHECK(cudaStreamCreateWithFlags(&watchdog_stream_, cudaStreamNonBlocking));
  EP_CUDA_CHECK(cudaStreamCreateWithFlags(&self_copy_stream_, cudaStreamNonBlocking));
  EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&kernel_error_host_), sizeof(int), cudaHostAllocMapped));
  *kernel_error_host_ = 0;
  EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&kernel_error_device_), kernel_error_host_, 0));
  EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&kernel_abort_host_), sizeof(int), cudaHostAllocMapped));
  *kernel_abort_host_ = 0;
  EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&kernel_abort_device_), kernel_abort_host_, 0));
  EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&overflow_host_), sizeof(*overflow_host_), cudaHostAllocMapped));
  std::memset(overflow_host_, 0, sizeof(*overflow_host_));
  EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&overflow_device_), overflow_host_, 0));
  // cudaMemcpy from pageable memory and cudaMemset may return before the device holds the values;
  // the peers write these flags as soon as the barrier passes.
  EP_CUDA_CHECK(cudaDeviceSynchronize());
  rdv.barrier(tag + "/ready");  // no peer writes our flags before they are initialised
  watchdog_ = std::thread([this] { watch(); });
}

CudaTransport::~CudaTransport() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;  // calls still in flight finish, or time out and are released, first
  }
  cv_.notify_all();
  watchdog_.join();
  cudaSetDevice(buffers_.device());  // for the streams below and mappings_' closes after the body
  if (watchdog_stream_) {
    cudaStreamSynchronize(watchdog_stream_);
    cudaStreamDestroy(watchdog_stream_);
  }
  if (self_copy_stream_) {
    cudaStreamSynchronize(self_copy_stream_);
    cudaStreamDestroy(self_copy_stream_);
  }
  if (kernel_error_host_) cudaFreeHost(kernel_error_host_);
  if (kernel_abort_host_) cudaFreeHost(kernel_abort_host_);
  if (overflow_host_) cudaFreeHost(overflow_host_);
  if (moe_report_host_) cudaFreeHost(moe_report_host_);
}

std::string CudaTransport::device_records_hint(const std::string& op) const {
  if (!records_offset_ || op.rfind("dispatch", 0) != 0) return "";
  return " (with device records, TORCH_EP_MOE_DEVICE_RECORDS, a likely cause: the ranks' calls are out of step, "
         "e.g. one captures a CUDA graph, whose dispatch keeps host records, where another runs eagerly)";
}

char* CudaTransport::records(int owner) const {
  return records_offset_ ? buffers_.block(owner) + records_offset_ : nullptr;
}

int64_t* CudaTransport::moe_sizes() const {
  return moe_report_device_ ? moe_report_device_ + kernels::kMoeReportWords : nullptr;
}

const volatile int64_t* CudaTransport::moe_sizes_host() const {
  return moe_report_host_ ? moe_report_host_ + kernels::kMoeReportWords : nullptr;
}

std::vector<int64_t> CudaTransport::take_moe_report() {
  using namespace kernels;
  volatile int64_t* r = moe_report_host_;
  // Every MoE call looks: nothing to take costs one read, no lock and no allocation.
  if (!r || r[kMoeReportCode] == 0) return {};
  // Under the lock, so that two threads cannot both take (and raise) one report. While word 0 is
  // set the device writes only the later-problems words, so the others read whole.
  std::lock_guard<std::mutex> lock(moe_report_mutex_);
  if (r[kMoeReportCode] == 0) return {};
  std::vector<int64_t> words(kMoeReportWords, 0);
  std::atomic_thread_fence(std::memory_order_acquire);
  for (int w = 0; w < kMoeReportWords; ++w) words[size_t(w)] = r[w];
  // The count of later problems back to 0 with what it held at that moment (a notify kernel may
  // add to it meanwhile: the device's atomicAdd against the host's exchange).
  words[kMoeReportLater] = __atomic_exchange_n(const_cast<int64_t*>(&r[kMoeReportLater]), int64_t(0), __ATOMIC_SEQ_CST);
  words[kMoeReportLaterCallId] = r[kMoeReportLaterCallId];
  std::atomic_thread_fence(std::memory_order_release);
  r[kMoeReportCode] = 0;  // the next report may be written
  return words;
}

std::string CudaTransport::take_dispatch_overflow() {
  volatile kernels::DispatchOverflow* o = overflow_host_;
  if (!o || o->state != 2) return "";
  std::atomic_thread_fence(std::memory_order_acquire);
  const int64_t call_id = o->call_id, received = o->received, capacity = o->capacity;
  o->state = 0;
  return dispatch_overflow_message(call_id, rank_, received, capacity, /*dropped=*/true);
}

std::string CudaTransport::error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_;
}

std::string CudaTransport::kernel_waited_for(int waited_for) const {
  if (waited_for == kernels::kErrorNoPeer) return "in the device kernel for this rank's own plan (no peer known)";
  return "for peer rank " + name(waited_for - 1) + " (in the device kernel)";
}

void CudaTransport::check_healthy(const char* op_name) {
  const int waited_for = *static_cast<volatile int*>(kernel_error_host_);
  std::string error, kernel_error;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (error_.empty() && waited_for)  // the watchdog has not seen it yet
      kernel_error = (last_op_.empty() ? std::string(op_name) : last_op_) + ": timed out on rank " +
                     name(rank_) + " after " + std::to_string(timeout_.count()) +
                     " ms waiting " + kernel_waited_for(waited_for) + ": a peer never arrived or stalled" +
                     device_records_hint(last_op_.empty() ? std::string(op_name) : last_op_);
    error = error_;
  }
  if (!kernel_error.empty()) {
    fail(kernel_error);
    error = this->error();
  }
  if (!error.empty())
    throw CommError(std::string(op_name) + ": this group's CUDA transport stopped after an earlier error and "
                    "takes no more calls; destroy the process group. The error was: " + error);
}

void CudaTransport::exchange(const void* mine, void* theirs, size_t record_bytes, const char* op_name) {
  exchanges_.fetch_add(1, std::memory_order_relaxed);
  std::vector<SendBuffer> sends(size_);
  std::vector<RecvBuffer> recvs(size_);
  for (int p = 0; p < size_; ++p) {
    sends[p] = {static_cast<const char*>(mine) + p * record_bytes, record_bytes};
    recvs[p] = {static_cast<char*>(theirs) + p * record_bytes, record_bytes};
  }
  control_exchange(sends, recvs, op_name);
}

int CudaTransport::direct_blocks() const {
  return num_sms_ > 0 ? num_sms_ : kMaxDirectBlocks;  // the group's SM budget, else a block a unit
}

std::shared_ptr<StreamMark> CudaTransport::track(const char* op_name, cudaStream_t stream, std::vector<int> peers) {
  if (stream_capturing(stream)) return nullptr;  // replays run where the watchdog cannot see
  return track_uncaptured(op_name, stream, std::move(peers));
}

std::shared_ptr<StreamMark> CudaTransport::track_uncaptured(const char* op_name, cudaStream_t stream,
                                                            std::vector<int> peers) {
  auto done = std::make_shared<StreamMark>(device(), stream);
  Inflight op{op_name, std::chrono::steady_clock::now(), std::move(peers), done};
  {
    std::lock_guard<std::mutex> lock(mutex_);
    last_op_ = op.op;
    inflight_.push_back(std::move(op));
    tracked_.fetch_add(1, std::memory_order_release);  // in inflight_'s order: the watchdog completes them so
  }
  return done;
}

std::shared_ptr<StreamMark> CudaTransport::track(const char* op_name, cudaStream_t stream) {
  return track_known_capture(op_name, stream, stream_capturing(stream));
}

std::shared_ptr<StreamMark> CudaTransport::track_known_capture(const char* op_name, cudaStream_t stream,
                                                               bool capturing) {
  if (capturing) return nullptr;
  std::vector<int> peers;
  for (int p = 0; p < size_; ++p)
    if (p != rank_) peers.push_back(p);
  return track_uncaptured(op_name, stream, std::move(peers));
}

void CudaTransport::control_exchange(const std::vector<SendBuffer>& sends, const std::vector<RecvBuffer>& recvs,
                                     const char* op_name) {
  try {
    control_.all_to_all(sends, recvs, op_name);
  } catch (const std::exception& e) {
    fail(e.what());  // a peer is gone or out of step: so is this transport, for good
    throw;
  }
}

void CudaTransport::on_failure(std::function<void(const std::string&)> listener) {
  std::string already;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    failure_listener_ = listener;
    already = error_;
  }
  if (!already.empty() && listener) listener(already);
}

void CudaTransport::abort(const std::string& why) { fail(why); }

void CudaTransport::fail(const std::string& why) {
  // First, and on every failure (a timeout, a failed exchange, abort()): the kernels in flight or
  // queued that poll it give up at their next poll instead of each waiting out its own timeout.
  if (kernel_abort_host_) *static_cast<volatile int*>(kernel_abort_host_) = 1;
  std::function<void(const std::string&)> listener;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error_.empty()) return;
    error_ = why;
    listener = failure_listener_;
  }
  cv_.notify_all();  // the watchdog releases whatever still waits
  if (listener) listener(why);
}

void CudaTransport::release_waits() {
  // Non-zero bytes in every flag of ours: each GEQ-1 wait on this rank passes.
  cudaMemsetAsync(buffers_.block(rank_), 0x01, size_t(size_) * (kSlots * 2 + 2) * sizeof(uint32_t),
                  watchdog_stream_);
  // And the records' flags: a notify waiting for a record finds a value no peer stores, and moves nothing.
  if (records_flag_bytes_)
    cudaMemsetAsync(buffers_.block(rank_) + records_offset_, 0x01, records_flag_bytes_, watchdog_stream_);
}

void CudaTransport::watch() {
  cudaSetDevice(buffers_.device());
  // Another thread may be capturing a CUDA graph in global mode, which forbids event queries
  // from every thread in that mode and invalidates the capture; this thread never captures.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeThreadLocal;
  cudaThreadExchangeStreamCaptureMode(&mode);
  // Calls move from inflight_ to this thread's own queue and are queried without the lock:
  // a driver call under it would stall the next op's track() on the caller's thread.
  std::deque<Inflight> watched;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    const bool releasing = !error_.empty();
    // track() does not wake us: a poll every 50 ms keeps the timeout's resolution, and a busy
    // caller pays no wake-up per call.
    cv_.wait_for(lock, releasing ? std::chrono::milliseconds(1) : std::chrono::milliseconds(50));
    for (Inflight& op : inflight_) watched.push_back(std::move(op));
    inflight_.clear();
    lock.unlock();

    std::string error;
    bool stalled = false;
    while (!watched.empty()) {
      Inflight& op = watched.front();
      const cudaError_t state = cudaEventQuery(op.done->event());
      if (state == cudaErrorNotReady) {
        const auto elapsed = std::chrono::steady_clock::now() - op.start;
        if (elapsed > timeout_) {
          std::string peers;
          for (int p : op.peers) peers += (peers.empty() ? "" : ", ") + name(p);
          error = op.op + ": timed out on rank " + name(rank_) + " after " +
                  std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count()) +
                  " ms waiting for peer rank(s) " + peers + ": a peer never arrived or stalled" +
                  device_records_hint(op.op);
        }
        stalled = true;
        break;
      }
      const int waited_for = *static_cast<volatile int*>(kernel_error_host_);
      if (state != cudaSuccess)
        error = op.op + ": CUDA error " + cudaGetErrorString(state);
      else if (waited_for)  // a kernel's bounded wait expired and it gave up
        error = op.op + ": timed out on rank " + name(rank_) + " after " +
                std::to_string(timeout_.count()) + " ms waiting " + kernel_waited_for(waited_for) +
                ": a peer never arrived or stalled" + device_records_hint(op.op);
      watched.pop_front();  // its event goes back to the pool with the mark's last holder
      completed_.fetch_add(1, std::memory_order_release);
    }
    if (release_mappings_ && error.empty()) mappings_.sweep(tracked_, completed_);

    lock.lock();
    if (!error.empty()) {
      lock.unlock();
      fail(error);
      lock.lock();
    }
    if (stalled && !error_.empty()) release_waits();
    if (stopping_ && inflight_.empty() && watched.empty()) return;
  }
}

}  // namespace ep
