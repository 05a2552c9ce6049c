// ProcessGroupEP: the c10d backend registered as "ep".
//
// all_to_all_single (alltoall_base) and all_to_all run on torch_ep's transports: CPU tensors on
// the shared-memory HostTransport when every rank is on one host. Every other collective goes
// to an inner backend built on the same Store: Gloo for CPU tensors; for CUDA tensors NCCL when
// ranks have distinct GPUs, else Gloo (NCCL refuses two ranks on one GPU).
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/version.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "backend/process_group/config.hpp"
#include "backend/process_group/fault_log.hpp"
#include "backend/process_group/host_worker.hpp"
#include "backend/process_group/store_rendezvous.hpp"
#include "backend/process_group/validate.hpp"
#include "backend/transport/host/host_transport.hpp"
#include "backend/transport/topology.hpp"

namespace pybind11 {
class object;
}

namespace ep {

class AllToAllVState;
class CommPool;
struct MoePool;
class CudaTransport;
class InternodeTransport;

// One all_to_all as byte spans over contiguous tensors. Non-contiguous outputs are received into
// contiguous staging tensors and copied back (`copy_back`, pairs of output and staging) once the
// data has landed; `buffers` holds what the spans point into, alive until the op ends.
struct AllToAllSpans {
  std::vector<SendBuffer> sends;
  std::vector<RecvBuffer> recvs;
  std::vector<at::Tensor> buffers;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
};

// Whether a group still takes calls. Shared with the group's transports, whose watchdogs close
// it from their own threads when they fail: a reference to the group itself could end up as its
// last one on such a thread, whose destructor would then join that very thread.
class CallGate {
 public:
  bool open() const { return !closed_.load(std::memory_order_acquire); }
  // Makes every later call refuse with `why`; the first reason stays unless `overrule`.
  void close(const std::string& why, bool overrule = false);
  std::string why() const;
  // Closes the gate and tells the peers through `notice`: across nodes a rank may wait on a
  // live peer that is itself stuck on a dead one, and only the stuck one knows which.
  void close_and_tell_peers(const std::string& why);
  // Whether close_and_tell_peers gave the reason (a transport failed, perhaps because a peer
  // did: the group's fault log may know the first cause).
  bool closed_by_failure() const { return by_failure_.load(std::memory_order_acquire); }
  // How to tell them (the host transport's failure word); empty to stop telling.
  void set_peer_notice(std::function<void(const std::string&)> notice);

 private:
  std::atomic<bool> closed_{false};
  std::atomic<bool> by_failure_{false};
  mutable std::mutex mutex_;
  std::string why_;
  std::function<void(const std::string&)> peer_notice_;
};

class ProcessGroupEP : public c10d::Backend {
 public:
  ProcessGroupEP(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size, Config config,
                 c10::intrusive_ptr<c10d::Backend> cpu_backend, c10::intrusive_ptr<c10d::Backend> cuda_backend);
  ~ProcessGroupEP() override;

  const std::string getBackendName() const override { return "ep"; }
  const Config& config() const { return config_; }
  // Nodes and rails of this group (backend/transport/topology.hpp), found at creation.
  const Topology& topology() const { return topology_; }
  // Which path CPU all_to_all takes: "shm" (our transport), "gloo" (delegated), or "" until the
  // first call decides.
  std::string host_path() const;
  // Whether large CPU messages move with one copy (cross-memory attach) on this group.
  bool host_one_copy() const;
  // Which path CUDA all_to_all takes: "cuda" (our transport), "delegated", or "" until decided.
  std::string cuda_path() const;

  // --- for the MoE ops (backend/ops) ---
  // A blocking all_to_all of byte spans over the host transport (Gloo where the ranks span
  // hosts), in order with this group's other host-side ops.
  void host_exchange(const std::vector<SendBuffer>& sends, const std::vector<RecvBuffer>& recvs,
                     const char* op_name);
  // Numbers the group's dispatches (1, 2, ...): ranks compare it to catch calls out of step,
  // and combine compares the handles' numbers.
  uint64_t next_dispatch_id() { return ++dispatch_count_; }
  // Across nodes: "" while the group is one node; "nvshmem" once CUDA traffic crosses nodes
  // over NVSHMEM (RDMA between real nodes); "host" before that (CPU tensors cross virtual nodes
  // on the shared-memory transport, or Gloo between hosts).
  std::string internode_path() const;
  // CUDA IPC inside this node and NVSHMEM to other nodes, created by the first CUDA call that
  // crosses nodes (collective). Defined in cuda/internode_path.cpp; raises without NVSHMEM.
  std::shared_ptr<InternodeTransport> internode_transport(const at::Device& device, const char* op_name);
  // The same where an earlier call made it, else null; creates nothing (not collective).
  std::shared_ptr<InternodeTransport> internode_transport_if_made();
  // Whether this build has the CUDA internode transport (CUDA and NVSHMEM); without it CUDA
  // all_to_all across nodes stays on the intranode transport, or the inner backend between hosts.
  static bool internode_built();
  // Bytes the MoE ops' hierarchical route sent to other nodes (the rail hop: RDMA between real
  // nodes) and to other ranks of this node (the node hop: NVLink), since the group was created.
  void count_hop_bytes(uint64_t rail, uint64_t node) {
    rail_bytes_ += rail;
    node_bytes_ += node;
  }
  uint64_t rail_bytes() const { return rail_bytes_.load(); }
  uint64_t node_bytes() const { return node_bytes_.load(); }
  // The CUDA transport of the MoE kernels, apart from all_to_all's so that their flags never
  // meet (all_to_all may run on the comm stream, MoE ops run on the caller's). Created by the
  // first CUDA dispatch (collective); throws where CUDA IPC cannot reach every rank.
  std::shared_ptr<CudaTransport> moe_transport(const at::Device& device, const char* op_name);
  // What the device reported since the last call (torch_ep.check_errors): raises DistBackendError
  // when the group takes no more calls, ValueError naming a CUDA dispatch that received more
  // rows than num_worst_tokens (and forgets it: the group stays usable).
  void check_errors();
  // check_errors' part across nodes: what the NVSHMEM hop's kernels reported (internode_path.cpp).
  void check_internode_errors();
  // The error path of every CUDA op whose transport failed (a timeout, a peer gone, ranks out of
  // step): records `message` in the group's fault log, appends the first cause other ranks
  // recorded there (a rank may stop only because the peer it waited for stopped first), and
  // raises it as DistBackendError.
  [[noreturn]] void raise_failure(const std::string& message) const;
  // The 'ep' backend of the process group registered as `group_name` (the low-latency ops
  // know their group by name), or null.
  static c10::intrusive_ptr<ProcessGroupEP> of_group(const std::string& group_name);

  // The comm pool, or null (cuda/comm_pool_path.cpp): all_to_all_v's one copy looks its output up in it.
  std::shared_ptr<CommPool> comm_pool() const;
  // all_to_all_v's CUDA state (backend/ops/all_to_all_v.hpp), created by its first CUDA call
  // (collective) unless `create` is false; null where its kernels cannot reach every rank (ranks
  // on several hosts, more than kMaxRanksPerNode ranks) or without CUDA in the build.
  std::shared_ptr<AllToAllVState> all_to_all_v_state(const at::Device& device, const char* op_name,
                                                     bool create = true);

  // The torch allocator (a torch._C._cuda_CUDAAllocator) of this group's comm pool on cuda:`device`,
  // created by the first call (collective: every rank reserves Config::comm_pool_bytes and maps
  // every peer's arena). Afterwards every CUDA all_to_all_single of the group runs on the device
  // protocol, with one copy when every receiver's output lies in the pool. Defined in
  // cuda/comm_pool_path.cpp; raises without CUDA, or where CUDA IPC cannot reach every rank.
  pybind11::object comm_pool_allocator(int device);
  // {arena bytes, bytes torch holds in it, whether the last all_to_all_single went with one copy
  // (waits for the device)}; empty without a comm pool. For tests.
  std::vector<int64_t> comm_pool_stats();

  // The MoE pool (cuda/moe_pool.hpp), or null where none was made: a group with
  // Config::moe_push makes it with its MoE transport (moe_transport), on every rank alike.
  std::shared_ptr<MoePool> moe_pool_if_any() const;
  // {arena bytes, bytes torch holds in it}; empty without a MoE pool. For tests.
  std::vector<int64_t> moe_pool_stats();
  // The offset of [ptr, ptr + bytes) in this rank's MoE arena, or -1 (outside, or no pool). For tests.
  int64_t moe_pool_offset(int64_t ptr, int64_t bytes);
  // Host record exchanges this rank's MoE transport made (0 before it exists). For tests.
  int64_t moe_exchanges();
  // Peers' allocations this rank maps (peer_mappings.hpp): {open, waiting to be closed} for the
  // MoE transport, then for all_to_all's; 0 where a transport does not exist. For tests.
  std::vector<int64_t> peer_mappings();

  // --- ours ---
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& output_split_sizes,
                                               std::vector<int64_t>& input_split_sizes,
                                               const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& opts) override;

  // --- delegated to the inner backend of the tensors' device (delegated.cpp) ---
  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce_sparse(std::vector<at::Tensor>& tensors,
                                                  const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                     const c10d::AllreduceCoalescedOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors, const c10d::ReduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs,
                                                     std::vector<at::Tensor>& inputs,
                                                     const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                 std::vector<at::Tensor>& inputs,
                                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs,
                                        std::vector<at::Tensor>& inputs, const c10d::GatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs,
                                         std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                 std::vector<at::Tensor>& inputs,
                                                                 const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dst_rank, int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int src_rank, int tag) override;
  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>& tensors, int tag) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override;
  void monitoredBarrier(const c10d::BarrierOptions& opts, bool wait_all_ranks) override;
  void setSequenceNumberForGroup() override;
  uint64_t getSequenceNumberForGroup() override;
  void abort() override;
  void shutdown() override;

 private:
  // Raises DistBackendError naming `op` once the group takes no more calls: it was shut down or
  // aborted, or a transport failed (its state no longer agrees with the peers').
  void check_usable(const char* op) const;
  // A new MoE pool on cuda:`device` (collective: every rank reserves Config::moe_pool_bytes and
  // maps every peer's arena); moe_transport makes it, under cuda_mutex_, where the group pushes.
  // Defined in cuda/comm_pool_path.cpp (CUDA builds only).
  std::shared_ptr<MoePool> make_moe_pool(int device, const char* op_name);
  // Raises ValueError on every rank unless every rank has the same Config::moe_push and
  // moe_device_records (one all_gather over the set-up rendezvous): a pushing rank would wait for
  // peers that pull, one publishing device records for peers that exchange host records.
  void agree_on_moe_push(const char* op_name);
  // Makes every later call raise with `why`; the first reason stays unless `overrule`.
  void stop_taking_calls(const std::string& why, bool overrule = false);
  // The inner backend for `op` (after check_usable): a reference, since shutdown() drops ours.
  c10::intrusive_ptr<c10d::Backend> cpu_backend(const char* op);
  c10::intrusive_ptr<c10d::Backend> inner_for(const at::Tensor& tensor, const char* op);
  c10::intrusive_ptr<c10d::Backend> inner_for(const std::vector<at::Tensor>& tensors, const char* op);
  // Gloo has no AVG or PREMUL_SUM. Emulated: `launch_sum` runs a SUM (on scaled copies for
  // PREMUL_SUM); when it ends, `results` are divided by the group size (AVG) and copied into
  // `outputs` where they are other tensors. True when `op` needs this on `inner`.
  bool needs_emulation(const c10d::Backend& inner, const c10d::ReduceOp& op) const;
  c10::intrusive_ptr<c10d::Work> emulate_reduction(const c10d::ReduceOp& op, std::vector<at::Tensor> results,
                                                   std::vector<at::Tensor> outputs, c10d::OpType type,
                                                   const std::function<c10::intrusive_ptr<c10d::Work>()>& launch_sum);
  // Wraps an inner Work that lacks getFuture() (Gloo's reduce-scatters) in one that has it,
  // completed on the worker thread once the inner Work ends and `finish` (if any) has run.
  c10::intrusive_ptr<c10d::Work> with_future(c10::intrusive_ptr<c10d::Work> inner_work,
                                             std::vector<at::Tensor> outputs, c10d::OpType type,
                                             std::function<void()> finish = {});
  static std::vector<at::Tensor> scaled_copies(const std::vector<at::Tensor>& tensors, const c10d::ReduceOp& op);
  static double premul_factor(const c10d::ReduceOp& op);
  // The host transport, created by the first CPU all_to_all (collective, on the worker thread);
  // null when the ranks are not all on one host or the option turned it off.
  HostTransport* host_transport(const char* op_name);
  // True when every rank of the group runs on this host (collective the first time; cached).
  bool ranks_share_host();
  // ranks_share_host for a CUDA transport's set-up: a timeout raises DistBackendError naming
  // `op_name` and `purpose` (what the transport is for).
  bool ranks_share_host_for(const char* op_name, const char* purpose);
  // The CUDA transport for `device`, created by the first CUDA all_to_all (collective); null when
  // the ranks span hosts. Defined in cuda_path.cpp; without CUDA support it is always null.
  std::shared_ptr<CudaTransport> cuda_transport(const at::Device& device, const char* op_name);
  // Closes the gate when `transport` fails (a timeout, peers out of step), so that delegated
  // collectives refuse too. Defined in cuda_path.cpp.
  void refuse_calls_when_failed(CudaTransport& transport);
  // Fails the CUDA transports now (abort()): their waits in flight are released.
  void abort_cuda(const std::string& why);
  // The NVSHMEM transports (NVSHMEM builds): across nodes, and the group's low-latency buffers.
  void abort_nvshmem(const std::string& why);
  // Shutdown: once the device protocol's last call has ended, unmaps the peers' arenas; this
  // rank's arena goes when torch has given back every segment (CommPool::close).
  void close_comm_pool();
  // The CUDA all_to_all paths below run on the caller's current stream unless `async_op`
  // (c10d's AllToAllOptions::asyncOp), then on a comm stream: cuda/cuda_work.hpp, op_stream.
  // all_to_all_single on the device protocol (all_to_all_v's kernels, backend/ops/all_to_all_v.hpp):
  // no host control exchange. A null Work where those kernels cannot reach every rank.
  c10::intrusive_ptr<c10d::Work> device_all_to_all_single(const at::Tensor& output, AllToAllSpans spans,
                                                          const std::vector<size_t>& send_bytes,
                                                          const std::vector<size_t>& recv_bytes, bool async_op);
  // Runs an all_to_all on the CUDA transport.
  c10::intrusive_ptr<c10d::Work> cuda_all_to_all(std::vector<at::Tensor> outputs, AllToAllSpans spans,
                                                 c10d::OpType type, const char* op_name, bool async_op);
  // Runs a CUDA all_to_all across nodes: IPC copies to this node's ranks, NVSHMEM puts to others.
  c10::intrusive_ptr<c10d::Work> internode_all_to_all(std::vector<at::Tensor> outputs, AllToAllSpans spans,
                                                      c10d::OpType type, const char* op_name, bool async_op);
  // Runs an all_to_all on the host transport, from the worker thread; `delegate` runs it on the
  // inner Gloo backend instead when the ranks span hosts.
  c10::intrusive_ptr<c10d::Work> host_all_to_all(std::vector<at::Tensor> outputs, AllToAllSpans spans,
                                                 c10d::OpType type, const char* op_name,
                                                 std::function<c10::intrusive_ptr<c10d::Work>()> delegate);

  Config config_;
  c10::intrusive_ptr<c10d::Store> store_;
  StoreRendezvous rendezvous_;
  Topology topology_;
  mutable std::mutex state_mutex_;
  c10::intrusive_ptr<c10d::Backend> cpu_backend_;   // null after shutdown()
  c10::intrusive_ptr<c10d::Backend> cuda_backend_;  // null without CUDA, or after shutdown()
  std::shared_ptr<CallGate> gate_ = std::make_shared<CallGate>();
  std::shared_ptr<FaultLog> faults_;  // under ep/fault/<instance>/ in store_

  mutable std::mutex host_mutex_;
  enum class HostPath { kUndecided, kShm, kGloo } host_path_ = HostPath::kUndecided;
  std::unique_ptr<HostTransport> host_transport_;
  std::mutex identity_mutex_;
  int one_host_ = -1;  // -1 unknown, else 0/1

  mutable std::mutex cuda_mutex_;
  enum class CudaPath { kUndecided, kOurs, kDelegated } cuda_path_ = CudaPath::kUndecided;
  std::shared_ptr<CudaTransport> cuda_transport_;
  std::optional<c10::Stream> comm_stream_;
  std::shared_ptr<CudaTransport> moe_transport_;
  std::shared_ptr<AllToAllVState> a2av_state_;
  bool a2av_decided_ = false;
  std::shared_ptr<CommPool> comm_pool_;
  std::shared_ptr<void> comm_allocator_;  // its torch allocator (a CUDAAllocator)
  std::shared_ptr<MoePool> moe_pool_;
  std::shared_ptr<InternodeTransport> internode_transport_;
  std::optional<c10::Stream> internode_stream_;
  std::optional<c10::Stream> node_hop_stream_;  // all_to_all's node hop, beside its NVSHMEM hop
  std::atomic<uint64_t> dispatch_count_{0};
  std::atomic<uint64_t> rail_bytes_{0}, node_bytes_{0};
  HostWorker host_worker_;  // declared last: joined first on destruction
};

}  // namespace ep
