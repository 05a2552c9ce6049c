// The low-latency ops on CUDA tensors: host glue around backend/kernels/low_latency_*.cu, on the
// caller's current stream. Nothing here waits on the device or allocates by data, so a call
// can be captured in a CUDA graph; the outputs are allocated at their fixed sizes.
#ifdef TORCH_EP_WITH_NVSHMEM

#include <cstdlib>
#include <string>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include "backend/common/errors.hpp"
#include "backend/kernels/low_latency.cuh"
#include "backend/ops/cuda/cuda_outputs.hpp"
#include "backend/ops/low_latency_ops.hpp"
#include "backend/process_group/process_group_ep.hpp"
#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/nvshmem/low_latency_buffer.hpp"
#include "backend/transport/nvshmem/nvshmem_runtime.hpp"

namespace ep::ll {
namespace {

using at::Tensor;
using kernels::ll::LowLatencyLayout;

// A buffer's error. One that stopped the buffers goes through the fault log of the group (found by
// its name) where it is an 'ep' group: the rank this one waited for may have stopped first, for
// another. A call's own problem (the group stays usable) raises as it is, recording nothing.
[[noreturn]] void raise_failure(const std::string& group_name, const LowLatencyBuffer& buffer,
                                const std::string& message) {
  if (buffer.failed())
    if (auto group = ProcessGroupEP::of_group(group_name)) group->raise_failure(message);
  C10_THROW_ERROR(DistBackendError, message);
}

// The group's buffer, checked: set up, healthy, on `device`, large enough for `need`.
LowLatencyBuffer& buffer_for(const std::string& group_name, const at::Device& device, const LowLatencyLayout* need,
                             const char* op) {
  LowLatencyBuffer* buffer = find_low_latency_buffer(group_name);
  TORCH_CHECK(buffer, op, ": the group '", group_name, "' has no low-latency buffers; call torch_ep.",
              "low_latency_dispatch / low_latency_combine, which set NVSHMEM and the buffers up, rather than "
              "torch.ops.ep.* directly");
  TORCH_CHECK_VALUE(buffer->device() == device.index(), op, ": the group's low-latency buffers are on cuda:",
                    buffer->device(), " but the tensors are on ", device);
  TORCH_CHECK(!need || buffer->fits(*need), op, ": the group's low-latency buffers are smaller than this call needs; ",
              "torch_ep.low_latency_dispatch/combine grow them (collectively, outside CUDA-graph capture)");
  try {
    buffer->check(op);
  } catch (const CommError& e) {
    raise_failure(group_name, *buffer, e.what());
  }
  return *buffer;
}

// TORCH_EP_LL_REMOTE_PUTS, read once (parse_remote_puts, low_latency_ops.cpp). Ranks may
// differ: a rank's puts and the count its last put signals are its own.
RemotePuts remote_puts() {
  static const RemotePuts value = parse_remote_puts(std::getenv("TORCH_EP_LL_REMOTE_PUTS"));
  return value;
}

cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

void launch_dispatch_recv(LowLatencyBuffer& buffer, const DispatchOutputs& o, int64_t max_tokens, int64_t num_topk,
                          int64_t num_experts, cudaStream_t stream) {
  kernels::ll::DispatchRecvParams p{};
  p.g = buffer.args(int(o.half));
  p.hidden = int(o.recv_x.size(2));
  p.num_topk = int(num_topk);
  p.num_experts = int(num_experts);
  p.max_tokens = int(max_tokens);
  p.use_fp8 = o.recv_x.scalar_type() == at::kFloat8_e4m3fn;
  p.recv_x = o.recv_x.data_ptr();
  p.recv_scales = p.use_fp8 ? o.recv_scales.data_ptr<float>() : nullptr;
  p.recv_count = o.recv_count.data_ptr<int32_t>();
  p.recv_src_info = o.recv_src_info.data_ptr<int32_t>();
  p.recv_layout = o.recv_layout.data_ptr<int32_t>();
  C10_CUDA_CHECK(kernels::ll::launch_dispatch_recv(p, stream));
}

void launch_combine_recv(LowLatencyBuffer& buffer, const Tensor& topk_idx, const Tensor& send_slot,
                         const Tensor& topk_weights, const Tensor& out, int64_t half, int64_t max_tokens,
                         int64_t num_experts, cudaStream_t stream) {
  kernels::ll::CombineRecvParams p{};
  p.g = buffer.args(int(half));
  p.topk_idx = topk_idx.data_ptr<int64_t>();
  p.send_slot = send_slot.data_ptr<int32_t>();
  p.topk_weights = topk_weights.data_ptr<float>();
  p.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  p.num_tokens = int(topk_idx.size(0));
  p.hidden = int(out.size(1));
  p.num_topk = int(topk_idx.size(1));
  p.num_experts = int(num_experts);
  p.max_tokens = int(max_tokens);
  C10_CUDA_CHECK(kernels::ll::launch_combine_recv(p, stream));
}

}  // namespace

DispatchOutputs dispatch_cuda(const Tensor& x, const Tensor& topk_idx, int64_t max_tokens, int64_t num_experts,
                              bool use_fp8, bool round_scale, bool send_only, const std::string& group_name) {
  const char* op = "low_latency_dispatch";
  const RemotePuts puts = remote_puts();  // a bad setting raises here, before this rank takes a buffer half
  const at::Device device = x.device();
  c10::cuda::CUDAGuard guard(device);
  const LowLatencyBuffer* probe = find_low_latency_buffer(group_name);
  const int64_t R = probe ? probe->size() : 0;
  const int64_t N = x.size(0), H = x.size(1), K = topk_idx.size(1), E_local = R ? num_experts / R : 0;
  const LowLatencyLayout need = LowLatencyLayout::of(R, E_local, max_tokens, H);
  LowLatencyBuffer& buffer = buffer_for(group_name, device, &need, op);
  const int64_t rows = R * max_tokens;
  const auto opts = x.options();
  DispatchOutputs o;
  o.recv_x = empty_output({E_local, rows, H}, opts.dtype(use_fp8 ? at::kFloat8_e4m3fn : at::kBFloat16));
  o.recv_scales = use_fp8 ? empty_output({E_local, rows, H / kernels::ll::kChannelsPerScale}, opts.dtype(at::kFloat))
                          : empty_output({0}, opts.dtype(at::kFloat));
  o.recv_count = empty_output({E_local}, opts.dtype(at::kInt));
  o.recv_src_info = empty_output({E_local, rows}, opts.dtype(at::kInt));
  o.recv_layout = empty_output({E_local, R}, opts.dtype(at::kInt));
  o.send_slot = empty_output({N, K}, opts.dtype(at::kInt));
  o.half = buffer.next_half(LowLatencyBuffer::kDispatch);

  const cudaStream_t stream = current_stream(device);
  kernels::ll::DispatchSendParams p{};
  p.g = buffer.args(int(o.half));
  p.x = reinterpret_cast<const uint16_t*>(x.data_ptr());
  p.topk_idx = topk_idx.data_ptr<int64_t>();
  p.send_slot = o.send_slot.data_ptr<int32_t>();
  p.num_tokens = int(N);
  p.hidden = int(H);
  p.num_topk = int(K);
  p.num_experts = int(num_experts);
  p.max_tokens = int(max_tokens);
  p.use_fp8 = use_fp8;
  p.round_scale = round_scale;
  p.remote_put_tokens = puts.tokens;
  p.remote_one_fence = puts.one_fence;
  // Unset: block signals where the remote puts go by P2P (2x4, one H100: fp8 dispatch 1.45x
  // intranode against 1.62x with a signal a put); on a NIC every warp's quiet would scan every
  // queue pair, unmeasured, so the put with its signal stays there, as under the what-if, whose
  // copies replace signalled puts only.
  p.remote_block_signals =
      puts.automatic ? buffer.remote_by_p2p() && !p.g.whatif_copy_puts : puts.block_signals;
  C10_CUDA_CHECK(kernels::ll::launch_dispatch_send(p, stream));
  if (!send_only) launch_dispatch_recv(buffer, o, max_tokens, K, num_experts, stream);
  return o;
}

void dispatch_recv_cuda(const DispatchOutputs& o, int64_t max_tokens, int64_t num_topk, int64_t num_experts,
                        const std::string& group_name) {
  const at::Device device = o.recv_x.device();
  c10::cuda::CUDAGuard guard(device);
  LowLatencyBuffer& buffer = buffer_for(group_name, device, nullptr, "low_latency_dispatch (receive hook)");
  launch_dispatch_recv(buffer, o, max_tokens, num_topk, num_experts, current_stream(device));
}

int64_t combine_cuda(const Tensor& x, const Tensor& topk_idx, const Tensor& topk_weights, const Tensor& send_slot,
                     const Tensor& layout, const Tensor& out, int64_t max_tokens, int64_t num_experts, bool send_only,
                     const std::string& group_name) {
  const char* op = "low_latency_combine";
  const at::Device device = x.device();
  c10::cuda::CUDAGuard guard(device);
  const LowLatencyBuffer* probe = find_low_latency_buffer(group_name);
  const int64_t R = probe ? probe->size() : 0;
  const int64_t H = x.size(2);
  const LowLatencyLayout need = LowLatencyLayout::of(R, R ? num_experts / R : 0, max_tokens, H);
  LowLatencyBuffer& buffer = buffer_for(group_name, device, &need, op);
  const int64_t half = buffer.next_half(LowLatencyBuffer::kCombine);
  const cudaStream_t stream = current_stream(device);
  kernels::ll::CombineSendParams p{};
  p.g = buffer.args(int(half));
  p.x = reinterpret_cast<const uint16_t*>(x.data_ptr());
  p.layout = layout.data_ptr<int32_t>();
  p.hidden = int(H);
  p.num_experts = int(num_experts);
  p.max_tokens = int(max_tokens);
  C10_CUDA_CHECK(kernels::ll::launch_combine_send(p, stream));
  if (!send_only)
    launch_combine_recv(buffer, topk_idx, send_slot, topk_weights, out, half, max_tokens, num_experts, stream);
  return half;
}

void combine_recv_cuda(const Tensor& topk_idx, const Tensor& send_slot, const Tensor& topk_weights, const Tensor& out,
                       int64_t half, int64_t max_tokens, int64_t num_experts, const std::string& group_name) {
  const at::Device device = out.device();
  c10::cuda::CUDAGuard guard(device);
  LowLatencyBuffer& buffer = buffer_for(group_name, device, nullptr, "low_latency_combine (receive hook)");
  launch_combine_recv(buffer, topk_idx, send_slot, topk_weights, out, half, max_tokens, num_experts,
                      current_stream(device));
}

Tensor combine_buffer_cuda(const std::string& group_name, int64_t num_local_experts, int64_t max_tokens,
                           int64_t hidden, const at::Device& device) {
  const char* op = "low_latency_combine_buffer";
  c10::cuda::CUDAGuard guard(device);
  const LowLatencyBuffer* probe = find_low_latency_buffer(group_name);
  const int64_t R = probe ? probe->size() : 0;
  const LowLatencyLayout need = LowLatencyLayout::of(R, num_local_experts, max_tokens, hidden);
  LowLatencyBuffer& buffer = buffer_for(group_name, device, &need, op);
  const kernels::ll::GroupArgs g = buffer.args(buffer.peek_half(LowLatencyBuffer::kCombine));
  // The user's kernels write the region next: first its readers of the call before last must be done.
  C10_CUDA_CHECK(kernels::ll::launch_combine_region_wait(g, current_stream(device)));
  return at::from_blob(g.half + g.layout.combine_region(), {num_local_experts, R * max_tokens, hidden},
                       at::TensorOptions().dtype(at::kBFloat16).device(device));
}

// ---- runtime

int nvshmem_status() { return nvshmem::init_status(); }

void nvshmem_attach(int rank, int size) { nvshmem::attach(rank, size); }

void nvshmem_env_defaults() { nvshmem::default_local_only_env(); }

bool buffer_fits(const std::string& group_name, int64_t num_ranks, int64_t num_local_experts, int64_t max_tokens,
                 int64_t hidden, bool remote) {
  const LowLatencyBuffer* buffer = find_low_latency_buffer(group_name);
  return buffer && buffer->fits(LowLatencyLayout::of(num_ranks, num_local_experts, max_tokens, hidden, remote));
}

bool reserve_buffer(const std::string& group_name, int rank, int size, int device, std::chrono::milliseconds timeout,
                    int num_sms, int64_t num_local_experts, int64_t max_tokens, int64_t hidden, bool remote,
                    const std::vector<int>& remote_ranks) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return reserve_low_latency_buffer(group_name, rank, size, device, timeout, num_sms,
                                    LowLatencyLayout::of(size, num_local_experts, max_tokens, hidden, remote),
                                    remote_ranks);
}

std::vector<int> remote_ranks(const std::string& group_name) {
  const LowLatencyBuffer* buffer = find_low_latency_buffer(group_name);
  return buffer ? buffer->remote_ranks() : std::vector<int>();
}

std::vector<uint64_t> trace(const std::string& group_name) {
  const LowLatencyBuffer* buffer = find_low_latency_buffer(group_name);
  return buffer ? buffer->trace() : std::vector<uint64_t>();
}

void check_errors(const std::string& group_name, const char* op) {
  LowLatencyBuffer* buffer = find_low_latency_buffer(group_name);
  if (!buffer) return;
  try {
    buffer->check(op);
  } catch (const CommError& e) {
    raise_failure(group_name, *buffer, e.what());
  }
}

}  // namespace ep::ll

#endif  // TORCH_EP_WITH_NVSHMEM
