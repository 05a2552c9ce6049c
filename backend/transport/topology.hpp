// Where the ranks of a group sit: which node each belongs to. Torch-free.
//
// A node is a block of `ranks_per_node` consecutive ranks that reach each other by NVLink/P2P
// (CUDA IPC) and share a host; between nodes traffic goes over the network (RDMA). The size
// comes, in order, from an override (Options.ranks_per_node / TORCH_EP_RANKS_PER_NODE, which
// lets one machine act as several nodes), from the launcher's LOCAL_WORLD_SIZE when every rank
// reports the same one, or from the ranks' host identities. Rank r is on node r / ranks_per_node
// at local index r % ranks_per_node; the ranks with one local index form a "rail".
#pragma once

#include <string>
#include <vector>

#include "backend/transport/rendezvous.hpp"

namespace ep {

struct Topology {
  int rank = 0;
  int size = 1;
  int ranks_per_node = 1;  // L
  int num_nodes = 1;
  int node = 0;            // rank / L
  int local_rank = 0;      // rank % L
  std::string source;      // where ranks_per_node came from: "override", "LOCAL_WORLD_SIZE", "hosts"
  // Set when the hosts form no regular layout (a host whose ranks are not one block of equal
  // size); then num_nodes is 1 and paths that need nodes raise with this text.
  std::string problem;

  int node_of(int r) const { return r / ranks_per_node; }
  int local_of(int r) const { return r % ranks_per_node; }
  int rank_of(int node_index, int local) const { return node_index * ranks_per_node + local; }
  bool multi_node() const { return num_nodes > 1; }
  // The ranks of this rank's node, and of its rail (same local index on every node).
  std::vector<int> node_ranks() const;
  std::vector<int> rail_ranks() const;
};

// A topology from a known node size; throws std::invalid_argument naming `source` when the
// group size is not a multiple of it.
Topology make_topology(int rank, int size, int ranks_per_node, const std::string& source);

// Collective over the ranks of `rdv` (one all_gather under `tag`): every rank must pass the
// same `override_ranks_per_node` (0: none). `launch_local_world_size` is the launcher's
// LOCAL_WORLD_SIZE where the group is the whole launch (else 0). Throws std::invalid_argument
// when the override does not fit the group or puts ranks of two hosts on one node.
Topology detect_topology(Rendezvous& rdv, int override_ranks_per_node, int launch_local_world_size,
                         const std::string& my_host, const std::string& tag);

// This process's host: hostname and boot id (containers can share a hostname).
std::string host_identity();

}  // namespace ep
