// ProcessGroupEP across nodes, CUDA tensors: the InternodeTransport (IPC inside the node, NVSHMEM
// to other nodes) and all_to_all on it, with the stream semantics of cuda_path.cpp (cuda_work.hpp).
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "backend/common/env_switch.hpp"
#include "backend/process_group/cuda/cuda_work.hpp"
#include "backend/process_group/cuda/segment_frees.hpp"
#include "backend/process_group/process_group_ep.hpp"
#include "backend/transport/cuda/cuda_check.hpp"
#ifdef TORCH_EP_WITH_NVSHMEM
#include "backend/transport/nvshmem/internode_buffer.hpp"
#include "backend/transport/nvshmem/internode_transport.hpp"
#include "backend/transport/nvshmem/low_latency_buffer.hpp"
#endif

namespace ep {

#ifdef TORCH_EP_WITH_NVSHMEM
bool ProcessGroupEP::internode_built() { return true; }

std::shared_ptr<InternodeTransport> ProcessGroupEP::internode_transport(const at::Device& device, const char* op_name) {
  check_usable(op_name);
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  if (!internode_transport_) try {
      CudaTransportConfig cc;
      cc.device = device.index();
      cc.buffer_bytes = config_.cuda_buffer_bytes;
      cc.kernel_bytes = config_.all_to_all_kernel_bytes;
      cc.num_sms = config_.num_sms;
      cc.timeout = config_.timeout;
      cc.control_slot_bytes = 256;
      internode_transport_ = std::make_shared<InternodeTransport>(rendezvous_, topology_, cc, "ep/internode",
                                                                  config_.internode_a2a_device);
      internode_stream_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device.index());
      node_hop_stream_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device.index());
      // The node's watchdog records a stuck wait as soon as it sees it: a rank on another node
      // waiting on this one may be about to time out too, and should learn why.
      internode_transport_->node().on_failure(
          [faults = faults_](const std::string& why) { faults->record(why, /*wait=*/false); });
      // all_to_all's node hop maps the node's peers' outputs (host protocol): let them go once freed.
      report_segment_frees(internode_transport_->node());
    } catch (const std::exception& e) {
      C10_THROW_ERROR(DistBackendError, std::string(op_name) + ": setting up this group's transport across nodes "
                                            "(CUDA IPC in the node, NVSHMEM between nodes) failed: " + e.what());
    }
  TORCH_CHECK_VALUE(internode_transport_->node().device() == device.index(), op_name, ": this 'ep' group runs on cuda:",
                    internode_transport_->node().device(), " (its first CUDA op across nodes), but got a tensor on ",
                    device, "; use one device per rank and group");
  return internode_transport_;
}

std::shared_ptr<InternodeTransport> ProcessGroupEP::internode_transport_if_made() {
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  return internode_transport_;
}

void ProcessGroupEP::abort_nvshmem(const std::string& why) {
  if (std::shared_ptr<InternodeTransport> transport = internode_transport_if_made()) transport->abort(why);
  abort_low_latency_buffer(getGroupUid());  // the buffers are found by the group's name
}

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::internode_all_to_all(std::vector<at::Tensor> outputs,
                                                                    AllToAllSpans spans, c10d::OpType type,
                                                                    const char* op_name, bool async_op) {
  const at::Device device = outputs[0].device();
  // The NVSHMEM hop numbers each pair's chunks on the host (NvshmemExchange's counters), and a
  // graph would replay the captured numbers: from the second replay on, receivers would take
  // stale slots and senders overwrite slots still being read. Refused before anything is queued
  // (or the transport set up).
  TORCH_CHECK_VALUE(!stream_capturing(c10::cuda::getCurrentCUDAStream(device.index()).stream()), op_name,
                    ": inside a CUDA graph capture, an all_to_all across nodes cannot be captured (its NVSHMEM "
                    "hop counts chunks on the host, which a replay would repeat); run it outside the capture");
  std::shared_ptr<InternodeTransport> transport = internode_transport(device, op_name);
  c10::cuda::CUDAGuard guard(device);
  const auto stream = op_stream(c10::cuda::getCurrentCUDAStream(device.index()),
                                c10::cuda::CUDAStream(c10::cuda::CUDAStream::UNCHECKED, *internode_stream_), async_op);
  std::shared_ptr<StreamMark> end;

  const Topology& t = topology_;
  // The two hops touch disjoint rows of the outputs and share no buffer, so the node hop runs on a
  // stream of its own beside the NVSHMEM hop's kernel, forked from the op's stream and joined back
  // before the op's end, as NCCL's channels drive NVLink and network peers at once. On one H100 at
  // 2x4 virtual nodes, 64 MiB per rank, the node hop's direct kernel beside took a call after a
  // barrier to 1408 us against 1441-1451 in turn, and back to back to 705 us against 757 (29f9c6e,
  // two alternations); by the copy engines (a message above kernel_bytes) at 2x2, 726 against 757
  // and 349 against 482. (9505576 had put the kernel in turn from figures taken while NVSHMEM's
  // proxy thread spun a core per rank: nvshmem_runtime.cpp's init_over.) Measurements only:
  // TORCH_EP_WHATIF_SERIAL_HOPS=1 queues both hops one after the other always,
  // TORCH_EP_WHATIF_NODE_KERNEL_IN_TURN=1 where the node hop is a kernel.
  static const bool serial = env_switch("TORCH_EP_WHATIF_SERIAL_HOPS");
  static const bool kernel_in_turn = env_switch("TORCH_EP_WHATIF_NODE_KERNEL_IN_TURN");
  // This node's ranks (self included) over CUDA IPC, indexed by local rank.
  std::vector<SendBuffer> node_sends;
  std::vector<RecvBuffer> node_recvs;
  for (int r : t.node_ranks()) {
    node_sends.push_back(spans.sends[r]);
    node_recvs.push_back(spans.recvs[r]);
  }
  const bool beside = !serial && !(kernel_in_turn && transport->node().moves_by_kernel(node_sends));
  const cudaStream_t node_stream =
      beside ? c10::cuda::CUDAStream(c10::cuda::CUDAStream::UNCHECKED, *node_hop_stream_).stream() : stream.stream();
  auto join = [&] {  // also where the NVSHMEM hop threw: no write of the node hop outlives the op
    if (beside) queue_after(device.index(), stream.stream(), node_stream);
  };
  try {
    if (beside) queue_after(device.index(), node_stream, stream.stream());
    transport->node().all_to_all(node_sends, node_recvs, node_stream, op_name);
    // Every other rank over NVSHMEM: once per pair, whatever the split.
    std::vector<int> remote;
    for (int r = 0; r < t.size; ++r)
      if (t.node_of(r) != t.node) remote.push_back(r);
    transport->net().all_to_all(remote, spans.sends, spans.recvs, stream.stream(), op_name);
    join();
    end = transport->node().track(op_name, stream.stream(), {});
  } catch (const std::exception& e) {
    try {
      join();
    } catch (...) {
    }
    raise_failure(e.what());
  }
  std::shared_ptr<StreamMark> done = finish_on(stream, spans, outputs, async_op, std::move(end));
  // Work.wait() also raises a peer the NVSHMEM hop waited for in vain (blocking waits poll it).
  auto net_error = [transport, op_name] {
    const std::string e = transport->net().error();
    return e.empty() ? e : std::string(op_name) + ": " + e;
  };
  return c10::make_intrusive<EPCudaWork>(getRank(), type, std::move(outputs), stream, std::move(done),
                                         transport->node_shared(), faults_, config_.blocking_wait, config_.timeout,
                                         net_error);
}

void ProcessGroupEP::check_internode_errors() {
  std::shared_ptr<InternodeTransport> transport;
  {
    std::lock_guard<std::mutex> lock(cuda_mutex_);
    transport = internode_transport_;
  }
  if (!transport) return;
  const std::string e = transport->net().error();
  if (!e.empty()) raise_failure("check_errors on rank " + std::to_string(getRank()) + ": " + e);
  // The device route's dispatch/combine: a wait of its kernels that gave up.
  if (InternodeBuffer* moe = transport->moe_if_made())
    if (const std::string m = moe->error(); !m.empty())
      raise_failure("check_errors on rank " + std::to_string(getRank()) + ": " + m);
  try {
    transport->node().check_healthy("check_errors");
  } catch (const CommError& err) {
    raise_failure(err.what());
  }
}

#else  // CUDA without NVSHMEM

void ProcessGroupEP::check_internode_errors() {}

bool ProcessGroupEP::internode_built() { return false; }

std::shared_ptr<InternodeTransport> ProcessGroupEP::internode_transport(const at::Device&, const char* op_name) {
  TORCH_CHECK(false, op_name, ": this group spans ", topology_.num_nodes, " nodes, and CUDA traffic between nodes "
              "runs on NVSHMEM, which this torch_ep build lacks: install nvidia-nvshmem-cu13 and rebuild "
              "(TORCH_EP_WITH_NVSHMEM=1)");
}

std::shared_ptr<InternodeTransport> ProcessGroupEP::internode_transport_if_made() { return nullptr; }

void ProcessGroupEP::abort_nvshmem(const std::string&) {}

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::internode_all_to_all(std::vector<at::Tensor>, AllToAllSpans,
                                                                    c10d::OpType, const char* op_name, bool) {
  internode_transport(at::Device(at::kCUDA), op_name);
  return {};
}

#endif

}  // namespace ep
