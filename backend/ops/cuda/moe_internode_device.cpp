// Dispatch and combine across nodes driven by the device: the host glue of
// backend/kernels/internode_device.cuh. Every step is a launch on the caller's stream; the host
// waits at most once, for the notify step's counts (mapped pinned memory), to size a dispatch's
// outputs (not at all with num_worst_tokens), and a combine waits for the notify's verdict only
// where its dispatch waited too (so that bad calls raise at the call, as on the other routes).
// combine_buffer hands out this rank's combine_in region; a combine whose x is that region is
// read there in place by the node's ranks (zero copy; internode_combine.cu). dispatch_buffer
// hands out this rank's packed rows; a dispatch whose x is that view is not copied by the pack
// (internode_dispatch.cu).
#ifdef TORCH_EP_WITH_NVSHMEM
#include "backend/ops/cuda/moe_internode_device.hpp"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <utility>

#include "backend/kernels/internode_device.cuh"
#include "backend/ops/cuda/cuda_outputs.hpp"
#include "backend/ops/moe_protocol.hpp"
#include "backend/process_group/process_group_ep.hpp"
#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/nvshmem/internode_transport.hpp"

namespace ep::moe {
namespace {

namespace ix = kernels::ix;
using at::Tensor;

constexpr int64_t kDeviceRoute = -2;        // handle tail of this route: [num_nodes, ranks_per_node, -2]
constexpr int64_t kDefaultRowBytes = 16896;  // a bf16 row of hidden 7168 with top-8 ids and weights fits

int64_t r16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// A dispatch row: payload | scales | global ids | weights | positions [R] (the row's index at
// every rank: one packed row serves every node's forwarder), 16-byte fields.
struct DispatchRow {
  int64_t x_bytes, off_scales, off_ids, off_weights, off_pos, stride;
  DispatchRow(int64_t x, int64_t scales, int64_t topk, bool weights, int64_t R)
      : x_bytes(x),
        off_scales(r16(x)),
        off_ids(off_scales + r16(4 * scales)),
        off_weights(off_ids + r16(8 * topk)),
        off_pos(off_weights + (weights ? r16(4 * topk) : 0)),
        stride(off_pos + r16(4 * R)) {}
};

ix::DType dtype_of(at::ScalarType t) {
  return t == at::kBFloat16 ? ix::DType::kBFloat16 : t == at::kHalf ? ix::DType::kFloat16 : ix::DType::kFloat32;
}

// Whether t is dispatch_buffer's view of a field of this rank's packed rows: its first row at
// `at`, rows W bytes apart, each contiguous.
bool in_pack(const Tensor& t, const char* at, int64_t W) {
  return t.data_ptr() == at && (t.size(0) <= 1 || t.stride(0) * int64_t(t.element_size()) == W) &&
         (t.size(1) <= 1 || t.stride(1) == 1);
}

// t for the pack to read: contiguous, and out of this rank's packed rows, which the pack
// overwrites (a view of them other than dispatch_buffer's is copied out first).
Tensor readable(const Tensor& t, const InternodeBuffer& b, const char* what) {
  if (!b.in_dispatch_in(t.data_ptr())) return t.contiguous();
  TORCH_WARN_ONCE("dispatch: ", what, " lies in this rank's dispatch_buffer region but is not the view "
                  "dispatch_buffer handed out (its first row and row stride); it is copied out before the pack");
  return t.clone(at::MemoryFormat::Contiguous);
}

bool device_route_handle(const std::vector<int64_t>& tail, const Topology& t) {
  return tail.size() == 3 && tail[0] == t.num_nodes && tail[1] == t.ranks_per_node && tail[2] == kDeviceRoute;
}

InternodeBuffer& buffer_for(ProcessGroupEP& group, InternodeTransport& transport, int64_t row_bytes,
                            cudaStream_t stream, const char* op) {
  const Config& c = group.config();
  InternodeBuffer& b = transport.moe(c.internode_capacity,
                                     c.internode_row_bytes > 0 ? c.internode_row_bytes : kDefaultRowBytes,
                                     c.internode_combine_rows);
  b.check(op);
  if (!b.allocated()) {
    TORCH_CHECK(!stream_capturing(stream), op, ": the group's first call across nodes allocates its NVSHMEM buffer "
                "(collectively), which a CUDA graph cannot capture; run one dispatch before capturing");
    // Every rank's first call sizes the rows alike (a rank without weights may need fewer bytes
    // a row): the buffer is one symmetric allocation, the same size everywhere.
    b.reserve(transport.agree_on_max("internode/moe_row_bytes", std::max(row_bytes, b.row_bytes())));
  }
  return b;
}

std::string refusal(const ix::IxRecordHeader& d, const InternodeBuffer& b) {
  switch (d.status) {
    case ix::kOverCapacity:
      return "x has " + std::to_string(d.detail) + " rows (tokens), more than the " + std::to_string(b.capacity()) +
             " a rank may send per call across nodes; raise Options.internode_capacity (TORCH_EP_INTERNODE_CAPACITY)";
    case ix::kBadExpertIds:
      return "topk_idx holds expert ids outside [-1, num_experts=" + std::to_string(d.num_experts) +
             "): the smallest is " + std::to_string(d.id_min) + ", the largest " + std::to_string(d.id_max);
    case ix::kRowTooWide:
      return "x's rows take " + std::to_string(d.detail) + " bytes in the buffers across nodes, which were sized for " +
             std::to_string(b.row_bytes()) + " by this group's first call; set Options.internode_row_bytes "
             "(TORCH_EP_INTERNODE_ROW_BYTES) to at least that";
    case ix::kOverflowed:
      return "an earlier dispatch across nodes with num_worst_tokens received more rows than num_worst_tokens on "
             "this rank; the rows past it were dropped";
    case ix::kRefusedBefore:
      return "rank " + std::to_string(d.detail) + " refused an earlier dispatch/combine across nodes whose results "
             "no host waited for (num_worst_tokens, or a CUDA graph; its outputs were padding only); call it without "
             "num_worst_tokens to see why";
    case ix::kBadHandle:
      return "handle: it was not made by a dispatch on this group's device route across nodes (another group, or "
             "Options.internode_device changed)";
    default:
      return "status " + std::to_string(d.status);
  }
}

// Raises what the records say, in the words of the host records' checks (check_records).
[[noreturn]] void raise_refusal(const char* op, int rank, const ix::IxHostCtrl& h, const InternodeBuffer& b,
                                int num_ranks) {
  std::vector<Record> theirs;
  for (int r = 0; r < num_ranks; ++r) {
    const ix::IxRecordHeader& d = h.records[r];
    Record rec = make_record(d.op == ix::kDispatch ? OpKind::kDispatch : OpKind::kCombine, uint64_t(d.call_id),
                             d.num_experts, d.hidden, d.dtype, d.num_topk, d.has_scales != 0, d.has_weights != 0);
    rec.handle_id = uint64_t(d.handle_id);
    rec.num_tokens = d.num_tokens;
    if (d.status != ix::kOk) set_rejected(rec, refusal(d, b));
    theirs.push_back(rec);
  }
  check_records(op, rank, theirs[rank], theirs);
  for (int r = 0; r < num_ranks; ++r)
    TORCH_CHECK(theirs[r].handle_id == theirs[rank].handle_id, op, ": rank ", r, " re-dispatches along the handle of "
                "dispatch #", theirs[r].handle_id, " but rank ", rank, " along that of dispatch #",
                theirs[rank].handle_id, "; every rank must pass the handle of the same dispatch");
  TORCH_CHECK(false, op, ": rank ", rank, " refused a call across nodes that its peers' records accept");
}

// A call's place among the buffer's calls (InternodeBuffer::begin_call) from its first launch on:
// ended on every way out, so that a call refused after its notify ran still orders the next.
class OrderedCall {
 public:
  OrderedCall(InternodeBuffer& b, cudaStream_t stream, bool capturing) : b_(b), stream_(stream), capturing_(capturing) {
    b_.begin_call(stream_);
  }
  ~OrderedCall() {
    if (!open_) return;
    try {
      b_.end_call(stream_, capturing_);
    } catch (...) {  // an error is on its way out already
    }
  }
  OrderedCall(const OrderedCall&) = delete;
  OrderedCall& operator=(const OrderedCall&) = delete;
  void end() {
    open_ = false;
    b_.end_call(stream_, capturing_);
  }

 private:
  InternodeBuffer& b_;
  cudaStream_t stream_;
  bool capturing_;
  bool open_ = true;
};

// A notice taken at a call's start (InternodeBuffer::take_late_refusal; none inside a capture):
// raised once the call is queued, or put back for the next call if the call raises first.
class LateNotice {
 public:
  LateNotice(InternodeBuffer& b, bool capturing) : b_(b), notice_(capturing ? 0 : b.take_late_refusal()) {}
  ~LateNotice() {
    if (notice_) b_.put_back_late_refusal(notice_);
  }
  LateNotice(const LateNotice&) = delete;
  LateNotice& operator=(const LateNotice&) = delete;
  void raise(const char* op, int rank) {
    const int notice = std::exchange(notice_, 0);
    TORCH_CHECK_VALUE(notice == 0, op, " on rank ", rank, ": ", b_.describe_late_refusal(notice));
  }

 private:
  InternodeBuffer& b_;
  int notice_;
};

// The parameters every launch of a call shares.
ix::IxParams call_params(ProcessGroupEP& group, InternodeBuffer& b, int32_t op, const Tensor& meta, int64_t N,
                         int64_t E, Tensor& scratch) {
  ix::IxParams p = b.params();
  if (group.config().num_sms > 0) p.num_blocks = group.config().num_sms;  // the SM budget
  p.node_p2p = group.config().internode_node_p2p;
  const int64_t NN = p.layout.num_nodes;
  scratch = empty_output({NN + 2 * NN * std::max<int64_t>(N, 1)}, meta.options());
  p.op = op;
  p.meta = meta.data_ptr<int32_t>();
  p.num_tokens = N;
  p.num_experts = E;
  p.node_count = scratch.data_ptr<int32_t>();
  p.node_tokens = p.node_count + NN;
  p.node_pos = p.node_tokens + NN * std::max<int64_t>(N, 1);
  return p;
}

}  // namespace

DispatchOutputs dispatch_cuda_internode_device(ProcessGroupEP& group, InternodeTransport& transport,
                                               const DispatchArgs& a) {
  const char* op = "dispatch";
  const Topology& topo = group.topology();
  const int R = topo.size, rank = topo.rank, L = topo.ranks_per_node, NN = topo.num_nodes;
  const int64_t N = a.x.size(0), H = a.x.size(1), E = a.num_experts;
  const bool cached = a.handle_meta.has_value(), worst = a.num_worst_tokens > 0;
  const int64_t K = cached ? 0 : a.topk_idx->size(1), S = a.x_scales ? a.x_scales->size(1) : 0;
  const bool with_weights = !cached && a.topk_weights.has_value();
  TORCH_CHECK_VALUE(E / R <= ix::kMaxLocalExperts, op, ": across nodes on the device, a rank owns at most ",
                    ix::kMaxLocalExperts, " experts; this call gives it ", E / R);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.x.device().index()).stream();
  const bool capturing = stream_capturing(stream);
  // Without num_worst_tokens the host waits for the notify's sizes, which a capture never runs:
  // refuse at once (every rank captures alike) rather than wait out twice the timeout.
  TORCH_CHECK_VALUE(worst || !capturing, op, ": inside a CUDA graph capture, a dispatch across "
                    "nodes needs num_worst_tokens (without it the host waits for the received sizes)");
  const DispatchRow row(H * int64_t(a.x.element_size()), S, K, with_weights, R);
  InternodeBuffer& buf = buffer_for(group, transport, std::max(row.stride, r16(2 * H) + r16(4 * K)), stream, op);

  const Tensor meta = cached ? *a.handle_meta : a.layout_meta ? *a.layout_meta : layout_cuda(*a.topk_idx, E, R, nullptr);
  Tensor scratch;
  ix::IxParams p = call_params(group, buf, ix::kDispatch, meta, N, E, scratch);
  const uint64_t call_id = group.next_dispatch_id();
  ix::IxRecordHeader& mine = p.mine;
  mine.op = ix::kDispatch;
  mine.call_id = int64_t(call_id);
  mine.handle_id = cached ? a.handle_counts->call_id : 0;
  mine.num_experts = E;
  mine.hidden = H;
  mine.dtype = int64_t(a.x.scalar_type());
  mine.num_topk = K;
  mine.has_scales = S > 0;
  mine.has_weights = with_weights;
  mine.num_tokens = N;
  if (cached && !device_route_handle(a.handle_counts->internode, topo)) {
    mine.status = ix::kBadHandle;
  } else if (N > buf.capacity()) {
    mine.status = ix::kOverCapacity;
    mine.detail = N;
  } else if (row.stride > buf.row_bytes()) {
    mine.status = ix::kRowTooWide;
    mine.detail = row.stride;
  }
  // What a kernel reported since (an overflow, a refusal no host waited for) refuses this call on
  // every rank (InternodeBuffer::take_pending); not a captured call, whose record every replay
  // would repeat.
  if (mine.status == ix::kOk && !capturing) mine.status = buf.take_pending(mine.detail);
  LateNotice late(buf, capturing);
  // Zero copy: x (its scales) is dispatch_buffer's view of this rank's packed rows, where the
  // pack would put it; it stays. Each rank decides for itself: the rows are the same either way.
  const int64_t W = buf.row_bytes();
  const bool x_packed = in_pack(a.x, buf.dispatch_in(), W);
  const bool scales_packed = S && in_pack(*a.x_scales, buf.dispatch_in() + row.off_scales, W);
  const Tensor x = x_packed ? a.x : readable(a.x, buf, "x");
  const Tensor x_scales = !S ? Tensor() : scales_packed ? *a.x_scales : readable(*a.x_scales, buf, "the fp8 scales");
  p.row_stride = W;  // dispatch_buffer hands out the payloads before the call's other fields are known
  p.host_waits = !worst;
  p.cached = cached;
  p.x = static_cast<const char*>(x.data_ptr());
  p.x_packed = x_packed;
  p.x_bytes = row.x_bytes;
  p.x_scales = S ? x_scales.data_ptr<float>() : nullptr;
  p.scales_packed = scales_packed;
  p.num_scales = int(S);
  p.topk_idx = cached ? nullptr : a.topk_idx->data_ptr<int64_t>();
  p.topk_weights = with_weights ? a.topk_weights->data_ptr<float>() : nullptr;
  p.num_topk = int(K);
  p.off_scales = row.off_scales;
  p.off_ids = row.off_ids;
  p.off_weights = row.off_weights;
  p.off_pos = row.off_pos;

  OrderedCall order(buf, stream, capturing);
  EP_CUDA_CHECK(ix::launch_node_layout(p, stream));
  EP_CUDA_CHECK(ix::launch_notify(p, stream));
  EP_CUDA_CHECK(ix::launch_dispatch_send(p, stream));
  EP_CUDA_CHECK(ix::launch_dispatch_forward(p, stream));

  HandleCounts counts;
  counts.call_id = int64_t(call_id);
  counts.num_worst_tokens = a.num_worst_tokens;
  counts.send.assign(R, -1);
  counts.recv.assign(R, -1);
  counts.per_expert.assign(E / R, -1);
  counts.sent.assign(HandleCounts::matrix_size(R), -1);  // the records travel on the device only
  counts.internode = {NN, L, kDeviceRoute};
  int64_t M = a.num_worst_tokens;
  if (!worst) {  // the one host wait: the sizes of the outputs
    const ix::IxHostCtrl& h = buf.wait_for(p.ticket, op);
    if (!h.ok) raise_refusal(op, rank, h, buf, R);
    M = h.total_recv;
    for (int r = 0; r < R; ++r) {
      counts.send[r] = h.send[r];
      counts.recv[r] = h.recv[r];
    }
    if (!cached) counts.per_expert.assign(h.per_expert, h.per_expert + E / R);
    // Bytes of the fields a row carries (x | scales | ids | weights), as the host route counts them.
    const int64_t fields = row.x_bytes + 4 * S + (cached ? 0 : 8 * K) + (with_weights ? 4 * K : 0);
    uint64_t rail = 0, node = 0;
    for (int m = 0; m < NN; ++m)
      if (m != topo.node) rail += uint64_t(h.node_send[m] * fields);
    for (int s = 0; s < R; ++s)
      if (s % L != topo.local_rank) node += uint64_t(h.recv[s] * fields);
    group.count_hop_bytes(rail, node);
  } else if (mine.status != ix::kOk) {
    TORCH_CHECK_VALUE(false, op, " on rank ", rank, ": ", refusal(mine, buf));
  }

  DispatchOutputs o;
  const at::TensorOptions opts = a.x.options();
  o.recv_x = empty_output({M, H}, opts);
  o.recv_x_scales = S ? empty_output({M, S}, opts.dtype(at::kFloat)) : empty_output({0}, opts.dtype(at::kFloat));
  o.recv_topk_idx = cached ? empty_output({0}, opts.dtype(at::kLong)) : empty_output({M, K}, opts.dtype(at::kLong));
  o.recv_topk_weights = with_weights ? empty_output({M, K}, opts.dtype(at::kFloat)) : empty_output({0}, opts.dtype(at::kFloat));
  p.recv_x = static_cast<char*>(o.recv_x.data_ptr());
  p.recv_x_scales = S ? o.recv_x_scales.data_ptr<float>() : nullptr;
  p.recv_topk_idx = cached ? nullptr : o.recv_topk_idx.data_ptr<int64_t>();
  p.recv_topk_weights = with_weights ? o.recv_topk_weights.data_ptr<float>() : nullptr;
  p.out_rows = M;
  EP_CUDA_CHECK(ix::launch_dispatch_receive(p, stream));
  order.end();

  late.raise(op, rank);
  o.meta = cached || a.layout_meta ? empty_output({0}, meta.options()) : meta;
  o.counts = cached ? at::empty({0}, at::kLong) : counts.to_tensor();
  return o;
}

CombineOutputs combine_cuda_internode_device(ProcessGroupEP& group, InternodeTransport& transport,
                                             const CombineArgs& a) {
  const char* op = "combine";
  const Topology& topo = group.topology();
  const int R = topo.size, rank = topo.rank, L = topo.ranks_per_node, NN = topo.num_nodes;
  const int64_t N = a.num_tokens, H = a.x.size(1), E = a.num_experts;
  const int64_t K = a.topk_weights ? a.topk_weights->size(1) : 0;
  const HandleCounts& h = a.handle_counts;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.x.device().index()).stream();
  const bool capturing = stream_capturing(stream);
  const int64_t x_bytes = H * int64_t(a.x.element_size()), stride = r16(x_bytes) + r16(4 * K);
  InternodeBuffer& buf = buffer_for(group, transport, stride, stream, op);

  Tensor scratch;
  ix::IxParams p = call_params(group, buf, ix::kCombine, a.handle_meta, N, E, scratch);
  ix::IxRecordHeader& mine = p.mine;
  mine.op = ix::kCombine;
  mine.call_id = h.call_id;
  mine.num_experts = E;
  mine.hidden = H;
  mine.dtype = int64_t(a.x.scalar_type());
  mine.has_weights = K > 0;
  mine.num_tokens = a.x.size(0);
  // With num_worst_tokens x may hold fewer rows than this rank received (an overflowing dispatch):
  // the rows past it count as not sent, on every rank that reads them (internode_combine.cu).
  mine.worst_rows = h.num_worst_tokens > 0;
  // Zero copy: x is the region combine_buffer handed out, and this rank maps its node's ranks;
  // the notify reads it in place only where every rank of the node maps its peers.
  mine.maps_node = group.config().internode_node_p2p && buf.maps_node_peers();
  mine.zero_copy = mine.maps_node && a.x.data_ptr() == buf.combine_in() &&
                   a.x.size(0) * x_bytes <= buf.combine_in_bytes();
  if (!device_route_handle(h.internode, topo)) {
    mine.status = ix::kBadHandle;
  } else if (stride > buf.row_bytes()) {
    mine.status = ix::kRowTooWide;
    mine.detail = stride;
  }
  // As in dispatch: what a kernel reported since refuses this call on every rank.
  if (mine.status == ix::kOk && !capturing) mine.status = buf.take_pending(mine.detail);
  LateNotice late(buf, capturing);
  const bool host_waits = h.num_worst_tokens == 0 && !capturing;
  p.row_stride = stride;
  p.host_waits = host_waits;
  p.cached = true;  // no per-expert counts travel
  p.x = static_cast<const char*>(a.x.data_ptr());
  p.x_bytes = x_bytes;
  p.x_rows = a.x.size(0);
  p.x_in_place = reinterpret_cast<uintptr_t>(p.x) % 16 == 0;  // the row sums load 16-byte words
  p.topk_weights = K ? a.topk_weights->data_ptr<float>() : nullptr;
  p.num_topk = int(K);
  p.off_weights = r16(x_bytes);
  p.dtype = dtype_of(a.x.scalar_type());
  p.hidden = H;

  CombineOutputs o;
  o.combined_x = empty_output({N, H}, a.x.options());
  o.combined_topk_weights = K ? empty_output({N, K}, a.x.options().dtype(at::kFloat))
                              : empty_output({0}, a.x.options().dtype(at::kFloat));
  p.out = static_cast<char*>(o.combined_x.data_ptr());
  p.out_weights = K ? o.combined_topk_weights.data_ptr<float>() : nullptr;

  OrderedCall order(buf, stream, capturing);
  EP_CUDA_CHECK(ix::launch_node_layout(p, stream));
  EP_CUDA_CHECK(ix::launch_notify(p, stream));
  EP_CUDA_CHECK(ix::launch_combine_push(p, stream));
  EP_CUDA_CHECK(ix::launch_combine_reduce(p, stream));
  EP_CUDA_CHECK(ix::launch_combine_receive(p, stream));
  order.end();
  if (host_waits) {
    const ix::IxHostCtrl& c = buf.wait_for(p.ticket, op);
    if (!c.ok) raise_refusal(op, rank, c, buf, R);
    const int64_t fields = x_bytes + 4 * K;
    uint64_t rail = 0, node = 0;
    for (int m = 0; m < NN; ++m)
      if (m != topo.node) rail += uint64_t(c.relay[m] * fields);
    for (int s = 0; s < R; ++s)
      if (s % L != topo.local_rank) node += uint64_t(h.recv[s] * fields);
    group.count_hop_bytes(rail, node);
  } else if (mine.status != ix::kOk) {
    TORCH_CHECK_VALUE(false, op, " on rank ", rank, ": ", refusal(mine, buf));
  }
  late.raise(op, rank);
  return o;
}

Tensor combine_buffer_cuda_internode_device(ProcessGroupEP& group, const HandleCounts& h, int64_t rows,
                                            int64_t hidden, at::ScalarType dtype, const at::Device& device) {
  const char* op = "combine_buffer";
  // A handle of this route means its dispatch made the transport and allocated the buffer: no
  // collective step here (ranks may call this or not, each for itself).
  if (!device_route_handle(h.internode, group.topology())) return {};
  InternodeBuffer* buf = group.internode_transport(device, op)->moe_if_made();
  if (!buf || !buf->allocated() || !group.config().internode_node_p2p || !buf->maps_node_peers()) return {};
  buf->check(op);
  const int64_t bytes = rows * hidden * int64_t(c10::elementSize(dtype));
  if (bytes > buf->combine_in_bytes()) {
    TORCH_WARN_ONCE("combine_buffer: ", rows, " rows of hidden ", hidden, " (", dtype, ") take ", bytes,
                    " bytes, more than the ", buf->combine_in_bytes(), " of this group's zero-copy region; returning "
                    "a plain tensor (combine pushes its rows). Raise Options.internode_combine_rows "
                    "(TORCH_EP_INTERNODE_COMBINE_ROWS) for zero copy");
    return {};
  }
  // The caller's kernels write the region next: first the node's ranks must be done reading it.
  // In the buffer's call order: the wait reads the number of the last call that read the region,
  // which an earlier call on another stream may not have set yet.
  const ix::IxParams p = buf->params();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  OrderedCall order(*buf, stream, stream_capturing(stream));
  EP_CUDA_CHECK(ix::launch_combine_in_wait(p, stream));
  order.end();
  return at::from_blob(buf->combine_in(), {rows, hidden}, at::TensorOptions().dtype(dtype).device(device));
}

std::vector<Tensor> dispatch_buffer_cuda_internode_device(ProcessGroupEP& group, int64_t rows, int64_t hidden,
                                                          at::ScalarType dtype, const at::Device& device) {
  const char* op = "dispatch_buffer";
  // The buffer an earlier dispatch allocated (collectively), or none yet: a plain tensor. No
  // collective step here (ranks may call this or not, each for itself).
  const std::shared_ptr<InternodeTransport> transport = group.internode_transport_if_made();
  InternodeBuffer* buf = transport ? transport->moe_if_made() : nullptr;
  if (!buf || !buf->allocated()) return {};
  TORCH_CHECK_VALUE(transport->node().device() == device.index(), op, ": this 'ep' group runs on cuda:",
                    transport->node().device(), ", but device ", device, " was asked");
  buf->check(op);
  const int64_t W = buf->row_bytes(), x_bytes = hidden * int64_t(c10::elementSize(dtype));
  const int64_t S = dtype == at::kFloat8_e4m3fn ? (hidden + 127) / 128 : 0;
  // More rows than the capacity, or a payload wider than a row: the dispatch refuses it and says why.
  if (rows > buf->capacity() || r16(x_bytes) + r16(4 * S) > W) return {};
  // The caller's kernels write the rows next: first the node's ranks must be done reading them.
  const ix::IxParams p = buf->params();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  OrderedCall order(*buf, stream, stream_capturing(stream));  // as combine_buffer's wait
  EP_CUDA_CHECK(ix::launch_dispatch_in_wait(p, stream));
  order.end();
  char* pack = buf->dispatch_in();
  const at::TensorOptions opts = at::TensorOptions().device(device);
  std::vector<Tensor> views{at::from_blob(pack, {rows, hidden}, {W / int64_t(c10::elementSize(dtype)), 1},
                                          opts.dtype(dtype))};
  if (S) views.push_back(at::from_blob(pack + r16(x_bytes), {rows, S}, {W / 4, 1}, opts.dtype(at::kFloat)));
  return views;
}

}  // namespace ep::moe
#endif  // TORCH_EP_WITH_NVSHMEM
