// The device-driven CUDA route across nodes (backend/kernels/internode_device.cuh): what
// moe_internode_cuda.cpp runs unless Options.internode_device is false. Needs NVSHMEM.
#pragma once

#include "backend/ops/moe_ops.hpp"

namespace ep {
class InternodeTransport;
}

namespace ep::moe {

DispatchOutputs dispatch_cuda_internode_device(ProcessGroupEP& group, InternodeTransport& transport,
                                               const DispatchArgs& a);
CombineOutputs combine_cuda_internode_device(ProcessGroupEP& group, InternodeTransport& transport,
                                             const CombineArgs& a);
// This rank's zero-copy combine input [rows, hidden] of `dtype`, once the node's ranks are done
// reading it (a wait queued on the current stream); undefined where the handle's dispatch did not
// take this route, the node's ranks are not all mapped, or it does not fit.
at::Tensor combine_buffer_cuda_internode_device(ProcessGroupEP& group, const HandleCounts& h, int64_t rows,
                                                int64_t hidden, at::ScalarType dtype, const at::Device& device);
// This rank's packed rows as dispatch_buffer's views ([rows, hidden] of `dtype`, rows W bytes
// apart; with fp8 also the scales [rows, ceil(hidden / 128)] float32 beside them), once the node's
// ranks are done reading them (a wait queued on the current stream); none where the group's
// buffer is not allocated yet, or the rows do not fit.
std::vector<at::Tensor> dispatch_buffer_cuda_internode_device(ProcessGroupEP& group, int64_t rows, int64_t hidden,
                                                              at::ScalarType dtype, const at::Device& device);

}  // namespace ep::moe
