#include "backend/ops/moe_internode.hpp"

#include <c10/util/Exception.h>

#include <numeric>
#include <optional>

#include "backend/kernels/moe_meta.hpp"
#include "backend/ops/moe_rows.hpp"
#include "backend/process_group/process_group_ep.hpp"

namespace ep::moe {
namespace {

using at::Tensor;
using kernels::MetaLayout;

int64_t sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t(0)); }

std::vector<int64_t> to_vector(const Tensor& t) {
  const Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

Tensor long_tensor(const std::vector<int64_t>& v, const at::Device& device) {
  return at::tensor(v, at::kLong).to(device);
}

// The tokens this rank sends to each node, grouped by node, in token order: [S] token ids and
// how many go to each node. A token goes to a node when any of the node's ranks owns one of its
// experts (the routing table's token_pos says which ranks do).
std::pair<Tensor, std::vector<int64_t>> tokens_by_node(const Tensor& meta, const MetaLayout& l, const Topology& t) {
  const int64_t N = l.num_tokens;
  const Tensor in_node = meta.narrow(0, l.token_pos(), N * l.num_ranks)
                             .view({N, int64_t(t.num_nodes), int64_t(t.ranks_per_node)})
                             .ge(0)
                             .any(2);                    // [N, nodes]
  const Tensor nz = in_node.t().contiguous().nonzero();  // (node, token), row-major: by node, then token
  return {nz.select(1, 1).contiguous(), to_vector(at::bincount(nz.select(1, 0), {}, t.num_nodes))};
}

// Received rows of the node hop come by relay l, then by source node, then in source token order;
// the contract wants them by source rank s = node * L + l. Returns, for each contract row, its
// index among the received rows. `from_rank[s]` is how many rows came from source s.
std::vector<int64_t> contract_order(const std::vector<int64_t>& from_rank, const Topology& t) {
  const int L = t.ranks_per_node;
  std::vector<int64_t> block_start(from_rank.size());  // where source s's rows start among the received
  int64_t at = 0;
  for (int l = 0; l < L; ++l)
    for (int n = 0; n < t.num_nodes; ++n) {
      block_start[t.rank_of(n, l)] = at;
      at += from_rank[t.rank_of(n, l)];
    }
  std::vector<int64_t> order;
  order.reserve(size_t(at));
  for (size_t s = 0; s < from_rank.size(); ++s)
    for (int64_t i = 0; i < from_rank[s]; ++i) order.push_back(block_start[s] + i);
  return order;
}

// Rows each relay l of this node sends here: the rows of the sources on its rail.
std::vector<int64_t> per_relay(const std::vector<int64_t>& from_rank, const Topology& t) {
  std::vector<int64_t> out(t.ranks_per_node, 0);
  for (size_t s = 0; s < from_rank.size(); ++s) out[t.local_of(int(s))] += from_rank[s];
  return out;
}

// [T, L] bool from the relay bitmasks.
Tensor targets_from_bits(const std::vector<int64_t>& bits, int64_t L, const at::Device& device) {
  const Tensor b = long_tensor(bits, device);
  return b.unsqueeze(1).bitwise_right_shift(at::arange(L, b.options())).bitwise_and(1).ne(0);
}

// (local index of the receiving rank, relayed token) of every forwarded row, by rank then token.
std::pair<Tensor, Tensor> forward_order(const Tensor& targets) {
  const Tensor nz = targets.t().contiguous().nonzero();
  return {nz.select(1, 0).contiguous(), nz.select(1, 1).contiguous()};
}

uint64_t bytes_off(const std::vector<int64_t>& rows, int self, int64_t row_bytes) {
  uint64_t total = 0;
  for (size_t p = 0; p < rows.size(); ++p)
    if (int(p) != self) total += uint64_t(rows[p] * row_bytes);
  return total;
}

}  // namespace

InternodeRoute InternodeRoute::parse(const std::vector<int64_t>& tail, const Topology& t, const char* op) {
  TORCH_CHECK_VALUE(!tail.empty(), op, ": handle: it was made by a dispatch on the intranode route, but this group "
                    "spans ", t.num_nodes, " nodes; was it made on another group?");
  TORCH_CHECK_VALUE(tail.size() >= 2 && tail[0] == t.num_nodes && tail[1] == t.ranks_per_node &&
                        int64_t(tail.size()) >= 2 + tail[0],
                    op, ": handle: its relay state is for another topology than this group's ", t.num_nodes,
                    " nodes of ", t.ranks_per_node, " ranks");
  InternodeRoute r;
  r.num_nodes = tail[0];
  r.ranks_per_node = tail[1];
  r.relay_recv.assign(tail.begin() + 2, tail.begin() + 2 + r.num_nodes);
  r.relay_targets.assign(tail.begin() + 2 + r.num_nodes, tail.end());
  TORCH_CHECK_VALUE(int64_t(r.relay_targets.size()) == sum(r.relay_recv), op,
                    ": handle: its relay state is damaged (", r.relay_targets.size(), " tokens for ",
                    sum(r.relay_recv), " relayed)");
  return r;
}

std::vector<int64_t> InternodeRoute::serialize() const {
  std::vector<int64_t> v{num_nodes, ranks_per_node};
  v.insert(v.end(), relay_recv.begin(), relay_recv.end());
  v.insert(v.end(), relay_targets.begin(), relay_targets.end());
  return v;
}

int64_t InternodeRoute::num_relayed() const { return sum(relay_recv); }

DispatchOutputs dispatch_hierarchical(ProcessGroupEP& group, const DispatchArgs& a, const Tensor& meta,
                                      const int32_t* header, InternodeHops& hops, HopBytes* bytes) {
  const char* op = "dispatch";
  const Topology& topo = group.topology();
  const int64_t R = topo.size, rank = topo.rank, L = topo.ranks_per_node, NN = topo.num_nodes;
  const int64_t N = a.x.size(0), H = a.x.size(1), E = a.num_experts, per_rank = E / R;
  const bool cached = a.handle_meta.has_value();
  const int64_t K = cached ? 0 : a.topk_idx->size(1);
  const MetaLayout l{R, E, N};
  const at::Device device = a.x.device();

  // 1. Which tokens go to which node, and the records: sizes, checks, and how many tokens each
  //    rail peer relays.
  auto [rail_order, node_send] = tokens_by_node(meta, l, topo);
  std::vector<int64_t> send(R);
  for (int64_t p = 0; p < R; ++p) send[p] = cached ? a.handle_counts->send[p] : header[l.tokens_per_rank() + p];
  const uint64_t call_id = group.next_dispatch_id();
  std::vector<Record> mine = dispatch_records(a, R, call_id, header);
  std::optional<InternodeRoute> route;
  if (cached) try {
      route = InternodeRoute::parse(a.handle_counts->internode, topo, op);
    } catch (const c10::ValueError& e) {
      for (Record& r : mine) set_rejected(r, e.what_without_backtrace());
    }
  for (int64_t m = 0; m < NN; ++m) mine[topo.rank_of(int(m), topo.local_rank)].relay_rows = node_send[m];
  const std::vector<Record> theirs = hops.records(mine, op);
  check_records(op, int(rank), mine[rank], theirs);
  HandleCounts counts = dispatch_counts(a, rank, call_id, send, theirs);
  std::vector<int64_t> relay_recv(NN);
  for (int64_t m = 0; m < NN; ++m) relay_recv[m] = theirs[topo.rank_of(int(m), topo.local_rank)].relay_rows;
  if (route)
    TORCH_CHECK(route->relay_recv == relay_recv, op, ": rank ", rank, " relays other tokens than the handle's "
                "dispatch did; every rank must pass the handle of the same dispatch");

  // 2. Rail hop: each token once to its rail peer on every node it goes to, with its global
  //    expert ids and weights, so that the relay can route it inside its node.
  std::vector<Tensor> parts{as_bytes(a.x.index_select(0, rail_order))};
  if (a.x_scales) parts.push_back(as_bytes(a.x_scales->index_select(0, rail_order)));
  const int64_t payload_bytes = parts.size() == 1 ? parts[0].size(1) : parts[0].size(1) + parts[1].size(1);
  if (!cached) {
    parts.push_back(as_bytes(a.topk_idx->index_select(0, rail_order)));
    if (a.topk_weights) parts.push_back(as_bytes(a.topk_weights->index_select(0, rail_order)));
  }
  const Tensor rail_rows = at::cat(parts, 1).contiguous();
  const Tensor relayed = hops.rail(rail_rows, node_send, relay_recv, op);  // [T, row]: by node, then token

  // 3. Relay: which of this node's ranks each relayed token goes to.
  Tensor targets, ids, weights;
  if (!cached) {
    int64_t at = payload_bytes;
    ids = unpack(relayed, at, K, at::kLong);
    if (a.topk_weights) weights = unpack(relayed, at, K, at::kFloat);
    const Tensor local = ids.div(per_rank, "floor") - int64_t(topo.node) * L;  // owner's local index
    const Tensor valid = ids.ge(0).logical_and(local.ge(0)).logical_and(local.lt(L));
    targets = local.unsqueeze(2).eq(at::arange(L, ids.options()).view({1, 1, L})).logical_and(valid.unsqueeze(2)).any(1);
  } else {
    targets = targets_from_bits(route->relay_targets, L, device);
  }

  // 4. Node hop: the rows each rank of the node gets, with the ids of its own experts made local.
  auto [fwd_local, fwd_token] = forward_order(targets);
  const std::vector<int64_t> nv_send = to_vector(at::bincount(fwd_local, {}, L));
  std::vector<Tensor> fwd{relayed.narrow(1, 0, payload_bytes).index_select(0, fwd_token)};
  if (!cached) {
    const Tensor fids = ids.index_select(0, fwd_token);
    const Tensor target = (fwd_local + int64_t(topo.node) * L).unsqueeze(1);
    const Tensor owned = fids.ge(0).logical_and(fids.div(per_rank, "floor").eq(target));
    fwd.push_back(as_bytes(at::where(owned, fids - target * per_rank, at::full_like(fids, -1))));
    if (a.topk_weights)
      fwd.push_back(as_bytes(at::where(owned, weights.index_select(0, fwd_token), at::zeros({}, weights.options()))));
  }
  const Tensor node_rows = at::cat(fwd, 1).contiguous();
  const Tensor got = hops.node(node_rows, nv_send, per_relay(counts.recv, topo), op);
  const Tensor rows = got.index_select(0, long_tensor(contract_order(counts.recv, topo), device));
  if (bytes) {
    bytes->rail += bytes_off(node_send, topo.node, rail_rows.size(1));
    bytes->node += bytes_off(nv_send, topo.local_rank, node_rows.size(1));
  }

  // 5. Outputs, as the intranode route gives them.
  DispatchOutputs o = unpack_dispatch_rows(rows, a, cached, rank, counts.call_id);
  o.meta = cached || a.layout_meta ? at::empty({0}, meta.options()) : meta;
  if (cached) {
    o.counts = at::empty({0}, at::kLong);
  } else {
    InternodeRoute r;
    r.num_nodes = NN;
    r.ranks_per_node = L;
    r.relay_recv = relay_recv;
    const Tensor bit = at::ones({L}, targets.options().dtype(at::kLong))
                           .bitwise_left_shift(at::arange(L, targets.options().dtype(at::kLong)));
    r.relay_targets = to_vector(targets.to(at::kLong).mul(bit).sum(1));
    counts.internode = r.serialize();
    o.counts = counts.to_tensor();
  }
  return o;
}

CombineOutputs combine_hierarchical(ProcessGroupEP& group, const CombineArgs& a, InternodeHops& hops,
                                    HopBytes* bytes) {
  const char* op = "combine";
  const Topology& topo = group.topology();
  const int64_t R = topo.size, rank = topo.rank, L = topo.ranks_per_node;
  const int64_t N = a.num_tokens, H = a.x.size(1), E = a.num_experts;
  const MetaLayout l{R, E, N};
  const HandleCounts& h = a.handle_counts;
  const at::Device device = a.x.device();

  std::vector<Record> mine = combine_records(a, R);
  std::optional<InternodeRoute> route;
  try {
    route = InternodeRoute::parse(h.internode, topo, op);
  } catch (const c10::ValueError& e) {
    for (Record& r : mine) set_rejected(r, e.what_without_backtrace());
  }
  const std::vector<Record> theirs = hops.records(mine, op);
  check_records(op, int(rank), mine[rank], theirs);
  check_combine_counts(a, rank, theirs);

  // 1. Node hop back: each row to the relay it came from, in the order it came.
  const int64_t M = sum(h.recv);
  const std::vector<int64_t> to_contract = contract_order(h.recv, topo);
  std::vector<int64_t> came(to_contract.size());  // contract row -> received index, inverted
  for (size_t i = 0; i < to_contract.size(); ++i) came[size_t(to_contract[i])] = int64_t(i);
  const Tensor back_index = long_tensor(came, device);
  std::vector<Tensor> parts{as_bytes(a.x.narrow(0, 0, M).index_select(0, back_index))};
  if (a.topk_weights) parts.push_back(as_bytes(a.topk_weights->narrow(0, 0, M).index_select(0, back_index)));
  const Tensor node_rows = parts.size() == 1 ? parts[0] : at::cat(parts, 1).contiguous();
  const Tensor targets = targets_from_bits(route->relay_targets, L, device);
  auto [fwd_local, fwd_token] = forward_order(targets);
  const std::vector<int64_t> nv_sent = to_vector(at::bincount(fwd_local, {}, L));
  const std::vector<int64_t> nv_back = per_relay(h.recv, topo);
  const Tensor got = hops.node(node_rows, nv_back, nv_sent, op);  // by rank j, then relayed token

  // 2. Relay: one row per relayed token, the float32 sum of its node's rows (rank by rank),
  //    rounded to x's dtype once.
  const int64_t T = route->num_relayed();
  int64_t at = 0;
  const Tensor got_x = unpack(got, at, H, a.x.scalar_type());
  std::vector<Tensor> rail_parts{
      as_bytes(at::zeros({T, H}, a.x.options().dtype(at::kFloat)).index_add_(0, fwd_token, got_x.to(at::kFloat))
                   .to(a.x.scalar_type()))};
  const int64_t K = a.topk_weights ? a.topk_weights->size(1) : 0;
  if (a.topk_weights)
    rail_parts.push_back(as_bytes(
        at::zeros({T, K}, a.x.options().dtype(at::kFloat)).index_add_(0, fwd_token, unpack(got, at, K, at::kFloat))));
  const Tensor rail_rows = rail_parts.size() == 1 ? rail_parts[0] : at::cat(rail_parts, 1).contiguous();

  // 3. Rail hop back: each node's row to the token's source, which sums them node by node.
  auto [rail_order, node_send] = tokens_by_node(a.handle_meta, l, topo);
  const Tensor back = hops.rail(rail_rows, route->relay_recv, node_send, op);
  if (bytes) {
    bytes->node += bytes_off(nv_back, topo.local_rank, node_rows.size(1));
    bytes->rail += bytes_off(route->relay_recv, topo.node, rail_rows.size(1));
  }
  at = 0;
  const Tensor back_x = unpack(back, at, H, a.x.scalar_type());
  CombineOutputs o;
  o.combined_x = at::zeros({N, H}, a.x.options().dtype(at::kFloat)).index_add_(0, rail_order, back_x.to(at::kFloat))
                     .to(a.x.scalar_type());
  o.combined_topk_weights =
      a.topk_weights
          ? at::zeros({N, K}, a.x.options().dtype(at::kFloat)).index_add_(0, rail_order, unpack(back, at, K, at::kFloat))
          : at::empty({0}, a.x.options().dtype(at::kFloat));
  return o;
}

}  // namespace ep::moe
