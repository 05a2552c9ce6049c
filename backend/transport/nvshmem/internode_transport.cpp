#include "backend/transport/nvshmem/internode_transport.hpp"

#include <algorithm>

#include "backend/common/errors.hpp"
#include "backend/transport/nvshmem/nvshmem_runtime.hpp"

namespace ep {

InternodeTransport::InternodeTransport(Rendezvous& group_rdv, const Topology& topology,
                                       const CudaTransportConfig& config, const std::string& tag)
    : topology_(topology),
      node_rdv_(group_rdv, topology.node_ranks(), tag + "/node" + std::to_string(topology.node)) {
  if (!topology_.problem.empty()) throw CommError("torch_ep: " + topology_.problem);
  config_ = config;
  node_ = std::make_shared<CudaTransport>(node_rdv_, config, "transport");
  nvshmem::init_over(group_rdv, config.device);
  NvshmemExchangeConfig nc;
  nc.device = config.device;
  // The registered budget, spread over the peers' slots (two each), at least 64 KiB a chunk.
  nc.chunk_bytes = std::max<size_t>(config.buffer_bytes / (2 * size_t(topology.size)), 64 << 10);
  nc.num_slots = 2;
  nc.timeout = config.timeout;
  net_ = std::make_unique<NvshmemExchange>(topology.rank, topology.size, nc);
}

InternodeBuffer& InternodeTransport::moe(int64_t capacity, int64_t min_row_bytes) {
  if (!moe_) moe_ = std::make_unique<InternodeBuffer>(topology_, config_.device, config_.timeout, capacity, min_row_bytes);
  return *moe_;
}

}  // namespace ep
