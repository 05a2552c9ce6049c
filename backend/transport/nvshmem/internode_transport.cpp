#include "backend/transport/nvshmem/internode_transport.hpp"

#include <algorithm>

#include "backend/common/errors.hpp"
#include "backend/kernels/internode_exchange.cuh"
#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/nvshmem/experimental_env.hpp"
#include "backend/transport/nvshmem/nvshmem_runtime.hpp"

namespace ep {
namespace {

// The SMs this rank's kernels may occupy: the SM budget where one is set, and no more than its
// MPS share of the GPU (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, rounded down to whole TPCs of 2 SMs,
// as the share may be), else every SM.
int resident_sms(int num_sms, int device) {
  int sms = 0;
  EP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const char* mps = std::getenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE");
  const int percent = mps ? std::atoi(mps) : 100;
  if (percent > 0 && percent < 100) sms = std::max(2, sms * percent / 100 / 2 * 2);
  return num_sms > 0 ? std::min(num_sms, sms) : sms;
}

}  // namespace

InternodeTransport::InternodeTransport(Rendezvous& group_rdv, const Topology& topology,
                                       const CudaTransportConfig& config, const std::string& tag, bool device_exchange)
    : topology_(topology),
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
  // (a grid small enough to be resident at once: blocks wait on the peer's).
  const int remote_peers = std::max(topology.size - topology.ranks_per_node, 1);
  nc.num_slots = device_exchange ? std::clamp(64 / remote_peers, 2, 16) : 2;
  // TORCH_EP_EXCHANGE_THREADS (experimental, experimental_env.hpp): the device-driven kernel's
  // block; then no more slots than keep its grid (2 x remote peers x slots) resident on this
  // rank's SMs at that block's occupancy. The default keeps the slots above.
  nc.threads = device_exchange ? experimental_threads("TORCH_EP_EXCHANGE_THREADS", {256, 512, 1024}) : 0;
  if (nc.threads > 0) {
    const int fit = kernels::exchange_blocks_per_sm(nc.threads) * resident_sms(config.num_sms, config.device);
    nc.num_slots = std::clamp(std::min(nc.num_slots, fit / (2 * remote_peers)), 1, 16);
  }
  nc.chunk_bytes = std::max<size_t>(config.buffer_bytes / (size_t(nc.num_slots) * topology.size), 64 << 10);
  nc.device_driven = device_exchange;
  nc.timeout = config.timeout;
  net_ = std::make_unique<NvshmemExchange>(topology.rank, topology.size, nc);
}

InternodeBuffer& InternodeTransport::moe(int64_t capacity, int64_t min_row_bytes, int64_t combine_rows) {
  if (!moe_)
    moe_ = std::make_unique<InternodeBuffer>(topology_, config_.device, config_.timeout, capacity, min_row_bytes,
                                             combine_rows);
  return *moe_;
}

}  // namespace ep
