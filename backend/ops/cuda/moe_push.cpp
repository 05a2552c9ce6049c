#include "backend/ops/cuda/moe_push.hpp"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "backend/common/errors.hpp"
#include "backend/kernels/moe_records.cuh"
#include "backend/ops/cuda/cuda_outputs.hpp"
#include "backend/process_group/cuda/moe_pool.hpp"
#include "backend/process_group/process_group_ep.hpp"
#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/cuda/cuda_transport.hpp"

namespace ep::moe {
namespace {

// Routes this thread's allocations on `device` into the MoE pool for its lifetime, as
// torch.cuda.use_mem_pool does (begin, end, then release the pool's use count begin took).
class RouteToPool {
 public:
  RouteToPool(MoePool& pool, c10::DeviceIndex device)
      : lock_(pool.route_mutex), device_(device), id_(pool.mem_pool->id()) {
    c10::cuda::CUDACachingAllocator::beginAllocateToPool(
        device_, id_, [thread = std::this_thread::get_id()](cudaStream_t) { return std::this_thread::get_id() == thread; });
  }
  ~RouteToPool() {
    c10::cuda::CUDACachingAllocator::endAllocateToPool(device_, id_);
    c10::cuda::CUDACachingAllocator::releasePool(device_, id_);
  }
  RouteToPool(const RouteToPool&) = delete;
  RouteToPool& operator=(const RouteToPool&) = delete;

 private:
  std::lock_guard<std::mutex> lock_;
  c10::DeviceIndex device_;
  c10::MempoolId_t id_;
};

std::string mib(size_t bytes) { return std::to_string((bytes + (1 << 20) - 1) >> 20) + " MiB"; }

// What a receiver sends in the second exchange.
struct TargetRecord {
  int32_t status;  // 0, or this rank could not allocate its outputs (`detail`)
  int32_t pad;
  PushTarget target;
  char detail[256];
};

}  // namespace

bool push_this_call(const ProcessGroupEP& group, bool capturing) {
  return group.config().moe_push && !capturing;
}

bool allocate_from_pool(MoePool& pool, int rank, const DispatchArgs& a, int64_t capacity, DispatchOutputs& o,
                        PushTarget& target, std::string* why) {
  const bool cached = a.handle_meta.has_value();
  const int64_t H = a.x.size(1), K = cached ? 0 : a.topk_idx->size(1);
  const at::TensorOptions floats = a.x.options().dtype(at::kFloat);
  const int64_t bytes = capacity * (H * int64_t(a.x.element_size()) + (a.x_scales ? a.x_scales->size(1) * 4 : 0) +
                                    (cached ? 0 : K * 8) + (a.topk_weights ? K * 4 : 0));
  // Kept under a record's 255 characters of detail.
  const std::string where = "rank " + std::to_string(rank) + ": the MoE pool (TORCH_EP_MOE_POOL_BYTES";
  try {
    RouteToPool route(pool, a.x.device().index());
    o.recv_x = empty_output({capacity, H}, a.x.options());
    o.recv_x_scales = a.x_scales ? empty_output({capacity, a.x_scales->size(1)}, a.x_scales->options())
                                 : placeholder_output(a.placeholders, floats);
    o.recv_topk_idx = cached ? placeholder_output(a.placeholders, a.x.options().dtype(at::kLong))
                             : empty_output({capacity, K}, a.x.options().dtype(at::kLong));
    o.recv_topk_weights = a.topk_weights ? empty_output({capacity, K}, floats) : placeholder_output(a.placeholders, floats);
  } catch (const c10::OutOfMemoryError&) {
    o = DispatchOutputs{};
    *why = where + ": " + mib(pool.arena->bytes()) + " a rank, " + mib(pool.arena->used()) +
           " held) cannot hold this dispatch's outputs (" + std::to_string(capacity) + " rows, " + mib(size_t(bytes)) +
           "); raise TORCH_EP_MOE_POOL_BYTES or keep fewer dispatch outputs alive";
    return false;
  } catch (const std::exception& e) {  // any other failure is a refusal too: every rank raises, none hangs
    o = DispatchOutputs{};
    *why = where + ") could not allocate this dispatch's outputs (" + std::to_string(capacity) + " rows, " +
           mib(size_t(bytes)) + "): " + e.what();
    return false;
  }
  const at::Tensor* outputs[4] = {&o.recv_x, &o.recv_x_scales, &o.recv_topk_idx, &o.recv_topk_weights};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *outputs[i];
    const bool holds = t.defined() && t.numel();  // not a placeholder
    target.offset[i] = holds ? pool.arena->offset_of(t.data_ptr(), t.nbytes()) : -1;
    if (holds && target.offset[i] < 0) {
      o = DispatchOutputs{};
      *why = where + ") did not get this dispatch's outputs: this thread's allocations go to another pool "
             "(torch.cuda.use_mem_pool or a reduce-overhead torch.compile warm-up around a pushing dispatch?)";
      return false;
    }
  }
  target.capacity = capacity;
  return true;
}

std::vector<PushTarget> exchange_targets(CudaTransport& transport, const PushTarget& mine, const std::string& why,
                                         const char* op) {
  const int R = transport.size(), rank = transport.rank();
  TargetRecord record;
  std::memset(&record, 0, sizeof(record));
  record.target = mine;
  if (!why.empty()) {
    record.status = 1;
    std::strncpy(record.detail, why.c_str(), sizeof(record.detail) - 1);
  }
  std::vector<TargetRecord> records(static_cast<size_t>(R), record);
  std::vector<TargetRecord> theirs(records.size());
  transport.exchange(records.data(), theirs.data(), sizeof(TargetRecord), op);
  TORCH_CHECK_VALUE(why.empty(), op, " on ", why);  // `why` starts with "rank N: "
  std::vector<PushTarget> targets;
  for (int p = 0; p < R; ++p) {
    TORCH_CHECK_VALUE(theirs[p].status == 0, op, " on rank ", rank, ": rank ", p, " could not allocate its outputs (",
                      theirs[p].detail, "), so no rank goes on");
    targets.push_back(theirs[p].target);
  }
  return targets;
}

void set_targets(MoePool& pool, int num_ranks, const std::vector<PushTarget>& targets, kernels::DispatchTarget* dst) {
  for (int d = 0; d < num_ranks; ++d) {
    char* base = pool.arena->arena(d);
    TORCH_CHECK(base, "dispatch: rank ", d, "'s MoE arena is not mapped here (the group is shutting down?)");
    const PushTarget& t = targets[size_t(d)];
    auto at = [&](int i) { return t.offset[i] < 0 ? nullptr : base + t.offset[i]; };
    dst[d].recv_x = at(0);
    dst[d].recv_x_scales = reinterpret_cast<float*>(at(1));
    dst[d].recv_topk_idx = reinterpret_cast<int64_t*>(at(2));
    dst[d].recv_topk_weights = reinterpret_cast<float*>(at(3));
    dst[d].capacity = t.capacity;
  }
}

bool device_records_this_call(const ProcessGroupEP& group, bool push) {
  return push && group.config().moe_device_records;
}

namespace {

// A notify step's slots, report, bounds (the handshake's) and every rank's MoE arena as mapped here.
template <typename Arena>
void connect_notify(CudaTransport& transport, MoePool& pool, const kernels::Handshake& handshake,
                    kernels::MoeNotifyParams& n, Arena** arenas, const char* op) {
  for (int r = 0; r < transport.size(); ++r) {
    n.records[r] = transport.records(r);
    arenas[r] = pool.arena->arena(r);
    TORCH_CHECK(n.records[r] && arenas[r], op, ": rank ", r, "'s records or MoE arena are not mapped here (the "
                "group is shutting down?)");
  }
  n.report = transport.moe_report();
  n.timeout_ns = handshake.timeout_ns;
  n.error = handshake.error;
}

// The sizes of a dispatch whose host waits for them, as its first round's notify kernel wrote
// them (kernels::MoeSizesWord): this rank's handle counts. Raises where the verdict stops the call,
// on every rank alike (they evaluated the same records): this rank's own refusal (`overflow`, an
// earlier dispatch's), else the device's report; a record that never came fails the group.
HandleCounts wait_for_sizes(ProcessGroupEP& group, CudaTransport& transport, cudaStream_t stream, int64_t call_id,
                            int64_t seq, int64_t num_experts, const std::string& overflow) {
  using namespace kernels;
  const char* op = "dispatch";
  const int R = transport.size(), rank = transport.rank();
  const volatile int64_t* sizes = transport.moe_sizes_host();
  // The notify kernel's waits are bounded by the timeout, and it writes the ticket even then; the
  // host's bound is a backstop for a stream stuck before it.
  // Three timeouts: the last call's done wait, this notify's waits, and a margin.
  const auto deadline = std::chrono::steady_clock::now() + 3 * group.config().timeout;
  const int64_t* ticket = const_cast<const int64_t*>(sizes + kSizesTicket);
  // The transport and the stream are asked about once a millisecond: every few spins, the driver
  // calls cost a normal wait tens of microseconds (moe_profile, c286294).
  auto next_check = std::chrono::steady_clock::now() + std::chrono::milliseconds(1);
  for (uint64_t spins = 0; __atomic_load_n(ticket, __ATOMIC_ACQUIRE) != call_id; ++spins) {
    if (spins % 1024 != 1023) continue;
    std::this_thread::yield();
    const auto now = std::chrono::steady_clock::now();
    if (now < next_check) continue;
    next_check = now + std::chrono::milliseconds(1);
    transport.check_healthy(op);
    // A stream that failed never gets there. Relaxed: another thread may be capturing a graph.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    EP_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    const cudaError_t queried = cudaStreamQuery(stream);
    EP_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    if (queried != cudaSuccess && queried != cudaErrorNotReady) {
      (void)cudaGetLastError();
      const std::string why = std::string(op) + ": rank " + std::to_string(rank) + ": the stream failed while "
                              "waiting for this dispatch's sizes: " + cudaGetErrorString(queried);
      transport.abort(why);
      throw CommError(why);
    }
    if (now > deadline) {
      const std::string why = std::string(op) + ": rank " + std::to_string(rank) + ": the sizes of this dispatch (#" +
                              std::to_string(call_id) + ") did not come back from the device within three times the "
                              "group's timeout (is an earlier op on this stream stuck?)";
      transport.abort(why);  // its notify kernel may still publish a record later: no call goes on
      throw TimeoutError(why);
    }
  }
  const int64_t code = sizes[kSizesCode];
  if (code == kVerdictTimedOut) {
    transport.check_healthy(op);  // the kernel set the error word: this raises naming the peer
    throw TimeoutError(std::string(op) + ": rank " + std::to_string(rank) + ": rank " + std::to_string(sizes[kSizesPeer]) +
                       "'s record of this dispatch never came (the group's timeout)");
  }
  if (code != kVerdictOk) {  // nothing moves on any rank: every host raises now
    TORCH_CHECK_VALUE(overflow.empty(), overflow, "; no rank moved rows in this dispatch (#", call_id, ")");
    raise_device_report(transport, rank, seq, op, /*waited=*/true);
    TORCH_CHECK(false, op, " on rank ", rank, ": the device stopped this dispatch (#", call_id, ", verdict ", code,
                ") and left no report");
  }
  auto word = [&](int i) { return int64_t(sizes[i]); };
  HandleCounts c;
  c.call_id = call_id;
  for (int s = 0; s < R; ++s) c.recv.push_back(word(kSizesRecv + s));
  for (int j = 0; j < R; ++j) c.send.push_back(word(kSizesSent + rank * R + j));
  for (int64_t e = 0; e < num_experts / R; ++e) c.per_expert.push_back(word(kSizesPerExpert + int(e)));
  if (R <= kMaxMatrixRanks)
    for (int i = 0; i < R * R; ++i) c.sent.push_back(word(kSizesSent + i));
  return c;
}

}  // namespace

DispatchOutputs dispatch_with_device_records(ProcessGroupEP& group, CudaTransport& transport, MoePool& pool,
                                             const DispatchArgs& a, const at::Tensor& meta, bool given,
                                             cudaStream_t stream, int num_blocks, const kernels::Handshake& handshake,
                                             Phases& phase) {
  using namespace kernels;
  const char* op = "dispatch";
  const int R = transport.size(), rank = transport.rank();
  const bool cached = a.handle_meta.has_value();
  const bool waits = !cached && a.num_worst_tokens <= 0;  // for the sizes: two rounds
  const int64_t N = a.x.size(0), H = a.x.size(1), E = a.num_experts, K = cached ? 0 : a.topk_idx->size(1);
  // Every call, alike on every rank (moe_ops's check_experts bounds E / R the same before).
  TORCH_CHECK_VALUE(E / R <= kMaxRecordExperts, op, ": device records count up to ", kMaxRecordExperts,
                    " experts per rank, this call has ", E / R);
  const int64_t call_id = int64_t(group.next_dispatch_id());
  const int64_t seq = transport.next_moe_call();

  DispatchRecordsParams p{};
  MoeNotifyParams& n = p.notify;
  n.num_ranks = R;
  n.rank = rank;
  n.num_experts = E;
  n.meta = meta.data_ptr<int32_t>();
  n.num_tokens = N;
  n.check_expert_ids = !cached && a.topk_idx->numel() > 0;
  n.call_seq = seq;
  p.src = {static_cast<const char*>(a.x.numel() ? a.x.data_ptr() : nullptr),
           a.x_scales && a.x_scales->numel() ? a.x_scales->data_ptr<float>() : nullptr,
           cached || !a.topk_idx->numel() ? nullptr : a.topk_idx->data_ptr<int64_t>(),
           a.topk_weights && a.topk_weights->numel() ? a.topk_weights->data_ptr<float>() : nullptr,
           meta.data_ptr<int32_t>(), N};
  int64_t* record = n.record;
  record[kRecOp] = kMoeRecordDispatch;
  record[kRecCallId] = call_id;
  record[kRecHandleId] = cached ? a.handle_counts->call_id : 0;
  record[kRecNumExperts] = E;
  record[kRecHidden] = H;
  record[kRecDtype] = int64_t(a.x.scalar_type());
  record[kRecNumTopk] = K;
  record[kRecHasScales] = a.x_scales.has_value();
  record[kRecHasWeights] = a.topk_weights.has_value();
  record[kRecPush] = 1;
  record[kRecWaits] = waits;
  for (int s = 0; s < R; ++s) record[kRecExpect + s] = cached ? a.handle_counts->recv[size_t(s)] : -1;  // -1: none
  connect_notify(transport, pool, handshake, n, p.arenas, op);
  // An overflow an earlier dispatch left (pulling, or a graph replay) refuses this call on every
  // rank through the records, as reject_if_overflowed does through the host's.
  const std::string overflow = transport.take_dispatch_overflow();

  HandleCounts sized;  // the sizes of a dispatch that waits for them
  int64_t capacity = 0;
  if (waits) {
    // Round 1, without outputs (capacity -1): its notify kernel writes the sizes this host waits
    // for, then every rank allocates its outputs and the second round publishes them.
    record[kRecStatus] = overflow.empty() ? kRefusedNone : kRefusedOverflow;
    record[kRecCapacity] = -1;
    for (int i = 0; i < 4; ++i) record[kRecOffset + i] = -1;
    n.sizes = transport.moe_sizes();
    phase.next("ep::dispatch/first_round");
    EP_CUDA_CHECK(launch_moe_notify(n, stream));
    phase.next("ep::dispatch/wait_for_sizes");
    sized = wait_for_sizes(group, transport, stream, call_id, seq, E, overflow);  // raises where the verdict stops the call
    for (int64_t rows : sized.recv) capacity += rows;
    n.sizes = nullptr;
    n.check_expert_ids = false;  // round 1 checked them
  } else {
    capacity = known_capacity(a);
  }
  phase.next("ep::dispatch/outputs");
  DispatchOutputs o;
  PushTarget target{{-1, -1, -1, -1}, -1};
  std::string refusal;
  const bool allocated = allocate_from_pool(pool, rank, a, capacity, o, target, &refusal);
  record[kRecStatus] = !overflow.empty() && !waits ? kRefusedOverflow : allocated ? kRefusedNone : kRefusedPool;
  record[kRecStatusValue] = capacity;
  record[kRecCapacity] = allocated ? capacity : -1;
  for (int i = 0; i < 4; ++i) record[kRecOffset + i] = allocated ? target.offset[i] : -1;
  p.row_bytes = H * int64_t(a.x.element_size());
  p.num_scales = a.x_scales ? int(a.x_scales->size(1)) : 0;
  p.num_topk = int(K);
  p.num_blocks = num_blocks;
  p.handshake = handshake;
  p.one_launch = group.config().moe_one_launch;
  phase.next("ep::dispatch/launch");
  EP_CUDA_CHECK(launch_dispatch_with_records(p, stream));
  phase.next("ep::dispatch/track");
  transport.track(op, stream);

  // Queued: now this rank may raise without leaving a peer waiting for its record.
  TORCH_CHECK_VALUE(overflow.empty() || waits, overflow, "; no rank moved rows in this dispatch (#", call_id, ")",
                    allocated ? "" : " (nor could this rank allocate its outputs: " + refusal + ")");
  TORCH_CHECK_VALUE(allocated, op, " on ", refusal, "; no rank moved rows in this call");  // "rank N: ..."
  raise_device_report(transport, rank, seq, op, /*waited=*/waits);

  phase.next("ep::dispatch/counts");
  o.meta = given ? placeholder_output(a.placeholders, meta.options()) : meta;  // the caller keeps the table it gave
  if (cached) {
    o.counts = placeholder(a.placeholders, at::kLong);
  } else if (waits) {
    o.counts = sized.to_tensor();
  } else {  // only the device knows the sizes, as a pulling dispatch with num_worst_tokens
    HandleCounts c;
    c.call_id = call_id;
    c.num_worst_tokens = a.num_worst_tokens;
    c.send.assign(size_t(R), -1);
    c.recv.assign(size_t(R), -1);
    c.per_expert.assign(size_t(E / R), -1);
    c.sent.assign(size_t(HandleCounts::matrix_size(R)), -1);
    o.counts = c.to_tensor();
  }
  return o;
}

bool combine_device_records_this_call(const ProcessGroupEP& group, cudaStream_t stream) {
  return group.config().moe_push && group.config().moe_device_records && !stream_capturing(stream);
}

at::Tensor empty_in_pool(MoePool& pool, at::IntArrayRef sizes, const at::TensorOptions& options) {
  try {
    RouteToPool route(pool, options.device().index());
    at::Tensor t = at::empty(sizes, options);
    if (t.numel() && pool.arena->offset_of(t.data_ptr(), t.nbytes()) < 0) return {};  // routed to another pool
    return t;
  } catch (const std::exception&) {  // out of memory, or another failure: the caller decides
    return {};
  }
}

at::Tensor combine_buffer_in_pool(ProcessGroupEP& group, int64_t rows, int64_t hidden, at::ScalarType dtype,
                                  const at::Device& device) {
  if (!group.config().moe_push) return {};
  const std::shared_ptr<MoePool> pool = group.moe_pool_if_any();
  if (!pool) return {};
  // A failed group raises here as every op does: a peer's late write after a timeout may still
  // land in this pool's freed blocks, so none is handed out again (docs/moe_push.md, section 4).
  try {
    group.moe_transport(device, "combine_buffer")->check_healthy("combine_buffer");
  } catch (const CommError& e) {
    group.raise_failure(e.what());
  }
  c10::cuda::CUDAGuard guard(device);
  return empty_in_pool(*pool, {rows, hidden}, at::TensorOptions().dtype(dtype).device(device));
}

namespace {

// Where `t` lies in this rank's MoE arena, 16-byte aligned (the pull kernels' widest loads): its
// offset there; else the offset of a copy made there on `stream`, kept in `staged` until the
// launch is queued (freed then, the caching allocator reuses it in stream order, after the pull
// kernel, which ends once every peer is done reading it). -1: an empty tensor. False: the pool
// cannot hold the copy.
bool offset_in_arena(MoePool& pool, const at::Tensor& t, cudaStream_t stream,
                     std::vector<at::Tensor>& staged, int64_t* offset) {
  *offset = -1;
  if (!t.numel()) return true;
  const int64_t at = pool.arena->offset_of(t.data_ptr(), t.nbytes());
  if (at >= 0 && at % 16 == 0) {
    *offset = at;
    return true;
  }
  at::Tensor copy = empty_in_pool(pool, t.sizes(), t.options());
  if (!copy.defined()) return false;
  EP_CUDA_CHECK(cudaMemcpyAsync(copy.data_ptr(), t.data_ptr(), t.nbytes(), cudaMemcpyDeviceToDevice, stream));
  *offset = pool.arena->offset_of(copy.data_ptr(), copy.nbytes());
  staged.push_back(std::move(copy));
  return true;
}

}  // namespace

std::string notify_combine(CudaTransport& transport, MoePool& pool, const CombineArgs& a, int64_t call_seq,
                           cudaStream_t stream, kernels::CombineParams& p, std::vector<at::Tensor>& staged) {
  using namespace kernels;
  const char* op = "combine";
  const int R = transport.size(), rank = transport.rank();
  const HandleCounts& h = a.handle_counts;
  int64_t x_at = -1, weights_at = -1;
  const bool x_held = offset_in_arena(pool, a.x, stream, staged, &x_at);
  const bool held = x_held && (!a.topk_weights || offset_in_arena(pool, *a.topk_weights, stream, staged, &weights_at));
  const char* copied = x_held ? "topk_weights" : "x";  // what the pool could not hold
  // An overflow an earlier dispatch left refuses this call on every rank, as reject_if_overflowed
  // does through the host's records.
  const std::string overflow = transport.take_dispatch_overflow();

  MoeNotifyParams n{};
  n.num_ranks = R;
  n.rank = rank;
  n.num_experts = a.num_experts;
  n.meta = a.handle_meta.data_ptr<int32_t>();  // its send row: the rows this rank sent at dispatch
  n.num_tokens = a.num_tokens;
  n.check_expert_ids = false;
  n.call_seq = call_seq;
  int64_t* record = n.record;
  record[kRecOp] = kMoeRecordCombine;
  record[kRecCallId] = int64_t(h.call_id);
  record[kRecHandleId] = int64_t(h.call_id);
  record[kRecNumExperts] = a.num_experts;
  record[kRecHidden] = a.x.size(1);
  record[kRecDtype] = int64_t(a.x.scalar_type());
  record[kRecNumTopk] = a.topk_weights ? a.topk_weights->size(1) : 0;
  record[kRecHasScales] = 0;
  record[kRecHasWeights] = a.topk_weights.has_value();
  record[kRecPush] = 1;
  record[kRecStatus] = !overflow.empty() ? kRefusedOverflow : held ? kRefusedNone : kRefusedPool;
  record[kRecStatusValue] = a.x.size(0);
  record[kRecStatusValue2] = x_held ? 1 : 0;  // a refusal's tensor: 0 x, 1 topk_weights
  record[kRecCapacity] = a.x.size(0);
  record[kRecOffset + 0] = x_at;
  record[kRecOffset + 1] = weights_at;
  record[kRecOffset + 2] = record[kRecOffset + 3] = -1;
  for (int s = 0; s < R; ++s) record[kRecExpect + s] = h.recv[size_t(s)];  // -1: only the device knew
  connect_notify(transport, pool, p.handshake, n, p.arenas, op);
  EP_CUDA_CHECK(launch_moe_notify(n, stream));
  p.plan = reinterpret_cast<const int64_t*>(transport.records(rank) + MoeRecordsLayout::kPlanOffset);
  for (int d = 0; d < R; ++d) {  // the plan says where the peers' tensors lie
    p.x[d] = nullptr;
    p.topk_weights[d] = nullptr;
    p.x_rows[d] = 0;
    if (d != rank) p.meta[d] = nullptr;
  }
  if (!overflow.empty()) return overflow + "; no rank moved rows in this combine";
  if (!held)
    return std::string(op) + " on rank " + std::to_string(rank) + ": the MoE pool (TORCH_EP_MOE_POOL_BYTES: " +
           mib(pool.arena->bytes()) + " a rank, " + mib(pool.arena->used()) + " held) cannot hold a copy of " + copied + " (" +
           std::to_string(a.x.size(0)) + " rows), which peers read from there; no rank moved rows in this combine "
           "(its outputs are zeros). Write x into torch_ep.combine_buffer(handle), raise TORCH_EP_MOE_POOL_BYTES, or "
           "keep fewer dispatch outputs alive";
  return "";
}

namespace {

const char* checked_field(int64_t word) {
  switch (word) {
    case kernels::kRecNumExperts: return "num_experts";
    case kernels::kRecHidden: return "the hidden size";
    case kernels::kRecDtype: return "the dtype of x (as c10::ScalarType)";
    case kernels::kRecNumTopk: return "the number of top-k slots sent (0 along a handle; a combine: topk_weights' columns)";
    case kernels::kRecHasScales: return "whether fp8 scales are sent";
    case kernels::kRecHasWeights: return "whether topk_weights are sent";
    case kernels::kRecPush: return "whether dispatch pushes (Options.moe_push, TORCH_EP_MOE_PUSH)";
    case kernels::kRecWaits:
      return "whether the dispatch waits for its sizes (1: neither a handle nor num_worst_tokens; every rank must "
             "give a handle, or num_worst_tokens, in the same calls)";
  }
  return "a record field";
}

}  // namespace

std::string device_report_message(const std::vector<int64_t>& w, int rank, int64_t current_seq, const char* op,
                                  bool waited) {
  using namespace kernels;
  if (w.size() < size_t(kMoeReportWords) || w[kMoeReportCode] == kVerdictOk) return "";
  const int64_t call = w[kMoeReportCallId], who = w[kMoeReportRank], peer = w[kMoeReportPeer];
  const int64_t value = w[kMoeReportValue], peer_value = w[kMoeReportPeerValue];
  const bool combine = w[kMoeReportOp] == kMoeRecordCombine;
  // "this" call only where the report is of the raising call's notify (kMoeReportSeq).
  const bool this_call = current_seq > 0 && w[kMoeReportSeq] == current_seq;
  const std::string when =
      combine ? (this_call ? "this combine" : "an earlier combine") + std::string(" (along the handle of dispatch #") +
                    std::to_string(call) + ")"
              : (this_call ? "this dispatch (#" : "an earlier dispatch (#") + std::to_string(call) + ")";
  std::string what;
  const char* nothing_moved = combine ? "; no rank moved rows in that call (its outputs are zeros)"
                                      : "; no rank moved rows in that call (its outputs are padding: recv_topk_idx -1)";
  auto op_name = [](int64_t word) {
    return std::string(word == kMoeRecordDispatch ? "a dispatch" : word == kMoeRecordCombine ? "a combine" : "another op");
  };
  switch (w[kMoeReportCode]) {
    case kVerdictRefused:
      if (w[kMoeReportDetail] == kRefusedPool)
        what = "rank " + std::to_string(who) + " could not allocate " +
               (!combine ? "its outputs (" : peer_value ? "a copy of its topk_weights (" : "a copy of its x (") +
               std::to_string(value) + " rows) in its MoE pool (TORCH_EP_MOE_POOL_BYTES)";
      else if (w[kMoeReportDetail] == kRefusedOverflow)
        what = "an earlier dispatch on rank " + std::to_string(who) + " received more rows than num_worst_tokens "
               "(that rank raises it)";
      else
        what = "rank " + std::to_string(who) + "'s topk_idx holds expert ids outside [-1, num_experts): the "
               "smallest is " + std::to_string(value) + ", the largest " + std::to_string(peer_value);
      what += nothing_moved;
      break;
    case kVerdictOutOfStep:
      if (w[kMoeReportDetail] == kRecOp)
        what = "rank " + std::to_string(who) + " made " + op_name(value) + " but rank " + std::to_string(peer) + " " +
               op_name(peer_value) + "; the ranks' calls are out of step" + nothing_moved;
      else if (combine)
        what = "rank " + std::to_string(who) + " combined along the handle of dispatch #" + std::to_string(value) +
               " but rank " + std::to_string(peer) + " along that of #" + std::to_string(peer_value) +
               "; every rank must pass the handle of the same dispatch" + nothing_moved;
      else
        what = "rank " + std::to_string(who) + " was at its dispatch #" + std::to_string(value) + " but rank " +
               std::to_string(peer) + " at #" + std::to_string(peer_value) + "; the ranks' calls are out of step" +
               nothing_moved;
      break;
    case kVerdictMismatch:
      what = std::string("the ranks disagree on ") + checked_field(w[kMoeReportDetail]) + ": rank " +
             std::to_string(peer) + " has " + std::to_string(peer_value) + ", rank " + std::to_string(who) + " has " +
             std::to_string(value) + "; every rank of the group must make the same call" + nothing_moved;
      break;
    case kVerdictHandle:
      what = w[kMoeReportDetail] == 0
                 ? "rank " + std::to_string(who) + " dispatched along the handle of dispatch #" + std::to_string(value) +
                       " but rank " + std::to_string(peer) + " along that of #" + std::to_string(peer_value)
                 : combine ? "rank " + std::to_string(who) + "'s handle says it received " + std::to_string(value) +
                                 " rows from rank " + std::to_string(peer) + ", whose handle says it sent " +
                                 std::to_string(peer_value)
                           : "rank " + std::to_string(who) + "'s handle expects " + std::to_string(value) +
                                 " rows from rank " + std::to_string(peer) + ", which sends " + std::to_string(peer_value);
      what += std::string("; every rank must pass the handle of the same dispatch") + nothing_moved;
      break;
    case kVerdictOverflow:
      what = "rank " + std::to_string(who) + " received " + std::to_string(value) + " rows but its outputs hold " +
             std::to_string(peer_value) + " (num_worst_tokens); the rows past them were dropped (raise num_worst_tokens)";
      break;
    default:
      what = "the device reported problem " + std::to_string(w[kMoeReportCode]);
  }
  std::string later;
  if (w[kMoeReportLater] > 0)
    later = "; " + std::to_string(w[kMoeReportLater]) + " later dispatch/combine call" +
            (w[kMoeReportLater] > 1 ? "s" : "") + " also went wrong before this was raised (the last of dispatch #" +
            std::to_string(w[kMoeReportLaterCallId]) + " or its handle; only this first problem is described)";
  return std::string(op) + " on rank " + std::to_string(rank) + ": found by the device during " + when +
         (this_call && waited ? ": " : ", which does not wait for it: ") + what + later;
}

int64_t known_capacity(const DispatchArgs& a) {
  if (a.num_worst_tokens > 0) return a.num_worst_tokens;
  int64_t rows = 0;
  for (int64_t n : a.handle_counts->recv) rows += n;
  return rows;
}

void raise_device_report(CudaTransport& transport, int rank, int64_t current_seq, const char* op, bool waited) {
  const std::vector<int64_t> words = transport.take_moe_report();
  const std::string why = device_report_message(words, rank, current_seq, op, waited);
  if (why.empty()) return;
  const int64_t code = words[kernels::kMoeReportCode];
  TORCH_CHECK_VALUE(code != kernels::kVerdictRefused && code != kernels::kVerdictOverflow, why);
  TORCH_CHECK(false, why);
}

}  // namespace ep::moe
