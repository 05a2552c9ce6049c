#include "backend/transport/nvshmem/internode_transport.hpp"

#include <algorithm>
#include <cstring>

#include "backend/common/errors.hpp"
#include "backend/transport/nvshmem/nvshmem_runtime.hpp"

namespace ep {

InternodeTransport::InternodeTransport(Rendezvous& group_rdv, const Topology& topology,
                                       const CudaTransportConfig& config, const std::string& tag, bool device_exchange)
    : topology_(topology),
      group_rdv_(group_rdv),
      node_rdv_(group_rdv, topology.node_ranks(), tag + "/node" + std::to_string(topology.node)) {
  if (!topology_.problem.empty()) throw CommError("torch_ep: " + topology_.problem);
  config_ = config;
  node_ = std::make_shared<CudaTransport>(node_rdv_, config, "transport");
  nvshmem::init_over(group_rdv, config.device);
  NvshmemExchangeConfig nc;
  nc.device = config.device;
  // The registered budget, spread over the peers' slots, at least 64 KiB a chunk. Two slots a
  // peer for the host-queued rounds; the device-driven exchange runs a block per peer and slot,
  // so more slots (smaller chunks) are more blocks at work, up to about 64 per direction in all
  // (the grid need not be resident at once: see kernels::ExchangeParams).
  const int remote_peers = std::max(topology.size - topology.ranks_per_node, 1);
  nc.num_slots = device_exchange ? std::clamp(64 / remote_peers, 2, 16) : 2;
  nc.chunk_bytes = std::max<size_t>(config.buffer_bytes / (size_t(nc.num_slots) * topology.size), 64 << 10);
  nc.device_driven = device_exchange;
  nc.timeout = config.timeout;
  net_ = std::make_unique<NvshmemExchange>(topology.rank, topology.size, nc);
}

InternodeBuffer& InternodeTransport::moe(int64_t capacity, int64_t min_row_bytes, int64_t combine_rows) {
  std::lock_guard<std::mutex> lock(moe_mutex_);
  if (!moe_)
    moe_ = std::make_unique<InternodeBuffer>(topology_, config_.device, config_.timeout, capacity, min_row_bytes,
                                             combine_rows);
  return *moe_;
}

InternodeBuffer* InternodeTransport::moe_if_made() {
  std::lock_guard<std::mutex> lock(moe_mutex_);
  return moe_.get();
}

void InternodeTransport::abort(const std::string& why) {
  node_->abort(why);
  net_->abort(why);
  if (InternodeBuffer* moe = moe_if_made()) moe->abort(why);
}

int64_t InternodeTransport::agree_on_max(const std::string& tag, int64_t mine) {
  std::vector<uint8_t> bytes(sizeof(mine));
  std::memcpy(bytes.data(), &mine, sizeof(mine));
  int64_t agreed = mine;
  for (const std::vector<uint8_t>& theirs : group_rdv_.all_gather(tag, bytes)) {
    int64_t value = 0;
    std::memcpy(&value, theirs.data(), std::min(theirs.size(), sizeof(value)));
    agreed = std::max(agreed, value);
  }
  return agreed;
}

}  // namespace ep
