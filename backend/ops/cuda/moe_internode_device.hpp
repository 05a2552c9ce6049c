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

}  // namespace ep::moe
