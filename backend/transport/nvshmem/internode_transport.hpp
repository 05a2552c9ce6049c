// A group's transports across nodes (CUDA tensors): CUDA IPC among the ranks of this rank's node
// (the intranode CudaTransport over a node-sized rendezvous), and NVSHMEM puts to every other
// rank (NvshmemExchange: RDMA between real nodes). Created collectively by the first CUDA call
// that needs it; NVSHMEM is initialised over the group's store where nothing initialised it yet.
// Header without NVSHMEM types.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "backend/transport/cuda/cuda_transport.hpp"
#include "backend/transport/nvshmem/internode_buffer.hpp"
#include "backend/transport/nvshmem/nvshmem_exchange.hpp"
#include "backend/transport/subset_rendezvous.hpp"
#include "backend/transport/topology.hpp"

namespace ep {

class InternodeTransport {
 public:
  // Collective over every rank of `group_rdv` (whose rendezvous must outlive this).
  // `device_exchange`: all_to_all's NVSHMEM hop in one launch (NvshmemExchangeConfig::device_driven).
  InternodeTransport(Rendezvous& group_rdv, const Topology& topology, const CudaTransportConfig& config,
                     const std::string& tag, bool device_exchange = false);
  const Topology& topology() const { return topology_; }
  // Peers indexed by local rank.
  CudaTransport& node() { return *node_; }
  std::shared_ptr<CudaTransport> node_shared() { return node_; }
  // Peers indexed by group rank (= NVSHMEM PE).
  NvshmemExchange& net() { return *net_; }
  // The buffer of the device-driven dispatch/combine; made (not yet allocated) on first use.
  InternodeBuffer& moe(int64_t capacity, int64_t min_row_bytes, int64_t combine_rows);
  InternodeBuffer* moe_if_made();
  // Aborts every transport of the group across nodes (`why`): later calls raise, and the
  // kernels' waits end at once. Any thread.
  void abort(const std::string& why);
  // The largest of every rank's `mine` (collective, over the group's store): what sizes a
  // symmetric allocation, which must be the same size on every rank.
  int64_t agree_on_max(const std::string& tag, int64_t mine);

 private:
  Topology topology_;
  Rendezvous& group_rdv_;
  SubsetRendezvous node_rdv_;
  std::shared_ptr<CudaTransport> node_;
  std::unique_ptr<NvshmemExchange> net_;
  CudaTransportConfig config_;
  std::mutex moe_mutex_;  // moe_'s creation against abort() from another thread
  std::unique_ptr<InternodeBuffer> moe_;
};

}  // namespace ep
