// Dispatch and combine across nodes: DeepEP's hierarchical route, on any device.
//
// A token crosses the network at most once per node. Source rank s (node n, local index l)
// sends each token once to every node m that owns one of its experts, to m's rank with the same
// local index l (s's "rail peer" there): the rail hop, RDMA between real nodes. That relay
// forwards it inside node m to each rank owning one of its experts: the node hop, NVLink. Rows
// then land in the contract order (source rank, then source token order), so the result is the
// intranode route's, and torch_ep.reference checks both. Combine takes the reverse route: each
// relay sums, in float32, the rows its node's ranks send back for a token and rounds that sum
// to x's dtype once (one row per node crosses the network, as in DeepEP); the source sums the
// nodes' rows in float32, node by node.
//
// Control stays flat: the dispatch/combine records (moe_protocol.hpp) go to every rank, since
// they are small; each record also tells a rail peer how many tokens it will relay.
// The algorithm is written once on ATen over packed rows (moe_rows.hpp); InternodeHops moves
// them: the host transport among rank subsets on CPU, NVSHMEM and CUDA IPC on CUDA.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "backend/ops/moe_ops.hpp"
#include "backend/ops/moe_protocol.hpp"
#include "backend/transport/topology.hpp"

namespace ep::moe {

// The transports of the two hops. Rows are [S, row_bytes] uint8 on the op's device, grouped by
// peer in peer order; the result holds what each peer sent, in peer order. Both sides know the
// sizes (the records told them), and the transports check that they agree.
class InternodeHops {
 public:
  virtual ~InternodeHops() = default;
  // Among the ranks of this rank's rail; peer m is the rail's rank on node m.
  virtual at::Tensor rail(const at::Tensor& rows, const std::vector<int64_t>& send, const std::vector<int64_t>& recv,
                          const char* op) = 0;
  // Among the ranks of this rank's node; peer j is the node's rank with local index j.
  virtual at::Tensor node(const at::Tensor& rows, const std::vector<int64_t>& send, const std::vector<int64_t>& recv,
                          const char* op) = 0;
  // One record to and from every rank of the group (records[p] goes to rank p).
  virtual std::vector<Record> records(const std::vector<Record>& mine, const char* op) = 0;
};

// What a relay keeps of a dispatch for combine and for re-dispatching along the handle; the tail
// of HandleCounts (`internode`): [num_nodes, ranks_per_node, relay_recv (num_nodes),
// relay_targets (T)].
struct InternodeRoute {
  int64_t num_nodes = 0;
  int64_t ranks_per_node = 0;
  std::vector<int64_t> relay_recv;     // [num_nodes] tokens relayed for this rank's rail peer on node m
  std::vector<int64_t> relay_targets;  // [T] per relayed token (node order, then source token order):
                                       // bit j set when local rank j of this node received it

  // Raises ValueError naming `op` when `tail` is no route of a group with this topology.
  static InternodeRoute parse(const std::vector<int64_t>& tail, const Topology& topology, const char* op);
  std::vector<int64_t> serialize() const;
  int64_t num_relayed() const;
};

// Bytes a call moved to other nodes (rail hop) and to other ranks of this node (node hop).
struct HopBytes {
  uint64_t rail = 0;
  uint64_t node = 0;
};

// `meta` is this rank's routing table on the op's device; `header` its header on the host (the
// sizes; null only for a dispatch along a handle).
DispatchOutputs dispatch_hierarchical(ProcessGroupEP& group, const DispatchArgs& a, const at::Tensor& meta,
                                      const int32_t* header, InternodeHops& hops, HopBytes* bytes);
CombineOutputs combine_hierarchical(ProcessGroupEP& group, const CombineArgs& a, InternodeHops& hops,
                                    HopBytes* bytes);

// The record exchange of the group's host channel (shared memory, or Gloo between hosts).
std::vector<Record> exchange_records_on_host(ProcessGroupEP& group, const std::vector<Record>& mine, const char* op);

// The CUDA route across nodes (backend/ops/cuda/moe_internode_cuda.cpp): the hops on the
// group's InternodeTransport. Raise where the build has no NVSHMEM.
DispatchOutputs dispatch_cuda_internode(ProcessGroupEP& group, const DispatchArgs& a);
CombineOutputs combine_cuda_internode(ProcessGroupEP& group, const CombineArgs& a);

}  // namespace ep::moe
