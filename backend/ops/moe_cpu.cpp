// The MoE ops on CPU tensors, over the group's shared-memory transport: the same protocol as
// the CUDA path (a record exchange, then the rows), so CI runs the real logic with several
// processes. Data moves as one packed row per (token, destination rank):
//   dispatch row: x | fp8 scales | local expert ids (int64) | weights (float32)
//   combine row:  x | weights
#include <climits>
#include <cstring>

#include "backend/kernels/moe_meta.hpp"
#include "backend/ops/moe_ops.hpp"
#include "backend/ops/moe_internode.hpp"
#include "backend/ops/moe_protocol.hpp"
#include "backend/ops/moe_rows.hpp"
#include "backend/process_group/process_group_ep.hpp"

namespace ep::moe {
namespace {

using at::Tensor;
using kernels::MetaLayout;

}  // namespace

std::vector<Record> exchange_records_on_host(ProcessGroupEP& group, const std::vector<Record>& mine, const char* op) {
  std::vector<Record> theirs(mine.size());
  std::vector<SendBuffer> sends;
  std::vector<RecvBuffer> recvs;
  for (size_t p = 0; p < mine.size(); ++p) {
    sends.push_back({&mine[p], sizeof(Record)});
    recvs.push_back({&theirs[p], sizeof(Record)});
  }
  group.host_exchange(sends, recvs, op);
  return theirs;
}

namespace {

std::vector<Record> exchange_records(ProcessGroupEP& group, const std::vector<Record>& mine, const char* op) {
  return exchange_records_on_host(group, mine, op);
}

// Rows of `rows` ([S, row_bytes] uint8), `counts[p]` of them for rank p, each way.
Tensor exchange_rows(ProcessGroupEP& group, const Tensor& rows, int64_t row_bytes, const std::vector<int64_t>& send,
                     const std::vector<int64_t>& recv, int64_t recv_rows, const char* op) {
  Tensor out = at::empty({recv_rows, row_bytes}, at::kByte);
  std::vector<SendBuffer> sends;
  std::vector<RecvBuffer> recvs;
  const char* in_ptr = static_cast<const char*>(rows.data_ptr());
  char* out_ptr = static_cast<char*>(out.data_ptr());
  for (size_t p = 0; p < send.size(); ++p) {
    sends.push_back({in_ptr, size_t(send[p] * row_bytes)});
    recvs.push_back({out_ptr, size_t(recv[p] * row_bytes)});
    in_ptr += send[p] * row_bytes;
    out_ptr += recv[p] * row_bytes;
  }
  group.host_exchange(sends, recvs, op);
  return out;
}

// Token ids sent to each rank, in rank order then token order: the order of the packed rows.
Tensor send_order(const Tensor& meta, const MetaLayout& l, const std::vector<int64_t>& send) {
  std::vector<Tensor> parts;
  for (int64_t r = 0; r < l.num_ranks; ++r)
    parts.push_back(meta.narrow(0, l.send_tokens() + r * l.num_tokens, send[r]));
  return at::cat(parts).to(at::kLong);
}

// The hierarchical route's hops over the shared-memory transport: an exchange of the whole group
// in which only the hop's peers (the rail, or the node) get data. The logic is the CUDA path's.
class HostHops : public InternodeHops {
 public:
  explicit HostHops(ProcessGroupEP& group) : group_(group), topo_(group.topology()) {}
  Tensor rail(const Tensor& rows, const std::vector<int64_t>& send, const std::vector<int64_t>& recv,
              const char* op) override {
    std::vector<int> peers;
    for (int n = 0; n < topo_.num_nodes; ++n) peers.push_back(topo_.rank_of(n, topo_.local_rank));
    return among(peers, rows, send, recv, op);
  }
  Tensor node(const Tensor& rows, const std::vector<int64_t>& send, const std::vector<int64_t>& recv,
              const char* op) override {
    return among(topo_.node_ranks(), rows, send, recv, op);
  }
  std::vector<Record> records(const std::vector<Record>& mine, const char* op) override {
    return exchange_records(group_, mine, op);
  }

 private:
  Tensor among(const std::vector<int>& peers, const Tensor& rows, const std::vector<int64_t>& send,
               const std::vector<int64_t>& recv, const char* op) {
    std::vector<int64_t> send_all(topo_.size, 0), recv_all(topo_.size, 0);
    for (size_t i = 0; i < peers.size(); ++i) send_all[peers[i]] = send[i], recv_all[peers[i]] = recv[i];
    int64_t total = 0;
    for (int64_t n : recv) total += n;
    return exchange_rows(group_, rows, rows.size(1), send_all, recv_all, total, op);
  }
  ProcessGroupEP& group_;
  const Topology& topo_;
};

}  // namespace

Tensor layout_cpu(const Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, Tensor* is_token_in_rank) {
  const int64_t N = topk_idx.size(0), K = topk_idx.size(1);
  const MetaLayout l{num_ranks, num_experts, N};
  const int64_t per_rank = l.experts_per_rank();
  Tensor meta = at::zeros({l.size()}, at::kInt);
  int32_t* m = meta.data_ptr<int32_t>();
  std::fill(m + l.token_pos(), m + l.token_pos() + N * num_ranks, -1);
  int64_t lo = INT32_MAX, hi = INT32_MIN;
  const int64_t* idx = topk_idx.data_ptr<int64_t>();
  std::vector<char> goes(num_ranks);
  for (int64_t t = 0; t < N; ++t) {
    std::fill(goes.begin(), goes.end(), 0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = idx[t * K + k];
      lo = std::min(lo, e);
      hi = std::max(hi, e);
      if (e < 0 || e >= num_experts) continue;
      const int64_t r = e / per_rank;
      goes[r] = 1;
      m[l.pairs_per_expert() + e]++;
      bool repeated = false;  // a token counts once per expert, however many slots name it
      for (int64_t j = 0; j < k; ++j) repeated = repeated || idx[t * K + j] == e;
      if (!repeated) m[l.tokens_per_rank_expert() + e]++;  // [r, e - r*per_rank] is flat index e
    }
    for (int64_t r = 0; r < num_ranks; ++r) {
      if (!goes[r]) continue;
      int32_t& count = m[l.tokens_per_rank() + r];
      m[l.token_pos() + t * num_ranks + r] = count;
      m[l.send_tokens() + r * N + count] = int32_t(t);
      ++count;
    }
  }
  m[l.id_range()] = int32_t(std::max<int64_t>(lo, INT32_MIN));
  m[l.id_range() + 1] = int32_t(std::min<int64_t>(hi, INT32_MAX));
  if (is_token_in_rank)
    *is_token_in_rank = meta.narrow(0, l.token_pos(), N * num_ranks).view({N, num_ranks}).ge(0);
  return meta;
}

DispatchOutputs dispatch_cpu(ProcessGroupEP& group, const DispatchArgs& a) {
  const char* op = "dispatch";
  const int64_t R = group.getSize(), rank = group.getRank();
  const int64_t N = a.x.size(0), H = a.x.size(1), E = a.num_experts;
  const bool cached = a.handle_meta.has_value();
  const int64_t K = cached ? 0 : a.topk_idx->size(1);
  const MetaLayout l{R, E, N};
  const int64_t per_rank = l.experts_per_rank();

  const Tensor meta = cached ? *a.handle_meta : a.layout_meta ? *a.layout_meta : layout_cpu(*a.topk_idx, E, R, nullptr);
  const int32_t* m = meta.data_ptr<int32_t>();
  std::vector<int64_t> send(m + l.tokens_per_rank(), m + l.tokens_per_rank() + R);
  if (group.topology().multi_node()) {
    HostHops hops(group);
    HopBytes bytes;
    DispatchOutputs o = dispatch_hierarchical(group, a, meta, cached ? nullptr : m, hops, &bytes);
    group.count_hop_bytes(bytes.rail, bytes.node);
    return o;
  }

  // 1. Records: what each peer receives, and whether this rank's input is sound.
  const uint64_t call_id = group.next_dispatch_id();
  const std::vector<Record> mine = dispatch_records(a, R, call_id, m);
  const std::vector<Record> theirs = exchange_records(group, mine, op);
  check_records(op, int(rank), mine[rank], theirs);
  const HandleCounts counts = dispatch_counts(a, rank, call_id, send, theirs);
  int64_t M = 0;
  for (int64_t n : counts.recv) M += n;

  // 2. Rows: pack what each rank gets, exchange, unpack.
  const Tensor order = send_order(meta, l, send);
  std::vector<Tensor> parts{as_bytes(a.x.index_select(0, order))};
  if (a.x_scales) parts.push_back(as_bytes(a.x_scales->index_select(0, order)));
  if (!cached) {
    const Tensor target = at::repeat_interleave(at::arange(R, at::kLong), at::tensor(send, at::kLong)).unsqueeze(1);
    const Tensor ids = a.topk_idx->index_select(0, order);
    const Tensor owned = ids.ge(0).logical_and(ids.div(per_rank, "floor").eq(target));
    parts.push_back(as_bytes(at::where(owned, ids - target * per_rank, at::full_like(ids, -1))));
    if (a.topk_weights)
      parts.push_back(as_bytes(at::where(owned, a.topk_weights->index_select(0, order), at::zeros({}, at::kFloat))));
  }
  const Tensor packed = at::cat(parts, 1).contiguous();
  const int64_t row_bytes = packed.size(1);
  const Tensor rows = exchange_rows(group, packed, row_bytes, send, counts.recv, M, op);

  DispatchOutputs o = unpack_dispatch_rows(rows, a, cached, rank, counts.call_id);
  // A dispatch along a handle gives no new handle: the caller keeps the one it passed.
  o.meta = cached || a.layout_meta ? placeholder(a.placeholders, at::kInt) : meta;  // the caller keeps the table it gave
  o.counts = cached ? placeholder(a.placeholders, at::kLong) : counts.to_tensor();
  return o;
}

CombineOutputs combine_cpu(ProcessGroupEP& group, const CombineArgs& a) {
  const char* op = "combine";
  const int64_t R = group.getSize(), rank = group.getRank();
  const int64_t N = a.num_tokens, H = a.x.size(1), E = a.num_experts;
  const MetaLayout l{R, E, N};
  const HandleCounts& h = a.handle_counts;
  if (group.topology().multi_node()) {
    HostHops hops(group);
    HopBytes bytes;
    CombineOutputs o = combine_hierarchical(group, a, hops, &bytes);
    group.count_hop_bytes(bytes.rail, bytes.node);
    return o;
  }

  const std::vector<Record> mine = combine_records(a, R);
  const std::vector<Record> theirs = exchange_records(group, mine, op);
  check_records(op, int(rank), mine[rank], theirs);
  check_combine_counts(a, rank, theirs);

  int64_t M = 0, S = 0;
  for (int64_t p = 0; p < R; ++p) M += h.recv[p], S += h.send[p];
  std::vector<Tensor> parts{as_bytes(a.x.narrow(0, 0, M))};
  if (a.topk_weights) parts.push_back(as_bytes(a.topk_weights->narrow(0, 0, M)));
  const Tensor packed = parts.size() == 1 ? parts[0] : at::cat(parts, 1).contiguous();
  const int64_t row_bytes = packed.size(1);
  const Tensor rows = exchange_rows(group, packed, row_bytes, h.recv, h.send, S, op);

  // Sum in float32, rank by rank in order: the result does not depend on timing.
  const Tensor order = send_order(a.handle_meta, l, h.send);
  int64_t at = 0;
  const Tensor back_x = unpack(rows, at, H, a.x.scalar_type());
  CombineOutputs o;
  o.combined_x = at::zeros({N, H}, at::kFloat).index_add_(0, order, back_x.to(at::kFloat)).to(a.x.scalar_type());
  if (a.topk_weights) {
    const int64_t K = a.topk_weights->size(1);
    o.combined_topk_weights = at::zeros({N, K}, at::kFloat).index_add_(0, order, unpack(rows, at, K, at::kFloat));
  } else {
    o.combined_topk_weights = placeholder(a.placeholders, at::kFloat);
  }
  return o;
}

}  // namespace ep::moe
