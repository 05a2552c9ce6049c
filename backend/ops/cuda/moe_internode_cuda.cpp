// Dispatch and combine across nodes on CUDA tensors. By default (Options.internode_device) the
// device-driven route (moe_internode_device.cpp). Else the host-driven one: the hierarchical route
// of backend/ops/moe_internode.cpp, its rail hop on NVSHMEM puts (RDMA between real nodes), its
// node hop on CUDA IPC copies, its records on the group's host channel. Everything is queued on
// the caller's stream; the host waits for sizes (the routing header, the relay counts).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "backend/kernels/moe_meta.hpp"
#include "backend/ops/cuda/cuda_outputs.hpp"
#include "backend/ops/cuda/moe_push.hpp"
#include "backend/ops/moe_internode.hpp"
#include "backend/process_group/process_group_ep.hpp"
#include "backend/transport/cuda/cuda_check.hpp"
#ifdef TORCH_EP_WITH_NVSHMEM
#include "backend/ops/cuda/moe_internode_device.hpp"
#include "backend/transport/nvshmem/internode_transport.hpp"
#endif

namespace ep::moe {

#ifdef TORCH_EP_WITH_NVSHMEM
namespace {

using at::Tensor;

class CudaHops : public InternodeHops {
 public:
  CudaHops(ProcessGroupEP& group, InternodeTransport& transport, cudaStream_t stream)
      : group_(group), transport_(transport), topo_(group.topology()), stream_(stream) {}

  Tensor rail(const Tensor& rows, const std::vector<int64_t>& send, const std::vector<int64_t>& recv,
              const char* op) override {
    const int64_t row_bytes = rows.size(1);
    Tensor out = empty_output({total(recv), row_bytes}, rows.options());
    std::vector<SendBuffer> sends(topo_.size, SendBuffer{nullptr, 0});
    std::vector<RecvBuffer> recvs(topo_.size, RecvBuffer{nullptr, 0});
    std::vector<int> peers;
    const char* in = rows.numel() ? static_cast<const char*>(rows.data_ptr()) : nullptr;
    char* to = out.numel() ? static_cast<char*>(out.data_ptr()) : nullptr;
    for (int m = 0; m < topo_.num_nodes; ++m) {
      const int r = topo_.rank_of(m, topo_.local_rank);
      sends[r] = {in, size_t(send[m] * row_bytes)};
      recvs[r] = {to, size_t(recv[m] * row_bytes)};
      in += send[m] * row_bytes;
      to += recv[m] * row_bytes;
      if (r != topo_.rank) peers.push_back(r);
    }
    if (sends[topo_.rank].bytes)
      EP_CUDA_CHECK(cudaMemcpyAsync(recvs[topo_.rank].ptr, sends[topo_.rank].ptr, sends[topo_.rank].bytes,
                                    cudaMemcpyDeviceToDevice, stream_));
    transport_.net().all_to_all(peers, sends, recvs, stream_, op);
    return out;
  }

  Tensor node(const Tensor& rows, const std::vector<int64_t>& send, const std::vector<int64_t>& recv,
              const char* op) override {
    const int64_t row_bytes = rows.size(1);
    Tensor out = empty_output({total(recv), row_bytes}, rows.options());
    std::vector<SendBuffer> sends;
    std::vector<RecvBuffer> recvs;
    const char* in = rows.numel() ? static_cast<const char*>(rows.data_ptr()) : nullptr;
    char* to = out.numel() ? static_cast<char*>(out.data_ptr()) : nullptr;
    for (int j = 0; j < topo_.ranks_per_node; ++j) {
      sends.push_back({in, size_t(send[j] * row_bytes)});
      recvs.push_back({to, size_t(recv[j] * row_bytes)});
      in += send[j] * row_bytes;
      to += recv[j] * row_bytes;
    }
    transport_.node().all_to_all(sends, recvs, stream_, op);
    return out;
  }

  std::vector<Record> records(const std::vector<Record>& mine, const char* op) override {
    return exchange_records_on_host(group_, mine, op);
  }

 private:
  static int64_t total(const std::vector<int64_t>& v) {
    int64_t n = 0;
    for (int64_t x : v) n += x;
    return n;
  }
  ProcessGroupEP& group_;
  InternodeTransport& transport_;
  const Topology& topo_;
  cudaStream_t stream_;
};

// The host-driven route's rail hop is NvshmemExchange::all_to_all, whose chunk numbers are host
// counters a graph would replay unchanged (and the route waits on the host for sizes): refused
// before anything is queued (the exchange refuses too, but only once this call's first hops are in).
void refuse_capture(const at::Device& device, const char* op) {
  TORCH_CHECK_VALUE(!stream_capturing(c10::cuda::getCurrentCUDAStream(device.index()).stream()), op,
                    ": inside a CUDA graph capture, the host-driven route across nodes (Options.internode_device="
                    "False, TORCH_EP_INTERNODE_DEVICE=0) cannot be captured; the device route (the default) can, "
                    "with num_worst_tokens");
}

std::shared_ptr<InternodeTransport> usable_transport(ProcessGroupEP& group, const at::Device& device, const char* op) {
  std::shared_ptr<InternodeTransport> transport = group.internode_transport(device, op);
  transport->net().check(op);
  transport->node().check_healthy(op);
  return transport;
}

}  // namespace

DispatchOutputs dispatch_cuda_internode(ProcessGroupEP& group, const DispatchArgs& a) {
  const char* op = "dispatch";
  const at::Device device = a.x.device();
  c10::cuda::CUDAGuard guard(device);
  if (!group.config().internode_device) refuse_capture(device, op);
  try {
    std::shared_ptr<InternodeTransport> transport = usable_transport(group, device, op);
    if (group.config().internode_device) return dispatch_cuda_internode_device(group, *transport, a);
    const int64_t R = group.getSize(), N = a.x.size(0), E = a.num_experts;
    const bool cached = a.handle_meta.has_value();
    LayoutExtras fresh;
    fresh.want_host_header = !cached && !a.layout_meta;
    const Tensor meta = cached ? *a.handle_meta : a.layout_meta ? *a.layout_meta : layout_cuda(*a.topk_idx, E, R, &fresh);
    Tensor header;  // the sizes, on the host
    if (!cached) header = sizes_on_host(group, a.layout_header ? *a.layout_header : fresh.host_header, meta, E, N, op);
    CudaHops hops(group, *transport, c10::cuda::getCurrentCUDAStream(device.index()).stream());
    HopBytes bytes;
    DispatchOutputs o =
        dispatch_hierarchical(group, a, meta, header.defined() ? header.data_ptr<int32_t>() : nullptr, hops, &bytes);
    group.count_hop_bytes(bytes.rail, bytes.node);
    return o;
  } catch (const CommError& e) {
    group.raise_failure(e.what());
  }
}

CombineOutputs combine_cuda_internode(ProcessGroupEP& group, const CombineArgs& a) {
  const char* op = "combine";
  const at::Device device = a.x.device();
  c10::cuda::CUDAGuard guard(device);
  if (!group.config().internode_device) refuse_capture(device, op);
  try {
    std::shared_ptr<InternodeTransport> transport = usable_transport(group, device, op);
    if (group.config().internode_device) return combine_cuda_internode_device(group, *transport, a);
    CudaHops hops(group, *transport, c10::cuda::getCurrentCUDAStream(device.index()).stream());
    HopBytes bytes;
    CombineOutputs o = combine_hierarchical(group, a, hops, &bytes);
    group.count_hop_bytes(bytes.rail, bytes.node);
    return o;
  } catch (const CommError& e) {
    group.raise_failure(e.what());
  }
}

Tensor combine_buffer_cuda(ProcessGroupEP& group, const HandleCounts& h, int64_t rows, int64_t hidden,
                           at::ScalarType dtype, const at::Device& device) {
  if (!group.topology().multi_node()) return combine_buffer_in_pool(group, rows, hidden, dtype, device);
  if (!group.config().internode_device) return {};
  c10::cuda::CUDAGuard guard(device);
  try {
    return combine_buffer_cuda_internode_device(group, h, rows, hidden, dtype, device);
  } catch (const CommError& e) {
    group.raise_failure(e.what());
  }
}

std::vector<Tensor> dispatch_buffer_cuda(ProcessGroupEP& group, int64_t rows, int64_t hidden, at::ScalarType dtype,
                                         const at::Device& device) {
  if (!group.topology().multi_node() || !group.config().internode_device) return {};
  c10::cuda::CUDAGuard guard(device);
  try {
    return dispatch_buffer_cuda_internode_device(group, rows, hidden, dtype, device);
  } catch (const CommError& e) {
    group.raise_failure(e.what());
  }
}

bool in_dispatch_buffer(ProcessGroupEP& group, const Tensor& t) {
  if (!t.is_cuda() || !group.topology().multi_node() || !group.config().internode_device) return false;
  const std::shared_ptr<InternodeTransport> transport = group.internode_transport_if_made();
  const InternodeBuffer* buf = transport ? transport->moe_if_made() : nullptr;
  return buf && buf->in_dispatch_in(t.data_ptr());
}

#else

DispatchOutputs dispatch_cuda_internode(ProcessGroupEP& group, const DispatchArgs& a) {
  group.internode_transport(a.x.device(), "dispatch");  // raises what to install
  return {};
}
CombineOutputs combine_cuda_internode(ProcessGroupEP& group, const CombineArgs& a) {
  group.internode_transport(a.x.device(), "combine");
  return {};
}
at::Tensor combine_buffer_cuda(ProcessGroupEP& group, const HandleCounts&, int64_t rows, int64_t hidden,
                               at::ScalarType dtype, const at::Device& device) {
  return combine_buffer_in_pool(group, rows, hidden, dtype, device);  // one node's route, virtual nodes too
}
std::vector<at::Tensor> dispatch_buffer_cuda(ProcessGroupEP&, int64_t, int64_t, at::ScalarType, const at::Device&) {
  return {};
}
bool in_dispatch_buffer(ProcessGroupEP&, const at::Tensor&) { return false; }

#endif

}  // namespace ep::moe
