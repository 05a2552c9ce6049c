#include "backend/transport/topology.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "backend/common/errors.hpp"

namespace ep {

std::vector<int> Topology::node_ranks() const {
  std::vector<int> out;
  for (int l = 0; l < ranks_per_node; ++l) out.push_back(rank_of(node, l));
  return out;
}

std::vector<int> Topology::rail_ranks() const {
  std::vector<int> out;
  for (int n = 0; n < num_nodes; ++n) out.push_back(rank_of(n, local_rank));
  return out;
}

Topology make_topology(int rank, int size, int ranks_per_node, const std::string& source) {
  if (ranks_per_node < 1 || size % ranks_per_node != 0)
    throw std::invalid_argument("torch_ep: ranks_per_node=" + std::to_string(ranks_per_node) + " (from " + source +
                                ") must divide the group size " + std::to_string(size) +
                                ": nodes are blocks of equal size");
  Topology t;
  t.rank = rank;
  t.size = size;
  t.ranks_per_node = ranks_per_node;
  t.num_nodes = size / ranks_per_node;
  t.node = rank / ranks_per_node;
  t.local_rank = rank % ranks_per_node;
  t.source = source;
  return t;
}

std::string host_identity() {
  char name[256] = {0};
  gethostname(name, sizeof(name) - 1);
  char boot_id[64] = {0};
  if (FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "r")) {
    if (!std::fgets(boot_id, sizeof(boot_id), f)) boot_id[0] = 0;
    std::fclose(f);
  }
  return std::string(name) + "/" + boot_id;
}

namespace {

// What each rank publishes: its override, its LOCAL_WORLD_SIZE (0: none) and its host.
struct Announcement {
  int32_t override_ranks_per_node;
  int32_t local_world_size;
  char host[248];
};

std::string host_name(const std::string& identity) { return identity.substr(0, identity.find('/')); }

}  // namespace

Topology detect_topology(Rendezvous& rdv, int override_ranks_per_node, int launch_local_world_size,
                         const std::string& my_host, const std::string& tag) {
  const int rank = rdv.rank(), size = rdv.size();
  Announcement mine{};
  mine.override_ranks_per_node = override_ranks_per_node;
  mine.local_world_size = launch_local_world_size;
  std::strncpy(mine.host, my_host.c_str(), sizeof(mine.host) - 1);
  const auto* p = reinterpret_cast<const uint8_t*>(&mine);
  std::vector<Announcement> all(size);
  auto gathered = rdv.all_gather(tag, std::vector<uint8_t>(p, p + sizeof(mine)));
  for (int r = 0; r < size; ++r) std::memcpy(&all[r], gathered[r].data(), sizeof(Announcement));
  auto host = [&](int r) { return std::string(all[r].host, strnlen(all[r].host, sizeof(all[r].host))); };

  // Every rank of a node must be on one host: CUDA IPC and shared memory stop at the host.
  auto check_hosts = [&](const Topology& t) {
    for (int r = 0; r < size; ++r)
      if (host(r) != host(t.rank_of(t.node_of(r), 0)))
        throw std::invalid_argument(
            "torch_ep: ranks_per_node=" + std::to_string(t.ranks_per_node) + " (from " + t.source + ") puts rank " +
            std::to_string(r) + " (host " + host_name(host(r)) + ") on one node with rank " +
            std::to_string(t.rank_of(t.node_of(r), 0)) + " (host " + host_name(host(t.rank_of(t.node_of(r), 0))) +
            "); a node's ranks must share a host");
    return t;
  };

  if (override_ranks_per_node > 0) {
    for (int r = 0; r < size; ++r)
      if (all[r].override_ranks_per_node != override_ranks_per_node)
        throw std::invalid_argument("torch_ep: the ranks disagree on ranks_per_node (Options.ranks_per_node / "
                                    "TORCH_EP_RANKS_PER_NODE): rank " + std::to_string(rank) + " has " +
                                    std::to_string(override_ranks_per_node) + ", rank " + std::to_string(r) + " has " +
                                    std::to_string(all[r].override_ranks_per_node));
    return check_hosts(make_topology(rank, size, override_ranks_per_node, "ranks_per_node override"));
  }
  bool launcher = all[0].local_world_size > 0 && size % all[0].local_world_size == 0;
  for (int r = 0; r < size && launcher; ++r) launcher = all[r].local_world_size == all[0].local_world_size;
  if (launcher) {
    Topology t = make_topology(rank, size, all[0].local_world_size, "LOCAL_WORLD_SIZE");
    bool fits = true;  // a launcher that lied (or a group that is not the launch) falls to hosts
    for (int r = 0; r < size && fits; ++r) fits = host(r) == host(t.rank_of(t.node_of(r), 0));
    if (fits) return t;
  }
  // Hosts: each must hold one block of consecutive ranks, all blocks of one size.
  int block = 1;
  while (block < size && host(block) == host(0)) ++block;
  Topology t = make_topology(rank, size, size, "hosts");
  if (size % block == 0) {
    Topology candidate = make_topology(rank, size, block, "hosts");
    bool regular = true;
    for (int r = 0; r < size && regular; ++r) {
      const int first = candidate.rank_of(candidate.node_of(r), 0);
      regular = host(r) == host(first) && (candidate.node_of(r) == 0 || host(first) != host(first - 1));
    }
    if (regular) return candidate;
  }
  t.problem = "the group's ranks sit on their hosts in no regular layout (each host must hold one block of "
              "consecutive ranks, every block of the same size); launch with one block per host, or set "
              "TORCH_EP_RANKS_PER_NODE";
  return t;
}

}  // namespace ep
