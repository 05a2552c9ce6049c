// Launchers of the low-latency MoE kernels (dispatch and combine over NVSHMEM symmetric memory).
// Torch-free: raw pointers and POD parameter structs. The only kernels built with -rdc and the
// NVSHMEM device library; this header includes no NVSHMEM header, so host glue compiles
// without NVSHMEM on its include path.
//
// Each op is two kernels, so that with a receive hook no SM waits while data is in flight.
// Dispatch pushes:
//   send: every (token, top-k slot) routed to expert e is one message written straight into the
//         owner of e's symmetric receive region (NVLink P2P stores where nvshmem_ptr maps the
//         peer); the block that finishes last raises one flag per (destination expert, this
//         rank) holding count + 1.
//   recv: waits for its flags (bounded by the timeout), clears them, copies the messages out
//         into the caller's tensors; its last block hands a credit back to every sender.
// Combine pulls, so that expert outputs written straight into the buffer move once:
//   send: copies x's received rows into this rank's own combine region (nothing to copy when
//         x is that region: low_latency_combine_buffer), then its last block raises a flag at
//         every rank: "my rows are ready".
//   recv: recomputes each (token, slot)'s row at its owner from topk_idx (the dispatch's
//         deterministic order), waits for the owners' flags, reads the rows from their regions
//         and sums them; its last block hands a credit back to every owner.
// Flags and credits return to their initial values in every call, so a CUDA graph replays
// without host-side sequence numbers. A rank waits for the credit of the buffer half it is
// about to overwrite (given back by the readers of the call before last on that half), so
// overlapping calls never clobber data a peer has not read yet; with the normal call pattern
// the credit is already there and nobody waits.
//
// Symmetric memory of one group (LowLatencyLayout), two halves used alternately:
//   per half: dispatch receive region [E_local][R][max_tokens] messages of msg_bytes
//             dispatch flags        [E_local][R] uint64   (set by senders, cleared by the receiver)
//             combine region        [E_local][R][max_tokens] rows of H bf16: this rank's expert
//                                   outputs, laid out as low_latency_combine's x
//             combine flags         [R] uint64 (set by the owners of rows, cleared by the reader)
//             dispatch credits      [R] uint64 (set to 1 by receivers, taken by this sender)
//             combine credits       [R] uint64 (set to 1 by readers, taken by this owner)
//             grid counters         [4] uint32 (last-block detection of the four kernels)
//   dispatch message: 16-byte header {int32 t*K + k, int32 t, int32 k, 0}, then the payload
//             (fp8: H bytes then H/128 float32 scales; bf16: 2H bytes), padded to 16 bytes.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "backend/kernels/low_latency_layout.hpp"

namespace ep::kernels::ll {

// What every kernel of a call needs about the group and the buffer half it uses.
struct GroupArgs {
  int rank;
  int num_ranks;
  char* half;           // this rank's address of the half (symmetric: the same offset on every rank)
  LowLatencyLayout layout;
  int num_blocks;       // SM budget
  uint64_t timeout_ns;
  int* error;           // host-mapped error word (0 = fine)
  uint64_t* trace;      // phase timestamps (kTraceWords), or null: off
};

struct DispatchSendParams {
  GroupArgs g;
  const uint16_t* x;        // [N, H] bf16
  const int64_t* topk_idx;  // [N, K] global expert ids, -1 = not routed
  int num_tokens, hidden, num_topk, num_experts, max_tokens;
  bool use_fp8;
  bool round_scale;         // fp8 scales rounded up to a power of two
};
cudaError_t launch_dispatch_send(const DispatchSendParams& params, cudaStream_t stream);

struct DispatchRecvParams {
  GroupArgs g;
  int hidden, num_experts, max_tokens;
  bool use_fp8;
  void* recv_x;              // [E_local, R*max, H] fp8 or bf16
  float* recv_scales;        // [E_local, R*max, H/128] (fp8 only)
  int32_t* recv_count;       // [E_local]
  int32_t* recv_src_info;    // [E_local, R*max]: t*K + k of each received row at its source
  int32_t* recv_layout;      // [E_local, R]: rows received from each rank
};
cudaError_t launch_dispatch_recv(const DispatchRecvParams& params, cudaStream_t stream);

struct CombineSendParams {
  GroupArgs g;
  const uint16_t* x;               // [E_local, R*max, H] bf16; the combine region itself: no copy
  const int32_t* layout;           // dispatch's recv_layout: rows of x per (local expert, rank)
  int hidden, num_experts, max_tokens;
};
cudaError_t launch_combine_send(const CombineSendParams& params, cudaStream_t stream);

struct CombineRecvParams {
  GroupArgs g;
  const int64_t* topk_idx;      // [N, K]
  const float* topk_weights;    // [N, K]
  uint16_t* out;                // [N, H] bf16
  int num_tokens, hidden, num_topk, num_experts, max_tokens;
};
cudaError_t launch_combine_recv(const CombineRecvParams& params, cudaStream_t stream);

// Waits (on the device, bounded by the timeout) until every reader of this half's combine region
// has given its credit back: after it, the region may be written (low_latency_combine_buffer).
cudaError_t launch_combine_region_wait(const GroupArgs& g, cudaStream_t stream);

// Dynamic shared memory of the kernels that number (token, slot) pairs per expert (dispatch
// send, combine recv), or -1 when it exceeds the device limit.
int64_t numbering_smem(int num_tokens, int num_topk, int num_experts);

}  // namespace ep::kernels::ll
