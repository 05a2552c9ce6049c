// The host side of a pushing CUDA dispatch (Options.moe_push; kernels/moe.cuh, DispatchPushParams):
// outputs from the group's MoE pool, where every sender reaches them, and where they lie; and of
// device records (Options.moe_device_records; kernels/moe_records.cuh) for dispatch and combine.
//
// With host records (moe_cuda.cpp) a receiver tells its senders where its outputs lie in its
// arena, in its record where it could allocate them before the exchange (a handle or
// num_worst_tokens give the rows) and otherwise in a second, small exchange once the records gave
// the rows. A rank whose pool cannot hold its outputs says so there, and every rank raises before
// any kernel starts. With device records the same travels through the notify kernels' slots.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "backend/common/phases.hpp"
#include "backend/kernels/moe.cuh"
#include "backend/ops/moe_ops.hpp"
#include "backend/ops/moe_protocol.hpp"

namespace ep {
class CudaTransport;
struct MoePool;
}  // namespace ep

namespace ep::moe {

// Whether this call pushes: Options.moe_push, except while its stream is being captured into a CUDA
// graph (the capture's pool would take the outputs, not the MoE pool), where the call pulls.
bool push_this_call(const ProcessGroupEP& group, bool capturing);

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

// ---- device records (Options.moe_device_records; kernels/moe_records.cuh)
// Whether a pushing call exchanges its records through the device: the option is on (a pushing
// call is an eager one). Every rank decides alike.
bool device_records_this_call(const ProcessGroupEP& group, bool push);

// A pushing dispatch with no host exchange: this rank's record in the parameters, the notify
// kernel, the outputs from the pool, the push kernel, tracking. Where the host knows its rows (a
// handle, num_worst_tokens) that is one round; else a first round's notify kernel writes the
// sizes to mapped memory, the host waits for them (its one wait, as for the layout's header),
// allocates, and a second round publishes the outputs. Ranks that disagree on waiting are told
// apart by the records (kRecWaits). `handshake` is the done half (no ready flags: the records
// are the ready half). The input checks ran before. After the launch it raises (the call is
// queued, so no peer waits for this rank in vain): this rank's pool refusal, or what an earlier
// call's kernels reported (raise_device_report); a first round's bad verdict raises on every rank
// before any output is allocated.
// `phase` names its host phases (tools/moe_profile.py).
DispatchOutputs dispatch_with_device_records(ProcessGroupEP& group, CudaTransport& transport, MoePool& pool,
                                             const DispatchArgs& a, const at::Tensor& meta, bool given,
                                             cudaStream_t stream, int num_blocks, const kernels::Handshake& handshake,
                                             Phases& phase);

// ---- combine with device records (under the same options): every eager combine of such a group
// exchanges its records through the device; a combine captured in a CUDA graph keeps the host's.
bool combine_device_records_this_call(const ProcessGroupEP& group, cudaStream_t stream);

// The device records' half of such a combine: this rank's x and topk_weights in the MoE pool (where
// they lie there, 16-byte aligned; else a copy there, queued on `stream` and kept in `staged` until
// the launch is queued), the notify kernel, and `p`'s plan and arenas, for the pull kernel that
// follows (`p`'s handshake is set: its bound and error word bound the notify's waits). Returns
// what this rank raises once that kernel is queued: its refusal (the pool cannot hold the copy, or
// an earlier dispatch's overflow), which makes every rank's pull move nothing; "" where none.
std::string notify_combine(CudaTransport& transport, MoePool& pool, const CombineArgs& a, int64_t call_seq,
                           cudaStream_t stream, kernels::CombineParams& p, std::vector<at::Tensor>& staged);

// A [rows, hidden] tensor of `dtype` from the MoE pool, for torch_ep.combine_buffer: a combine
// given it (or any 16-byte aligned tensor of the pool) as x copies nothing. Undefined where the
// pool cannot hold it (the caller makes a plain tensor).
at::Tensor empty_in_pool(MoePool& pool, at::IntArrayRef sizes, const at::TensorOptions& options);
// torch_ep.combine_buffer on one node: a [rows, hidden] tensor of the group's MoE pool where the
// group pushes (Options.moe_push) and its pool is made; undefined elsewhere or where it is full.
at::Tensor combine_buffer_in_pool(ProcessGroupEP& group, int64_t rows, int64_t hidden, at::ScalarType dtype,
                                  const at::Device& device);

// The rows a pushing dispatch's outputs hold where the host knows them before any exchange (a
// handle, or num_worst_tokens): num_worst_tokens (along such a dispatch's handle too, which
// ep::moe::dispatch passes on), else the rows the handle received.
int64_t known_capacity(const DispatchArgs& a);

// What a notify kernel reported (CudaTransport::take_moe_report's words) as the error to raise on
// `rank` in `op`; "" when it reported nothing. `current_seq`: the raising call's
// CudaTransport::next_moe_call (-1: a call without device records, or check_errors), to say
// whether the report is this call's or an earlier one's.
// `waited`: the raising call waited for the device (a dispatch's first round).
std::string device_report_message(const std::vector<int64_t>& words, int rank, int64_t current_seq, const char* op,
                                  bool waited = false);
// Takes the transport's report and raises it (ValueError for a refusal or an overflow,
// RuntimeError for ranks that disagree); nothing when there is none.
void raise_device_report(CudaTransport& transport, int rank, int64_t current_seq, const char* op, bool waited = false);

}  // namespace ep::moe
