// The host side of a pushing CUDA dispatch (Options.moe_push; kernels/moe.cuh, DispatchPushParams):
// outputs from the group's MoE pool, where every sender reaches them, and where they lie.
//
// In this step the host records are still exchanged (moe_cuda.cpp): a receiver tells its senders
// where its outputs lie in its arena, in its record where it could allocate them before the
// exchange (a handle or num_worst_tokens give the rows) and otherwise in a second, small
// exchange once the records gave the rows. A rank whose pool cannot hold its outputs says so
// there, and every rank raises before any kernel starts.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "backend/kernels/moe.cuh"
#include "backend/ops/moe_ops.hpp"
#include "backend/ops/moe_protocol.hpp"

namespace ep {
class CudaTransport;
struct MoePool;
}  // namespace ep

namespace ep::moe {

// Whether this call pushes: Options.moe_push, except while `stream` is being captured into a CUDA
// graph (the capture's pool would take the outputs, not the MoE pool), where the call pulls.
bool push_this_call(ProcessGroupEP& group, cudaStream_t stream);

// Allocates a dispatch's outputs of `capacity` rows (as the pull path shapes them) from `pool`
// into `o`, and says where they lie in `target`. False, with `why` naming TORCH_EP_MOE_POOL_BYTES,
// when the pool cannot hold them (or this thread's allocations are routed to another pool).
bool allocate_from_pool(MoePool& pool, int rank, const DispatchArgs& a, int64_t capacity, DispatchOutputs& o,
                        PushTarget& target, std::string* why);

// The second exchange: every rank's target (or its refusal, `why` non-empty); raises on every
// rank when any rank refused.
std::vector<PushTarget> exchange_targets(CudaTransport& transport, const PushTarget& mine, const std::string& why,
                                         const char* op);

// Every receiver's outputs as mapped here, from its target and the arenas this rank maps.
void set_targets(MoePool& pool, int num_ranks, const std::vector<PushTarget>& targets,
                 kernels::DispatchTarget* dst);

}  // namespace ep::moe
