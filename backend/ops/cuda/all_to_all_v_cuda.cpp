// all_to_all_v on CUDA tensors: host glue around backend/kernels/all_to_all_v.cu. The host only
// launches: the splits go from rank to rank through the registered blocks, and the plan the
// kernels agree on decides what moves. The one wait is for an output the op allocates itself.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <utility>
#include <vector>

#include "backend/common/env_switch.hpp"
#include "backend/common/errors.hpp"
#include "backend/common/phases.hpp"
#include "backend/kernels/all_to_all_v.cuh"
#include "backend/ops/cuda/cuda_outputs.hpp"
#include "backend/ops/all_to_all_v.hpp"
#include "backend/process_group/config.hpp"
#include "backend/process_group/process_group_ep.hpp"
#include "backend/transport/cuda/comm_pool.hpp"
#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/cuda/cuda_transport.hpp"
#include "backend/transport/cuda/peer_buffers.hpp"

namespace ep {

using at::Tensor;
using kernels::AllToAllVLayout;

namespace {

// Two staging slots per (source, lane): AllToAllVLayout::kDefaultSlotBytes each, less where the
// group's CUDA buffer size is less; a slot set in the options as given. 4 KiB multiples.
uint64_t chunk_bytes_for(const Config& config, int size, int lanes) {
  constexpr uint64_t kAlign = 4096;
  const uint64_t chunk = config.all_to_all_slot_bytes > 0
                             ? config.all_to_all_slot_bytes
                             : std::min<uint64_t>(config.cuda_buffer_bytes / (uint64_t(size) * lanes * AllToAllVLayout::kSlots),
                                                  AllToAllVLayout::kDefaultSlotBytes);
  return std::max<uint64_t>(chunk / kAlign, 1) * kAlign;
}

// The SMs this rank may fill: the SM budget where one is set, else the SMs its context has. Under
// MPS the device attribute already counts only the client's share (on the H200 at
// CUDA_MPS_ACTIVE_THREAD_PERCENTAGE 50 / 25 / 12 it reads 66 / 32 / 14 of 132), so the share is not
// applied again.
int sm_share(const Config& config, int device) {
  int sms = 0;
  EP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return config.num_sms > 0 ? std::min(config.num_sms, sms) : sms;
}

// What every rank of the group uses, the smallest over the ranks of each rank's options: the
// layout's lanes and slot (the kernels of two ranks must cut a message alike), and the eager
// bound (a message's sender and receiver must both call it eager; rounded up to 16 bytes, so
// eager regions stay aligned for vector copies; 0: off). One exchange at set-up.
struct AgreedSettings {
  AllToAllVLayout layout;
  uint64_t eager_bytes;
};
AgreedSettings agreed_settings(Rendezvous& rdv, const Config& config, const std::string& tag) {
  const int size = rdv.size();
  AgreedSettings mine{};
  mine.layout.lanes = config.all_to_all_lanes > 0 ? std::min(config.all_to_all_lanes, AllToAllVLayout::kMaxLanes)
                                                  : AllToAllVLayout::lanes_for(size);
  mine.layout.chunk_bytes = chunk_bytes_for(config, size, mine.layout.lanes);
  mine.eager_bytes = (uint64_t(config.all_to_all_eager_bytes) + 15) / 16 * 16;
  std::vector<uint8_t> bytes(sizeof(mine));
  std::memcpy(bytes.data(), &mine, sizeof(mine));
  AgreedSettings agreed = mine;
  for (const std::vector<uint8_t>& theirs : rdv.all_gather(tag + "/layout", bytes)) {
    AgreedSettings t{};
    std::memcpy(&t, theirs.data(), std::min(theirs.size(), sizeof(t)));
    agreed.layout.lanes = std::min(agreed.layout.lanes, t.layout.lanes);
    agreed.layout.chunk_bytes = std::min(agreed.layout.chunk_bytes, t.layout.chunk_bytes);
    agreed.eager_bytes = std::min(agreed.eager_bytes, t.eager_bytes);
  }
  return agreed;
}

}  // namespace

class AllToAllVState {
 public:
  AllToAllVState(Rendezvous& rdv, const Config& config, int device, const std::string& tag)
      : rank_(rdv.rank()), size_(rdv.size()) {
    const AgreedSettings agreed = agreed_settings(rdv, config, tag);
    layout_ = agreed.layout;
    eager_bytes_ = agreed.eager_bytes;
    one_launch_ = config.all_to_all_one_launch;
    buffers_ = std::make_unique<PeerBuffers>(rdv, device, layout_.total_bytes(size_, eager_bytes_), tag + "/buffers");
    // The flags at GPU scope where every peer's block lies on this GPU, as the direct kernel's
    // (TORCH_EP_DEVICE_GPU_SCOPE=0: system scope): with the early launch, 8 ranks' small calls took
    // half the time (all_to_all_v 23.7-24.2 us against 47.3-48.1, H100). The staged slots' flags
    // too, since the plan's trigger took the early launch's loss away (H100, 2 ranks, 77c62be +
    // the what-if, two runs): 64 MiB replayed 138.0-142.0 us against 143.4-143.7, all_to_all_v
    // 139.3-141.4 against 144.5-144.8; 8 ranks 4-64 KiB all_to_all_v 26.9-27.6 against 31.6-31.8.
    gpu_scope_ = env_switch_on_by_default("TORCH_EP_DEVICE_GPU_SCOPE") && buffers_->all_on_this_gpu();
    // The one copy's pieces taken in turn from a counter (TORCH_EP_POOL_PIECES=0: a fixed piece a
    // block): 2 ranks, H100, 17e969e, the pool at 64 MiB 117.4 us against 129.3 (16 MiB 43.9
    // against 48.0), where one wave of fixed pieces waits for its slowest block.
    pool_pieces_ = env_switch_on_by_default("TORCH_EP_POOL_PIECES");
    // Issue 16's candidates for the move's last 10 % (opt-in until measured): pieces larger than one
    // pass of a block's loads (tools/pool_copy_probe.cu: fixed pieces of 128 KiB reached 98-99 % of
    // the copy where 64 KiB in turn ran at 89-90 %), and the next piece's number taken during the copy.
    pool_ticket_ahead_ = env_switch("TORCH_EP_POOL_TICKET_AHEAD");
    // The one copy's message to itself during the plan's meeting (all_to_all_single; opt-in: a
    // refused call may have written the rank's own rows, which the default never does).
    pool_self_first_ = pool_pieces_ && env_switch("TORCH_EP_POOL_SELF_FIRST");
    pool_piece_bytes_ =
        config.all_to_all_pool_piece_bytes > 0 ? config.all_to_all_pool_piece_bytes : kernels::kPoolMinPiece;
    TORCH_CHECK_VALUE(pool_piece_bytes_ % kernels::kPoolMinPiece == 0, "Config.all_to_all_pool_piece_bytes=",
                      config.all_to_all_pool_piece_bytes, ": expected 0 (automatic) or a multiple of 65536");
    CudaTransportConfig cc;
    cc.device = device;
    cc.buffer_bytes = 0;  // flags only: the watchdog, the kernel error word and the failure listener
    cc.num_sms = config.num_sms;
    cc.timeout = config.timeout;
    transport_ = std::make_shared<CudaTransport>(rdv, cc, tag + "/transport");
    // Record flags 0 (slot free), full 0, empty 1 (every slot of every destination free).
    std::vector<uint32_t> flags(AllToAllVLayout::kFlagsBytes / 4, 0);
    for (int d = 0; d < kernels::kMaxRanksPerNode; ++d)
      for (int lane = 0; lane < AllToAllVLayout::kMaxLanes; ++lane)
        for (int s = 0; s < AllToAllVLayout::kSlots; ++s)
          flags[(AllToAllVLayout::empty_flag(d, lane, s) - AllToAllVLayout::kFlagsOffset) / 4] = 1;
    EP_CUDA_CHECK(cudaMemcpy(buffers_->block(rank_) + AllToAllVLayout::kFlagsOffset, flags.data(),
                             flags.size() * sizeof(uint32_t), cudaMemcpyHostToDevice));
    EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&report_host_), kernels::kReportWords * sizeof(int64_t),
                                cudaHostAllocMapped));
    std::fill(report_host_, report_host_ + kernels::kReportWords, 0);
    EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&report_device_), report_host_, 0));
    // The one-copy move: one piece of the call per block; two blocks of 512 threads per SM of this
    // rank's share (its launch bounds), the plan's block 0 of the one launch included.
    pool_blocks_ = config.all_to_all_pool_blocks > 0 ? config.all_to_all_pool_blocks
                                                     : std::max(1, 2 * sm_share(config, device) - 1);
    pool_grid_automatic_ = config.all_to_all_pool_blocks <= 0;
    // The flags' cudaMemcpy from pageable memory may return before the device holds them; the
    // peers write them as soon as the barrier passes.
    EP_CUDA_CHECK(cudaDeviceSynchronize());
    rdv.barrier(tag + "/ready");  // no peer writes our flags before they are initialised
  }

  ~AllToAllVState() {
    transport_.reset();  // first: its destructor lets calls in flight finish (or time out)
    if (report_host_) cudaFreeHost(report_host_);
  }

  // The group's abort(): the transport fails, which sets the abort word the kernels poll (as any
  // failure of it does: a timeout then releases the calls queued behind the one that timed out).
  void abort(const std::string& why) { transport_->abort(why); }

  CudaTransport& transport() { return *transport_; }
  int device() const { return buffers_->device(); }

  using Report = std::array<int64_t, kernels::kReportWords>;

  // The first problem the kernels reported since the host last looked (report[0] == 0: none),
  // cleared: the kernel reports again once the word is clear. One taker at a time (the calls'
  // threads, and Works asked from any thread): each report is taken once.
  Report take_report() {
    std::lock_guard<std::mutex> lock(report_mutex_);
    if (held_[0] != kernels::kReportNone) return std::exchange(held_, Report{});
    return take_report_locked();
  }

  // A report that a call took but could not raise, as it failed otherwise first (its output's
  // allocation): the next take_report() returns it, so that it still raises.
  void hold_for_next_call(const Report& w) {
    std::lock_guard<std::mutex> lock(report_mutex_);
    if (held_[0] == kernels::kReportNone) held_ = w;
  }

  // Raises `w` (report[0] != 0). `earlier`: an earlier call's, which did not wait for it.
  [[noreturn]] static void raise(const Report& w, int rank, const char* op, bool earlier) {
    if (w[kernels::kReportDropped] == 0) raise_one(w, rank, op, earlier);
    try {
      raise_one(w, rank, op, earlier);
    } catch (c10::Error& e) {
      e.add_context("the device found a problem in " + std::to_string(w[kernels::kReportDropped]) +
                    " later call(s) too (the last: call " + std::to_string(w[kernels::kReportDroppedCallId]) +
                    " of this group), reported while this one waited: their outputs were not written either");
      throw;
    }
  }

  [[noreturn]] static void raise_one(const Report& w, int rank, const char* op, bool earlier) {
    const std::string made_by = w[kernels::kReportOp] == kernels::kOpAllToAllSingle
                                    ? "all_to_all_single"
                                    : "all_to_all_v into a given output";
    if (earlier) op = w[kernels::kReportOp] == kernels::kOpAllToAllSingle ? "all_to_all_single" : "all_to_all_v";
    const std::string where = std::string(op) + ": rank " + std::to_string(rank) + ": ";
    const std::string when =
        earlier ? " (found by the device during an earlier " + made_by + ", which does not wait for it)" : "";
    switch (w[0]) {
      case kernels::kReportMismatch:
        TORCH_CHECK_VALUE(false, where, "split sizes disagree: rank ", w[1], " expects ", w[3], " bytes from rank ",
                          w[2], ", which sends it ", w[4], "; no data moved on any rank", when,
                          ". Every rank's output_split_sizes[s] must equal what rank s's input_split_sizes send it");
      case kernels::kReportOverflow:
        TORCH_CHECK(false, where, "output has room for ", w[1], " rows (its capacity, dim 0) but ", w[2],
                    " rows arrived; nothing was written to output", when, ". Give an output of at least ", w[2],
                    " rows, or none (output=None allocates it)");
      case kernels::kReportBadSplits:
        if (w[1] != rank)
          TORCH_CHECK_VALUE(false, where, "rank ", w[1], " passed invalid input_splits (its own error says how); no "
                            "data moved on any rank", when);
        if (w[2] != AllToAllVLayout::kBadSum)
          TORCH_CHECK_VALUE(false, where, "input_splits[", w[2] - 1, "] is ", w[5], ", expected a count >= 0; no "
                            "data moved", when);
        TORCH_CHECK_VALUE(false, where, "input_splits sum to ", w[3], " but input has ", w[4], " rows (dim 0); no "
                          "data moved", when);
      case kernels::kReportRowBytes:
        TORCH_CHECK_VALUE(false, where, "rank ", w[1], "'s rows hold ", w[2], " bytes but this rank's hold ", w[3],
                          ": dtype and trailing shape must match on every rank; no data moved", when);
      default:
        TORCH_CHECK(false, where, "the device reported error code ", w[0], when);
    }
  }

  // What raise(w, ...) would raise, as a message.
  static std::string message(const Report& w, int rank, const char* op, bool earlier) {
    try {
      raise(w, rank, op, earlier);
    } catch (const c10::Error& e) {
      return e.what_without_backtrace();
    }
  }

  // Raises `first` (report[0] != 0) with `second`'s message added where there is one, so that
  // neither is lost. Each is an earlier call's unless made by `call_id`.
  [[noreturn]] static void raise_both(const Report& first, const Report& second, int rank, const char* op,
                                      int64_t call_id) {
    const bool first_earlier = first[kernels::kReportCallId] != call_id;
    if (second[0] == kernels::kReportNone) raise(first, rank, op, first_earlier);
    const std::string also = message(second, rank, op, second[kernels::kReportCallId] != call_id);
    try {
      raise(first, rank, op, first_earlier);
    } catch (c10::Error& e) {
      e.add_context("the device also reported: " + also);
      throw;
    }
  }

  // The message of the problem `call_id` reported, taken (""), so that a Work can raise its own
  // call's problem once; another call's stays for the next call to raise.
  std::string take_report_of(int64_t call_id, int rank) {
    Report w{};
    {
      std::lock_guard<std::mutex> lock(report_mutex_);
      volatile int64_t* report = report_host_;
      if (report[0] == kernels::kReportNone || report[kernels::kReportCallId] != call_id) return "";
      w = take_report_locked();
    }
    return message(w, rank, "all_to_all_single", /*earlier=*/false);
  }

  // Calls of this group run one after another whatever stream they are queued on (all_to_all_v
  // and all_to_all_single without async_op on the caller's, all_to_all_single with it on the
  // group's comm stream): every rank writes its records in call order, and two calls of one rank
  // never share the blocks at once.
  CallOrder& order() { return order_; }

  // [6 kMaxRanksPerNode]: output_splits, output_offsets, plan; then the pool plan.
  int64_t* scratch() {
    if (!scratch_.defined())
      scratch_ = at::zeros({6 * int64_t(kernels::kMaxRanksPerNode) + kernels::PoolPlan::words(kernels::kMaxRanksPerNode)},
                           at::TensorOptions().dtype(at::kLong).device(at::kCUDA, device()));
    return scratch_.data_ptr<int64_t>();
  }
  int64_t* pool_plan() { return scratch() + 6 * kernels::kMaxRanksPerNode; }
  // The one-copy move's grid for a call that sends `sent` bytes: a piece of at least 64 KiB per
  // block, so that small calls launch fewer blocks. The automatic grid also grows with large calls,
  // to pieces of at most 128 KiB: several waves of small pieces keep the copy at the copy engines'
  // rate where one wave of large ones fell short (tools/pool_copy_probe.cu: 100 % against 89 % at
  // 64 MiB; a2a_sweep at 2 ranks, H100, 0805d53: 71 % of the roofline with 528 blocks against 63 %
  // with 131). Ranks may launch different grids: none waits on a peer's count.
  int pool_grid(uint64_t sent) const {
    // Pieces taken in turn: the blocks that fit at once (a block more would only take none).
    const uint64_t grid = pool_grid_automatic_ && !pool_pieces_
                              ? std::min<uint64_t>(std::max<uint64_t>(pool_blocks_, sent / (128 << 10)), kMaxPoolGrid)
                              : uint64_t(pool_blocks_);
    const uint64_t piece = pool_pieces_ ? pool_piece_bytes_ : kernels::kPoolMinPiece;
    return int(std::min<uint64_t>(grid, std::max<uint64_t>(1, sent / piece)));
  }
  bool one_launch() const { return one_launch_; }
  uint64_t eager_bytes() const { return eager_bytes_; }
  std::shared_ptr<CudaTransport> shared_transport() const { return transport_; }

  void check_reports(int rank, const char* op) {
    const Report w = take_report();
    if (w[0] != kernels::kReportNone) raise(w, rank, op, /*earlier=*/true);
  }

  void fill(kernels::AllToAllVParams& p) {
    p.rank = rank_;
    p.num_ranks = size_;
    for (int r = 0; r < size_; ++r) p.blocks[r] = buffers_->block(r);
    p.layout = layout_;
    p.timeout_ns = uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(transport_->timeout()).count());
    p.error = transport_->kernel_error();
    p.report = report_device_;
    p.abort = transport_->kernel_abort();
    p.call_id = ++calls_;
    p.out_arena = -1;  // no one copy unless the call says otherwise
    p.pool_plan = nullptr;
    p.early_launch = transport_->early_launch();
    p.gpu_scope = gpu_scope_;
    p.pool_pieces = pool_pieces_;
    p.pool_ticket_ahead = pool_ticket_ahead_;
    p.pool_piece_bytes = pool_piece_bytes_;
    p.pool_self_first = false;  // all_to_all_single's call decides
  }
  bool pool_self_first() const { return pool_self_first_; }

 private:
  Report take_report_locked() {
    Report w{};
    volatile int64_t* report = report_host_;
    if (report[0] == kernels::kReportNone) return w;
    for (int i = 0; i < kernels::kReportWords; ++i) w[i] = report[i];
    // A plain store (no device atomics on pinned memory): a plan that counts itself between the
    // copy above and this store goes uncounted. The count needs no clearing here: the next fresh
    // report zeroes it (all_to_all_v.cu's plan).
    report[0] = kernels::kReportNone;
    return w;
  }

  int rank_, size_;
  AllToAllVLayout layout_{};
  std::unique_ptr<PeerBuffers> buffers_;
  std::shared_ptr<CudaTransport> transport_;
  int64_t* report_host_ = nullptr;    // pinned, mapped: kReportWords
  int64_t* report_device_ = nullptr;
  std::mutex report_mutex_;           // take_report's and take_report_of's read-and-clear
  Report held_{};                     // hold_for_next_call's
  int64_t calls_ = 0;                 // calls so far: each one's call_id
  Tensor scratch_;                    // all_to_all_single's plan and counts (calls run in turn: order_)
  static constexpr uint64_t kMaxPoolGrid = 4096;  // 512 MiB calls in 128 KiB pieces; larger ones take larger pieces
  int pool_blocks_ = 0;               // grid of the one-copy move (Options.all_to_all_pool_blocks, or two per SM)
  bool pool_grid_automatic_ = true;   // no grid set in the options: it grows with the call (pool_grid)
  bool one_launch_ = false;           // plan and move in one launch
  bool gpu_scope_ = false;            // the kernels' flags at GPU scope (AllToAllVParams::gpu_scope)
  bool pool_pieces_ = false;          // the one copy's pieces taken in turn (AllToAllVParams::pool_pieces)
  bool pool_ticket_ahead_ = false;    // ... the next one taken during the copy (AllToAllVParams::pool_ticket_ahead)
  bool pool_self_first_ = false;      // ... this rank's own message first (AllToAllVParams::pool_self_first)
  uint64_t pool_piece_bytes_ = kernels::kPoolMinPiece;  // ... their size (Options.all_to_all_pool_piece_bytes)
  uint64_t eager_bytes_ = 0;          // all_to_all_single's eager messages: at most this (0: off)
  CallOrder order_;
};

std::shared_ptr<AllToAllVState> create_all_to_all_v_state(Rendezvous& rdv, const Config& config, int device,
                                                          const std::string& tag) {
  return std::make_shared<AllToAllVState>(rdv, config, device, tag);
}

CudaTransport& transport_of(AllToAllVState& state) { return state.transport(); }
void abort_all_to_all_v(AllToAllVState& state, const std::string& why) { state.abort(why); }
int device_of(const AllToAllVState& state) { return state.device(); }

void check_all_to_all_v_reports(AllToAllVState& state, int rank, const char* op) { state.check_reports(rank, op); }

std::shared_ptr<CudaTransport> shared_transport_of(AllToAllVState& state) { return state.shared_transport(); }

std::string take_all_to_all_single_report(AllToAllVState& state, int64_t call_id, int rank) {
  return state.take_report_of(call_id, rank);
}

// TORCH_EP_POOL_SELF_FIRST's smallest own message: 16 pieces of 64 KiB, several microseconds of
// copy, about a plan's meeting.
constexpr size_t kSelfFirstMinBytes = 1 << 20;

AllToAllSingleCall all_to_all_single_cuda(AllToAllVState& state, int rank, const char* input, char* output,
                                          const std::vector<size_t>& send_bytes,
                                          const std::vector<size_t>& recv_bytes, cudaStream_t stream,
                                          const CommPoolCall* pool, Phases& phase) {
  const char* op = "all_to_all_single";
  const int R = int(send_bytes.size());
  // An earlier call's problem raises once this call is queued (see all_to_all_v_cuda).
  const AllToAllVState::Report raise_later = state.take_report();
  kernels::AllToAllVParams p{};
  std::shared_ptr<StreamMark> end;
  {  // a CommError (a failed transport) raises at the caller, through the group's fault log
    state.transport().check_healthy(op);
    state.fill(p);
    p.op = kernels::kOpAllToAllSingle;
    p.input_splits = nullptr;  // bytes, known here: in the parameters, no copy to the device
    int64_t rows = 0, capacity = 0;
    for (int r = 0; r < R; ++r) {
      p.host_splits[r] = int64_t(send_bytes[r]);
      p.expected_splits[r] = int64_t(recv_bytes[r]);
      rows += p.host_splits[r];
      capacity += p.expected_splits[r];
    }
    p.has_expected = 1;
    p.num_rows = rows;
    p.capacity = capacity;
    p.row_bytes = 1;
    p.input = input;
    p.output = output;
    int64_t* scratch = state.scratch();
    p.output_splits = scratch;
    p.output_offsets = scratch + kernels::kMaxRanksPerNode;
    p.plan = scratch + 2 * kernels::kMaxRanksPerNode;
    if (pool) {
      p.out_arena = pool->output_offset;
      for (int r = 0; r < R; ++r) p.pool[r] = pool->arenas[r];
      p.pool_plan = state.pool_plan();
    }
    uint64_t sent = 0;
    for (size_t b : send_bytes) sent += b;
    const int blocks = state.pool_grid(sent);  // backend/kernels/all_to_all_pool.cuh: a piece each
    // Eager: messages of 1..eager_bytes ride with the records (both ends call a message eager by its
    // size alone). Where every message this rank sends and expects is that small, the plan kernel
    // moves all of them and nothing is left to move: that launch alone. Ranks may decide this
    // differently (a rank's neighbours can send large messages elsewhere): a rank's move waits only
    // on the peers it stages with, and both ends of a message agree whether it is staged. It
    // publishes no arena (out_arena -1): no rank takes the one copy, whose "done" flags a rank
    // without a move would never take. Split sizes that disagree make nothing move anywhere.
    p.eager_bytes = state.eager_bytes();
    bool eager_only = p.eager_bytes > 0;
    for (int r = 0; r < R; ++r)
      eager_only = eager_only && send_bytes[r] <= p.eager_bytes && recv_bytes[r] <= p.eager_bytes;
    if (eager_only) p.out_arena = -1;
    // This rank's message to itself before the plan: where the host knows its place (the output in
    // the arena, the bytes both ways alike), the plan leaves it to the move (not eager), and it is
    // large enough to cover the plan's meeting (the move's blocks stay resident while they wait).
    const size_t own = send_bytes[rank];
    p.pool_self_first = pool && state.pool_self_first() && p.out_arena >= 0 && own == recv_bytes[rank] &&
                        own >= kSelfFirstMinBytes && !(p.eager_bytes > 0 && own <= p.eager_bytes);
    phase.next("ep::all_to_all_single/launch");
    state.order().begin(stream);
    if (eager_only) {
      EP_CUDA_CHECK(kernels::launch_all_to_all_v_plan(p, stream));
    } else if (state.one_launch()) {
      EP_CUDA_CHECK(kernels::launch_all_to_all_v_call(p, pool ? blocks : 0, stream));
    } else {
      EP_CUDA_CHECK(kernels::launch_all_to_all_v_plan(p, stream));
      if (pool) EP_CUDA_CHECK(kernels::launch_all_to_all_v_move_any(p, blocks, stream));
      else EP_CUDA_CHECK(kernels::launch_all_to_all_v_move(p, stream));
    }
    phase.next("ep::all_to_all_single/track");
    end = state.transport().track(op, stream);
    state.order().end(stream, end);
  }
  if (raise_later[0] != kernels::kReportNone) AllToAllVState::raise(raise_later, rank, op, /*earlier=*/true);
  return {p.call_id, std::move(end)};
}

bool last_call_one_copy(AllToAllVState& state) {
  int64_t direct = 0;
  c10::cuda::CUDAGuard guard(c10::DeviceIndex(state.device()));
  EP_CUDA_CHECK(cudaDeviceSynchronize());
  EP_CUDA_CHECK(cudaMemcpy(&direct, state.pool_plan() + kernels::PoolPlan::kDirect, sizeof(direct),
                           cudaMemcpyDeviceToHost));
  return direct != 0;
}

namespace {

// all_to_all_v with output=None when the host fails between the plan and the move (the output's
// allocation runs out of memory): the plan is queued on every rank, and every peer's staged move
// waits on this rank's. A drain (output null, see staged_move) still sends this rank's rows and
// takes what the peers send, dropping it, so that the peers' calls complete and only this one
// raises. Best effort: should it fail too, the first error raises.
void queue_drain(AllToAllVState& state, kernels::AllToAllVParams p, cudaStream_t stream, const char* op) noexcept {
  p.output = nullptr;
  try {
    EP_CUDA_CHECK(kernels::launch_all_to_all_v_move(p, stream));
    state.order().end(stream, state.transport().track(op, stream));
  } catch (...) {
  }
}

}  // namespace

std::pair<Tensor, Tensor> all_to_all_v_cuda(ProcessGroupEP& group, AllToAllVState& state, const Tensor& input,
                                            const Tensor& input_splits, const std::optional<Tensor>& given,
                                            Tensor* allocated, bool allow_extra_rows) {
  const char* op = "all_to_all_v";
  Phases phase;  // the host's share of a call, for tools/a2a_profile.py
  phase.next("ep::all_to_all_v/setup");
  const int rank = group.getRank(), R = group.getSize();
  c10::cuda::CUDAGuard guard(input.device());
  // An earlier call's problem raises once this call is queued: raising before would leave the
  // peers' kernels waiting for this rank's record, and the group out of step.
  const AllToAllVState::Report raise_later = state.take_report();
  AllToAllVState::Report found_after{};  // output=None: what the plan's wait found (raised too)
  try {
    state.transport().check_healthy(op);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
    if (!given) {
      TORCH_CHECK(!stream_capturing(stream), op, ": output=None waits for the sizes to allocate the "
                  "output, which a CUDA graph capture cannot do; give an output (its worst-case rows)");
    }
    phase.next("ep::all_to_all_v/outputs");
    const Tensor in = input.contiguous();
    const Tensor splits = input_splits.contiguous();
    const Tensor output_splits = empty_output({R}, splits.options());
    const Tensor output_offsets = empty_output({R}, splits.options());
    const Tensor plan = empty_output({4 * R}, splits.options());

    phase.next("ep::all_to_all_v/params");
    kernels::AllToAllVParams p{};
    state.fill(p);
    p.input_splits = splits.data_ptr<int64_t>();
    p.num_rows = in.size(0);
    p.capacity = given ? given->size(0) : -1;
    p.allow_extra_rows = allow_extra_rows ? 1 : 0;
    int64_t row_bytes = in.element_size();
    for (int64_t d = 1; d < in.dim(); ++d) row_bytes *= in.size(d);
    p.row_bytes = row_bytes;
    p.input = static_cast<const char*>(in.data_ptr());
    p.output_splits = output_splits.data_ptr<int64_t>();
    p.output_offsets = output_offsets.data_ptr<int64_t>();
    p.plan = plan.data_ptr<int64_t>();
    state.order().begin(stream);

    Tensor output, staging;
    if (given) {
      output = *given;
      // A strided output is filled through a contiguous copy of itself: rows past the received
      // ones go back unchanged, and nothing waits for the sizes.
      staging = output.is_contiguous() ? output : output.contiguous();
      p.output = static_cast<char*>(staging.data_ptr());
    }
    // A group with a comm pool: where this rank's output lies in its arena, for the plan to choose
    // one copy when every receiving rank's does, as all_to_all_single's (all_to_all_pool.cuh). An
    // output given contiguous in the arena publishes its offset (its capacity's bytes; an empty one
    // takes either move); a strided output's staging and output=None's (allocated after the plan)
    // lie outside it. The plan's offsets stop at the receiver's capacity: an overflowing receiver
    // gets nothing from anyone, one copy or staged.
    int pool_blocks = 0;
    if (std::shared_ptr<CommPool> pool = group.comm_pool()) {
      for (int r = 0; r < R; ++r) p.pool[r] = pool->arena(r);
      p.pool_plan = state.pool_plan();
      if (given && staging.is_same(output)) p.out_arena = pool->output_offset(p.output, size_t(p.capacity * row_bytes));
      pool_blocks = state.pool_grid(uint64_t(p.num_rows) * uint64_t(row_bytes));
    }
    // An output given: plan and move in one launch. Else the plan alone first: the host waits for
    // its sizes to allocate the output.
    const bool one_launch = given && state.one_launch();
    phase.next("ep::all_to_all_v/launch");
    if (one_launch) EP_CUDA_CHECK(kernels::launch_all_to_all_v_call(p, pool_blocks, stream));
    else EP_CUDA_CHECK(kernels::launch_all_to_all_v_plan(p, stream));
    if (!given) try {
      phase.next("ep::all_to_all_v/wait_for_sizes");
      const Tensor sizes = at::empty({R}, splits.options().device(at::kCPU).pinned_memory(true));
      EP_CUDA_CHECK(cudaMemcpyAsync(sizes.data_ptr(), p.output_splits, R * sizeof(int64_t), cudaMemcpyDeviceToHost,
                                    stream));
      EP_CUDA_CHECK(cudaStreamSynchronize(stream));
      const int64_t* n = sizes.data_ptr<int64_t>();
      std::vector<int64_t> shape = in.sizes().vec();
      shape[0] = std::accumulate(n, n + R, int64_t(0));
      output = staging = *allocated = empty_output(shape, in.options());
      // A problem found now (this call's, or an earlier call's whose plan ran meanwhile) raises
      // once the move is queued too: every rank queues it, and after a problem of this call
      // (found alike by every rank) it moves nothing. With one taken before, both raise. Taken
      // after the allocation: should that fail, the report stays for the next call.
      found_after = state.take_report();
    } catch (...) {
      queue_drain(state, p, stream, op);
      state.hold_for_next_call(raise_later);  // an earlier call's problem still raises, at the next call
      throw;
    }
    p.output = static_cast<char*>(staging.data_ptr());
    phase.next("ep::all_to_all_v/move");
    if (!one_launch) {
      if (p.pool_plan) EP_CUDA_CHECK(kernels::launch_all_to_all_v_move_any(p, pool_blocks, stream));
      else EP_CUDA_CHECK(kernels::launch_all_to_all_v_move(p, stream));
    }
    if (!staging.is_same(output)) output.copy_(staging);
    phase.next("ep::all_to_all_v/track");
    state.order().end(stream, state.transport().track(op, stream));
    if (raise_later[0] != kernels::kReportNone)
      AllToAllVState::raise_both(raise_later, found_after, rank, op, p.call_id);
    if (found_after[0] != kernels::kReportNone)
      AllToAllVState::raise(found_after, rank, op, /*earlier=*/found_after[kernels::kReportCallId] != p.call_id);
    return {output_splits, output_offsets};
  } catch (const CommError& e) {  // timeouts included
    group.raise_failure(e.what());
  }
}

}  // namespace ep
