// The MoE ops on CUDA tensors: host glue around backend/kernels/moe.cu.
//
// Each call runs on the caller's current stream:
//   [layout]      routing table on the device (a new route only)
//   host          the sizes: from the handle, the given layout's host header, or the header
//                 the layout kernel writes to pinned memory (a wait; then a [signal] kernel
//                 sends "ready" first, so it overlaps the wait); none with num_worst_tokens.
//                 Then one record exchange with every peer: sizes, checks, and IPC handles of
//                 the tensors its kernel will read (none under Options.moe_device_records, for a
//                 dispatch the host need not wait for and for an eager combine: a notify kernel
//                 exchanges the records instead; moe_push.cpp, kernels/moe_records.cuh)
//   [dispatch | combine]   one kernel: "my inputs are ready" to every peer and wait for theirs;
//                 pull straight from the peers' tensors into this rank's outputs; then "I am
//                 done reading yours" and wait until every peer is done with ours, so no input
//                 is freed or overwritten while a peer still reads it
#include <ATen/core/CachingHostAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <thread>

#include "backend/common/errors.hpp"
#include "backend/common/phases.hpp"
#include "backend/kernels/moe.cuh"
#include "backend/ops/cuda/cuda_outputs.hpp"
#include "backend/ops/cuda/moe_push.hpp"
#include "backend/ops/moe_internode.hpp"
#include "backend/ops/moe_ops.hpp"
#include "backend/ops/moe_protocol.hpp"
#include "backend/process_group/cuda/moe_pool.hpp"
#include "backend/process_group/process_group_ep.hpp"
#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/cuda/cuda_transport.hpp"

namespace ep::moe {
namespace {

using at::Tensor;
using kernels::MetaLayout;

const void* ptr_of(const std::optional<Tensor>& t) { return t && t->numel() ? t->data_ptr() : nullptr; }
const void* ptr_of(const Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; }

constexpr uint32_t kInMoeArena = 2;  // PeerRegion::valid: `offset` is in the owner's MoE arena, not exported

// Exports `ptrs` into records[p].regions for every peer; false when one cannot be exported. A
// tensor in the MoE pool (a pushing dispatch's output, `moe_arena`) is not exported: every rank
// maps that arena already, so its offset there is enough.
bool share(CudaTransport& transport, const std::vector<const void*>& ptrs, std::vector<Record>& records,
           const CommPool* moe_arena) {
  PeerRegion regions[kMaxRegions];
  std::memset(regions, 0, sizeof(regions));
  bool ok = true;
  CudaTransport::Export last;  // tensors of one caching-allocator block share one lookup
  for (size_t i = 0; i < ptrs.size(); ++i) {
    if (!ptrs[i]) continue;
    const int64_t arena_offset = moe_arena ? moe_arena->offset_of(ptrs[i], 1) : -1;
    if (arena_offset >= 0) {
      regions[i].offset = uint64_t(arena_offset);
      regions[i].valid = kInMoeArena;
      continue;
    }
    cudaIpcMemHandle_t handle;
    if (!transport.export_allocation(ptrs[i], &handle, &regions[i].offset, &last)) {
      ok = false;
      continue;
    }
    std::memcpy(regions[i].ipc_handle, &handle, sizeof(handle));
    regions[i].valid = 1;
  }
  for (Record& r : records) std::memcpy(r.regions, regions, sizeof(regions));
  if (!ok)
    for (Record& r : records)
      set_rejected(r, "an input lives in memory CUDA IPC cannot export (expandable segments?); CUDA "
                      "dispatch/combine read peers' tensors in place and need cudaMalloc'd blocks");
  return ok;
}

// Where a peer's region is mapped here; this rank's own pointer for itself.
const char* peer_ptr(CudaTransport& transport, int peer, const Record& record, int region, const void* own,
                     const CommPool* moe_arena) {
  if (peer == transport.rank()) return static_cast<const char*>(own);
  const PeerRegion& r = record.regions[region];
  if (!r.valid) return nullptr;
  if (r.valid == kInMoeArena) {
    const char* base = moe_arena ? moe_arena->arena(peer) : nullptr;
    TORCH_CHECK(base, "rank ", peer, " sent a tensor of its MoE pool, but that pool is not mapped here");
    return base + r.offset;
  }
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, r.ipc_handle, sizeof(handle));
  return transport.open_peer_allocation(peer, handle) + r.offset;
}

std::vector<Record> exchange(CudaTransport& transport, const std::vector<Record>& mine, const char* op) {
  std::vector<Record> theirs(mine.size());
  transport.exchange(mine.data(), theirs.data(), sizeof(Record), op);
  return theirs;
}

// The bound on a handshake kernel's waits and where a timed-out one reports its peer, alike
// for the signal kernel (SignalParams) and the pull kernels (Handshake).
template <typename Params>
void set_wait_bound(const CudaTransport& transport, Params& p) {
  p.timeout_ns = uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(transport.timeout()).count());
  p.error = transport.kernel_error();
}

// The ready half's flags: this rank's on every peer, to set, and every peer's here, to wait for.
void set_ready_flags(const CudaTransport& transport, uint32_t** to_set, uint32_t** to_wait) {
  const int me = transport.rank();
  for (int peer = 0; peer < transport.size(); ++peer) {
    if (peer == me) continue;
    to_set[peer] = transport.ready_flag(peer, me);
    to_wait[peer] = transport.ready_flag(me, peer);
  }
}

// The ready half of the handshake as a kernel of its own, for a dispatch whose host must wait
// for the sizes: sent before that wait, it overlaps it.
void signal_ready(CudaTransport& transport, cudaStream_t stream) {
  kernels::SignalParams p{};
  p.num_ranks = transport.size();
  set_wait_bound(transport, p);
  set_ready_flags(transport, p.to_set, p.to_wait);
  EP_CUDA_CHECK(kernels::launch_signal(p, stream));
}

// The handshake inside the pull kernel: the done half always, the ready half unless a signal
// kernel sent it earlier.
kernels::Handshake handshake(CudaTransport& transport, bool with_ready) {
  kernels::Handshake h{};
  h.blocks_finished = transport.grid_counter();
  set_wait_bound(transport, h);
  if (with_ready) set_ready_flags(transport, h.ready_to_set, h.ready_to_wait);
  const int me = transport.rank();
  for (int peer = 0; peer < transport.size(); ++peer) {
    if (peer == me) continue;
    h.done_to_set[peer] = transport.done_flag(peer, me);
    h.done_to_wait[peer] = transport.done_flag(me, peer);
  }
  return h;
}

// The grid of a dispatch or combine kernel: Options.num_sms where set, else the op's budget
// measured for this GPU and group size (`measured`, from torch_ep/data/sm_table.json; 0 where
// the table has none), else every SM.
int num_blocks(ProcessGroupEP& group, const at::Device& device, int measured) {
  if (group.config().num_sms > 0) return group.config().num_sms;
  int sms = 0;
  EP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  return measured > 0 ? std::min(measured, sms) : sms;
}

// A dispatch's measured budget and copy variant: fp8 rows (those with scales) have their own.
int dispatch_budget(const Config& config, bool fp8) {
  return fp8 ? config.auto_sms_dispatch_fp8 : config.auto_sms_dispatch;
}
kernels::MoeCopy dispatch_copy(const Config& config, bool fp8) {
  return kernels::MoeCopy(fp8 ? config.moe_copy_dispatch_fp8 : config.moe_copy_dispatch);
}

// A dispatch kernel that received more rows than num_worst_tokens reported it; the host raises
// it through the next call's records, so that every rank raises together and the group goes on
// (the kernel dropped the rows past the outputs and completed its handshake; combines skip rows
// past their peers' inputs). This is the first host step after such a kernel where this rank
// waits (the sizes of a dispatch without num_worst_tokens) or the next call after it finished;
// torch_ep.check_errors() asks at any time.
void reject_if_overflowed(CudaTransport& transport, std::vector<Record>& mine) {
  const std::string why = transport.take_dispatch_overflow();
  if (why.empty()) return;
  for (Record& r : mine) set_rejected(r, why);
}

std::shared_ptr<CudaTransport> transport_for(ProcessGroupEP& group, const at::Device& device, const char* op) {
  TORCH_CHECK_VALUE(group.getSize() <= kernels::kMaxRanksPerNode, op, ": CUDA dispatch/combine support groups of up to ",
                    kernels::kMaxRanksPerNode, " ranks, this one has ", group.getSize());
  std::shared_ptr<CudaTransport> transport = group.moe_transport(device, op);
  transport->check_healthy(op);
  return transport;
}

}  // namespace

Tensor layout_cuda(const Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, LayoutExtras* extras) {
  c10::cuda::CUDAGuard guard(topk_idx.device());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = topk_idx.size(0);
  const MetaLayout l{num_ranks, num_experts, N};
  const at::TensorOptions ints = topk_idx.options().dtype(at::kInt);
  Tensor meta = empty_output({l.size()}, ints);
  kernels::LayoutParams p{};
  p.topk_idx = topk_idx.data_ptr<int64_t>();
  p.num_tokens = N;
  p.num_topk = int(topk_idx.size(1));
  p.num_ranks = int(num_ranks);
  p.num_experts = num_experts;
  p.meta = meta.data_ptr<int32_t>();
  if (extras && extras->want_counts) {
    extras->num_tokens_per_rank = empty_output({num_ranks}, ints);
    extras->num_tokens_per_expert = empty_output({num_experts}, ints);
    p.tokens_per_rank = extras->num_tokens_per_rank.data_ptr<int32_t>();
    p.pairs_per_expert = extras->num_tokens_per_expert.data_ptr<int32_t>();
  }
  if (extras && extras->want_is_token_in_rank) {
    extras->is_token_in_rank = empty_output({N, num_ranks}, topk_idx.options().dtype(at::kBool));
    p.is_token_in_rank = extras->is_token_in_rank.data_ptr<bool>();
  }
  if (extras && extras->want_host_header) {
    Tensor& host = extras->host_header = at::empty({l.host_header_size()}, ints.device(at::kCPU).pinned_memory(true));
    std::fill_n(host.data_ptr<int32_t>() + l.header_size(), num_ranks, 0);  // the ready flags
    p.host_header = host.data_ptr<int32_t>();  // pinned memory is mapped: the kernel writes it directly
    // The allocator must not hand this block out again before the kernel has written it.
    at::getHostAllocator(at::kCUDA)->record_event(p.host_header, host.storage().data_ptr().get_context(),
                                                  stream.unwrap());
  }
  C10_CUDA_CHECK(kernels::launch_layout(p, stream.stream()));
  return meta;
}

Tensor sizes_on_host(ProcessGroupEP& group, const Tensor& host_header, const Tensor& meta, int64_t num_experts,
                     int64_t num_tokens, const char* op) {
  const MetaLayout l{group.getSize(), num_experts, num_tokens};
  if (!host_header.defined()) {
    Tensor header = at::empty({l.header_size()}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(meta.device().index()).stream();
    EP_CUDA_CHECK(cudaMemcpyAsync(header.data_ptr(), meta.data_ptr(), header.nbytes(), cudaMemcpyDeviceToHost, stream));
    EP_CUDA_CHECK(cudaStreamSynchronize(stream));
    return header;
  }
  const int32_t* flags = host_header.data_ptr<int32_t>() + l.header_size();
  const auto deadline = std::chrono::steady_clock::now() + group.config().timeout;
  for (int64_t r = 0; r < l.num_ranks; ++r) {
    for (uint64_t spins = 0; __atomic_load_n(flags + r, __ATOMIC_ACQUIRE) == 0; ++spins) {
      if (spins % 1024 == 1023) {
        if (std::chrono::steady_clock::now() > deadline)
          C10_THROW_ERROR(DistBackendError, std::string(op) + ": rank " + std::to_string(group.getRank()) +
                                                ": the routing layout's sizes did not come back from the device "
                                                "within the group's timeout (is an earlier op on this stream stuck?)");
        std::this_thread::yield();
      }
    }
  }
  return host_header;
}

DispatchOutputs dispatch_cuda(ProcessGroupEP& group, const DispatchArgs& a) {
  const char* op = "dispatch";
  // Across nodes, the hierarchical route (without NVSHMEM in the build, virtual nodes on one
  // host stay on this one).
  if (group.topology().multi_node() && ProcessGroupEP::internode_built()) return dispatch_cuda_internode(group, a);
  Phases phase;
  phase.next("ep::dispatch/setup/guard");
  const at::Device device = a.x.device();
  c10::cuda::CUDAGuard guard(device);
  phase.next("ep::dispatch/setup/transport");
  std::shared_ptr<CudaTransport> transport = transport_for(group, device, op);
  const std::unique_lock<std::mutex> hold = transport->hold_mappings();  // until the call is tracked
  phase.next("ep::dispatch/setup");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int64_t R = group.getSize(), rank = group.getRank();
  const int64_t N = a.x.size(0), H = a.x.size(1), E = a.num_experts;
  const bool cached = a.handle_meta.has_value(), worst = a.num_worst_tokens > 0;
  const MetaLayout l{R, E, N};
  // Push (Options.moe_push): each rank writes its rows into the receivers' outputs, which come
  // from the MoE pool (made with the transport, on every rank alike). Only such a group has one.
  const bool capturing = stream_capturing(stream);  // asked once per call
  const bool push = push_this_call(group, capturing);
  std::shared_ptr<MoePool> pool = group.config().moe_push ? group.moe_pool_if_any() : nullptr;
  TORCH_CHECK(!push || pool, op, ": this group pushes (Options.moe_push) but has no MoE pool");
  const CommPool* moe_arena = pool ? pool->arena.get() : nullptr;

  try {
    phase.next("ep::dispatch/layout");
    const bool given = cached || a.layout_meta;  // a routing table computed earlier
    // The sizes, on the host: from the handle, from the given layout's host header, or from the
    // header the layout kernel writes to the host now (one wait for that kernel), or nowhere
    // with num_worst_tokens, so that nothing waits on the device.
    // Device records (Options.moe_device_records): no host exchange at all; a dispatch that waits
    // for its sizes reads them from the device's records, not from the layout's header.
    const bool device_records = device_records_this_call(group, push);
    LayoutExtras fresh;
    fresh.want_host_header = !given && !worst && !device_records;
    const bool host_waits = !cached && !worst && !a.layout_header;
    TORCH_CHECK_VALUE(!host_waits || !capturing, op, ": inside a CUDA graph capture, a dispatch "
                      "needs num_worst_tokens or a handle (without them the host waits for the sizes)");
    const Tensor meta = cached ? *a.handle_meta : a.layout_meta ? *a.layout_meta : layout_cuda(*a.topk_idx, E, R, &fresh);
    // The expert ids are checked on the device there, not from a given header.
    if (device_records) {
      phase.next("ep::dispatch/records");
      return dispatch_with_device_records(group, *transport, *pool, a, meta, given, stream,
                                          num_blocks(group, device, dispatch_budget(group.config(), bool(a.x_scales))),
                                          handshake(*transport, /*with_ready=*/false), phase);
    }
    Tensor header = a.layout_header ? *a.layout_header : fresh.host_header;
    std::vector<int64_t> send(R, -1);
    // The handshake goes out before the host waits, so it overlaps that wait; where the host
    // does not wait, after the exchange, so that no rank's kernel waits on a peer's host. A
    // pushing kernel sends its ready half itself, with its row of the send matrix.
    if (host_waits && !push) signal_ready(*transport, stream);
    if (cached) {
      send = a.handle_counts->send;
    } else if (!worst || header.defined()) {  // a given layout's header is read, as every rank does
      phase.next("ep::dispatch/wait_for_sizes");
      header = sizes_on_host(group, header, meta, E, N, op);
      for (int64_t p = 0; p < R; ++p) send[p] = header.data_ptr<int32_t>()[l.tokens_per_rank() + p];
    }

    phase.next("ep::dispatch/records");
    const uint64_t call_id = group.next_dispatch_id();
    std::vector<Record> mine = dispatch_records(a, R, call_id, header.defined() ? header.data_ptr<int32_t>() : nullptr);
    reject_if_overflowed(*transport, mine);
    DispatchOutputs o;
    // Under push the receivers' outputs come first where their rows are known now (a handle, or
    // num_worst_tokens): where they lie, or that the pool cannot hold them, rides in the records.
    // Elsewhere the target says capacity -1: not known yet (a second exchange follows).
    bool allocated = false;
    PushTarget target{{-1, -1, -1, -1}, -1};
    if (push) {
      for (Record& r : mine) {
        r.push = 1;
        r.target = target;
      }
      if (cached || worst) {
        phase.next("ep::dispatch/outputs");
        std::string why;
        allocated = allocate_from_pool(*pool, int(rank), a, known_capacity(a), o, target, &why);
        for (Record& r : mine) {
          r.target = target;
          if (!allocated) set_rejected(r, why);
        }
      }
    } else {
      phase.next("ep::dispatch/export");
      share(*transport, {ptr_of(a.x), ptr_of(a.x_scales), ptr_of(a.topk_idx), ptr_of(a.topk_weights), ptr_of(meta)},
            mine, moe_arena);
    }
    phase.next("ep::dispatch/exchange");
    const std::vector<Record> theirs = exchange(*transport, mine, op);
    phase.next("ep::dispatch/counts");
    check_records(op, int(rank), mine[rank], theirs);
    const HandleCounts counts = dispatch_counts(a, rank, call_id, send, theirs);
    int64_t M = 0;
    for (int64_t n : counts.recv) M += n;
    const int64_t capacity = worst ? a.num_worst_tokens : M;
    const int64_t K = cached ? 0 : a.topk_idx->size(1);

    if (push) {
      // Whether a second exchange runs is read from the records, which every rank sees alike
      // (ranks may differ in num_worst_tokens): once any receiver's target is unknown, every rank
      // takes part, those that allocated before the records sending their target again.
      bool any_unknown = false;
      for (const Record& r : theirs) any_unknown = any_unknown || r.target.capacity < 0;
      std::vector<PushTarget> targets;
      if (!any_unknown) {
        for (const Record& r : theirs) targets.push_back(r.target);
      } else {
        std::string why;
        if (!allocated) allocate_from_pool(*pool, int(rank), a, capacity, o, target, &why);  // the rows came with the records
        phase.next("ep::dispatch/exchange_targets");
        targets = exchange_targets(*transport, target, why, op);
      }
      kernels::DispatchPushParams p{};
      p.num_ranks = int(R);
      p.rank = int(rank);
      p.num_experts = E;
      p.src = {static_cast<const char*>(ptr_of(a.x)), static_cast<const float*>(ptr_of(a.x_scales)),
               static_cast<const int64_t*>(ptr_of(a.topk_idx)), static_cast<const float*>(ptr_of(a.topk_weights)),
               meta.data_ptr<int32_t>(), N};
      set_targets(*pool, int(R), targets, p.dst);
      for (int d = 0; d < R; ++d) p.counts_to_set[d] = d == rank ? nullptr : transport->push_counts(d, int(rank));
      p.counts = transport->push_counts(int(rank), 0);
      p.row_bytes = H * int64_t(a.x.element_size());
      p.num_scales = a.x_scales ? int(a.x_scales->size(1)) : 0;
      p.num_topk = int(K);
      p.num_blocks = num_blocks(group, device, dispatch_budget(group.config(), bool(a.x_scales)));
      p.call_id = int64_t(call_id);
      p.overflow = transport->dispatch_overflow();
      p.handshake = handshake(*transport, /*with_ready=*/true);
      phase.next("ep::dispatch/launch");
      EP_CUDA_CHECK(kernels::launch_dispatch_push(p, stream));
      phase.next("ep::dispatch/track");
      transport->track_known_capture(op, stream, capturing);
      raise_device_report(*transport, int(rank), -1, op);  // an earlier call's; queued: no peer waits in vain
      o.meta = given ? placeholder_output(a.placeholders, meta.options()) : meta;
      o.counts = cached ? placeholder(a.placeholders, at::kLong) : counts.to_tensor();
      return o;
    }

    phase.next("ep::dispatch/outputs");
    o.recv_x = empty_output({capacity, H}, a.x.options());
    // The small outputs in one allocation (cuda_outputs.hpp) unless TORCH_EP_OUTPUTS_TOGETHER=0. Host
    // time of an fp8 dispatch with a layout, apart and together in turn (moe_profile, H100, 2 ranks,
    // e7b9b05, two runs): 30.7-31.6 us together against 39.2-40.1 and 51.9-52.1 apart; bf16 within
    // the host's spread both ways (37.3-38.1 / 31.8-33.6, then 45.8-46.2 / 47.9-51.0).
    const bool apart = !outputs_together();
    auto [scales, ids, weights] = empty_outputs_together<3>(
        {{{bool(a.x_scales), capacity, a.x_scales ? a.x_scales->size(1) : 0, at::kFloat},
          {!cached, capacity, K, at::kLong},
          {bool(a.topk_weights), capacity, K, at::kFloat}}},
        a.x.options(), apart);
    o.recv_x_scales = a.x_scales ? scales : placeholder_output(a.placeholders, a.x.options().dtype(at::kFloat));
    o.recv_topk_idx = cached ? placeholder_output(a.placeholders, a.x.options().dtype(at::kLong)) : ids;
    o.recv_topk_weights = a.topk_weights ? weights : placeholder_output(a.placeholders, a.x.options().dtype(at::kFloat));

    phase.next("ep::dispatch/params");  // the peers' tensors as mapped here, the grid, the handshake
    kernels::DispatchParams p{};
    p.num_ranks = int(R);
    p.rank = int(rank);
    p.num_experts = E;
    for (int s = 0; s < R; ++s) {
      kernels::DispatchSource& src = p.src[s];
      src.x = peer_ptr(*transport, s, theirs[s], 0, ptr_of(a.x), moe_arena);
      src.x_scales = reinterpret_cast<const float*>(peer_ptr(*transport, s, theirs[s], 1, ptr_of(a.x_scales), moe_arena));
      src.topk_idx = reinterpret_cast<const int64_t*>(peer_ptr(*transport, s, theirs[s], 2, ptr_of(a.topk_idx), moe_arena));
      src.topk_weights = reinterpret_cast<const float*>(peer_ptr(*transport, s, theirs[s], 3, ptr_of(a.topk_weights), moe_arena));
      src.meta = reinterpret_cast<const int32_t*>(peer_ptr(*transport, s, theirs[s], 4, ptr_of(meta), moe_arena));
      src.num_tokens = theirs[s].num_tokens;
    }
    p.row_bytes = H * int64_t(a.x.element_size());
    p.num_scales = a.x_scales ? int(a.x_scales->size(1)) : 0;
    p.num_topk = int(K);
    p.recv_x = static_cast<char*>(o.recv_x.data_ptr());
    p.recv_x_scales = a.x_scales ? o.recv_x_scales.data_ptr<float>() : nullptr;
    p.recv_topk_idx = cached ? nullptr : o.recv_topk_idx.data_ptr<int64_t>();
    p.recv_topk_weights = a.topk_weights ? o.recv_topk_weights.data_ptr<float>() : nullptr;
    p.capacity = capacity;
    p.num_blocks = num_blocks(group, device, dispatch_budget(group.config(), bool(a.x_scales)));
    p.copy = dispatch_copy(group.config(), bool(a.x_scales));
    p.call_id = int64_t(call_id);
    p.overflow = transport->dispatch_overflow();

    p.handshake = handshake(*transport, /*with_ready=*/!host_waits);

    phase.next("ep::dispatch/launch");
    EP_CUDA_CHECK(kernels::launch_dispatch(p, stream));
    phase.next("ep::dispatch/track");
    transport->track_known_capture(op, stream, capturing);  // asked at the start of the call
    raise_device_report(*transport, int(rank), -1, op);  // an earlier call's; queued: no peer waits in vain

    phase.next("ep::dispatch/handle");
    o.meta = given ? placeholder_output(a.placeholders, meta.options()) : meta;  // the caller keeps the table it gave
    o.counts = cached ? placeholder(a.placeholders, at::kLong) : counts.to_tensor();
    return o;
  } catch (const CommError& e) {  // timeouts included
    group.raise_failure(e.what());
  }
}

CombineOutputs combine_cuda(ProcessGroupEP& group, const CombineArgs& a) {
  const char* op = "combine";
  if (group.topology().multi_node() && ProcessGroupEP::internode_built()) return combine_cuda_internode(group, a);
  Phases phase;
  phase.next("ep::combine/setup/guard");
  const at::Device device = a.x.device();
  c10::cuda::CUDAGuard guard(device);
  phase.next("ep::combine/setup/transport");
  std::shared_ptr<CudaTransport> transport = transport_for(group, device, op);
  const std::unique_lock<std::mutex> hold = transport->hold_mappings();  // until the call is tracked
  phase.next("ep::combine/setup");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int64_t R = group.getSize(), rank = group.getRank();
  const int64_t N = a.num_tokens, H = a.x.size(1);
  const int64_t K = a.topk_weights ? a.topk_weights->size(1) : 0;
  // Combine pulls as ever; an x (or weights) of the MoE pool, a pushing dispatch's output, is
  // reached through the arena every rank maps, not exported. With device records (eager calls)
  // the records go through the device too: no host exchange (moe_push.cpp, notify_combine).
  std::shared_ptr<MoePool> pool = group.config().moe_push ? group.moe_pool_if_any() : nullptr;
  const CommPool* moe_arena = pool ? pool->arena.get() : nullptr;
  const bool device_records = combine_device_records_this_call(group, stream);
  TORCH_CHECK(!device_records || pool, op, ": this group exchanges records through the device "
              "(Options.moe_device_records) but has no MoE pool");

  try {
    kernels::CombineParams p{};
    p.num_ranks = int(R);
    p.rank = int(rank);
    p.num_experts = a.num_experts;
    p.num_tokens = N;
    p.meta[rank] = a.handle_meta.data_ptr<int32_t>();
    p.hidden = H;
    p.dtype = a.x.scalar_type() == at::kBFloat16 ? kernels::DType::kBFloat16
              : a.x.scalar_type() == at::kHalf   ? kernels::DType::kFloat16
                                                  : kernels::DType::kFloat32;
    p.num_topk = int(K);
    phase.next("ep::combine/setup/params");
    p.num_blocks = num_blocks(group, device, group.config().auto_sms_combine);
    p.copy = kernels::MoeCopy(group.config().moe_copy_combine);
    // The records are the ready half under device records; else the kernel sends it.
    p.handshake = handshake(*transport, /*with_ready=*/!device_records);

    // The outputs first: an allocation that fails raises before this rank's record or ready flag
    // goes out (peers already waiting for it time out, as for any rank that stops mid-call).
    phase.next("ep::combine/outputs");
    CombineOutputs o;
    o.combined_x = empty_output({N, H}, a.x.options());
    o.combined_topk_weights = a.topk_weights ? empty_output({N, K}, a.x.options().dtype(at::kFloat))
                                             : placeholder_output(a.placeholders, a.x.options().dtype(at::kFloat));
    p.out = static_cast<char*>(o.combined_x.data_ptr());
    p.out_weights = a.topk_weights ? o.combined_topk_weights.data_ptr<float>() : nullptr;

    std::vector<Tensor> staged;  // copies of x and weights in the MoE pool, held until the launch is queued
    std::string raise_after;     // this rank's refusal, raised once its kernels are queued
    const int64_t seq = device_records ? transport->next_moe_call() : -1;
    if (device_records) {
      phase.next("ep::combine/notify");  // the staging copies of x outside the pool included
      raise_after = notify_combine(*transport, *pool, a, seq, stream, p, staged);
    } else {
      phase.next("ep::combine/records");
      std::vector<Record> mine = combine_records(a, R);
      reject_if_overflowed(*transport, mine);
      phase.next("ep::combine/export");
      share(*transport, {ptr_of(a.x), ptr_of(a.topk_weights), ptr_of(a.handle_meta)}, mine, moe_arena);
      phase.next("ep::combine/exchange");
      const std::vector<Record> theirs = exchange(*transport, mine, op);
      phase.next("ep::combine/peers");  // the records' checks, the peers' tensors as mapped here
      check_records(op, int(rank), mine[rank], theirs);
      check_combine_counts(a, rank, theirs);
      for (int d = 0; d < R; ++d) {
        p.x[d] = peer_ptr(*transport, d, theirs[d], 0, ptr_of(a.x), moe_arena);
        p.topk_weights[d] = reinterpret_cast<const float*>(peer_ptr(*transport, d, theirs[d], 1, ptr_of(a.topk_weights), moe_arena));
        p.meta[d] = reinterpret_cast<const int32_t*>(peer_ptr(*transport, d, theirs[d], 2, ptr_of(a.handle_meta), moe_arena));
        p.x_rows[d] = d == rank ? a.x.size(0) : theirs[d].num_tokens;
      }
    }

    phase.next("ep::combine/launch");
    EP_CUDA_CHECK(kernels::launch_combine(p, stream));
    phase.next("ep::combine/track");
    transport->track(op, stream);
    staged.clear();  // freed in stream order: reused only after this call's kernels
    TORCH_CHECK_VALUE(raise_after.empty(), raise_after);
    raise_device_report(*transport, int(rank), seq, op);  // once this call is queued
    return o;
  } catch (const CommError& e) {  // timeouts included
    group.raise_failure(e.what());
  }
}

}  // namespace ep::moe
