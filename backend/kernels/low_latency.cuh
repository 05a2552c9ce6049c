// Launchers of the low-latency MoE kernels (dispatch and combine over NVSHMEM symmetric memory).
// Torch-free: raw pointers and POD parameter structs. The only kernels built with -rdc and the
// NVSHMEM device library; this header includes no NVSHMEM header, so host glue compiles
// without NVSHMEM on its include path.
//
// Each op is two kernels, so that with a receive hook no SM waits while data is in flight. Both
// ops pull: the data stays with the rank that made it, and the one that needs it reads it.
// Dispatch:
//   send: casts each token once into this rank's own region (fp8 or bf16), and numbers the
//         (token, slot) pairs per expert in pair order (a warp per expert): the list of pairs
//         for each expert of the group, their count, and each pair's slot (send_slot, which the
//         combine uses again). Then every block adds its arrival to a flag at every rank.
//   recv: a block per local expert waits for every rank's flag, reads each rank's count and
//         list for the expert, and copies the listed tokens out of that rank's region into the
//         caller's tensors; each block then adds its arrival to a credit at every rank.
// Combine:
//   send: copies x's received rows into this rank's own combine region (nothing to copy when
//         x is that region: low_latency_combine_buffer) and publishes where each rank's rows
//         start there, then its blocks add their arrival to a flag at every rank: "my rows are
//         ready".
//   recv: finds each (token, slot)'s row at its owner (expert le, this rank's offset there, then
//         send_slot), waits for the owners' flags, reads the rows from their regions and sums
//         them; each block then adds its arrival to a credit at every owner.
// Remote peers (on another node: GroupArgs::peers[r] is null) cannot be read in place; what
// they would read is pushed to them instead, through NVSHMEM's device API (put with signal,
// so the same code runs over IBGDA, IBRC or P2P):
//   dispatch: send (its variant for groups with remote peers: a warp casts a whole token)
//             pushes each token, as soon as it is cast, once to every remote owner of one of
//             its experts (remote_tokens; or, by DispatchSendParams::remote_put_tokens, a block
//             casts a group of tokens and its warps push runs of consecutive tokens, one put
//             each), and each list as soon as it is numbered, then the
//             counts of an owner's experts once all are numbered; no kernel apart, so the
//             pushes overlap the casting and the receive kernel follows send directly;
//   combine:  send pushes each row back to its remote token's rank (remote_rows);
//   receivers of both read those regions locally.
// A remote peer's flag counts puts rather than blocks (low_latency_layout.hpp), or blocks with
// DispatchSendParams::remote_block_signals; credits go back as NVSHMEM signals.
// Flags and credits are completion words (low_latency_layout.hpp): every block of the writer
// adds its arrival, so no block waits for the others before signalling. The last block past a
// wait resets the words it waited on, before its own arrival: nobody adds to them again until
// that arrival (and its peers') has been seen. They thus return to their initial values in
// every call, and a CUDA graph replays without host-side sequence numbers. A rank waits for
// the credits of the buffer half it is about to overwrite (given back by the readers of the
// call before last on that half), so overlapping calls never clobber data a peer has not read
// yet; with the normal call pattern the credits are already there and nobody waits.
//
// Symmetric memory of one group (LowLatencyLayout), two halves used alternately:
//   per half: dispatch tokens        [max_tokens] tokens of token_bytes (fp8: H bytes, then
//                                    H/128 float32 scales; bf16: 2H bytes)
//             dispatch lists, counts [E][max_tokens] int32 pairs q = t*K + k; [E] int32
//             dispatch flags         [R] completion words (set by senders)
//             combine region         [E_local][R*max_tokens] rows of H bf16: this rank's expert
//                                    outputs, laid out as low_latency_combine's x
//             combine flags          [R] completion words (set by the owners of rows)
//             dispatch credits       [R] completion words (set by the readers of our tokens)
//             combine credits        [R] completion words (set by the readers of our rows)
//             grid counters          [4] uint32 (blocks past each kernel's wait)
//             remote regions         groups across nodes only: tokens, lists, counts and
//                                    combine rows that remote peers push (LowLatencyLayout)
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
  char* peers[kMaxRanks];  // every rank's half, as this rank maps it (NVLink P2P or the same GPU);
                           // null: a remote rank, reached through NVSHMEM's device API only
  LowLatencyLayout layout;
  int num_blocks;       // SM budget
  uint64_t timeout_ns;
  int* error;           // host-mapped, 0 = fine: a timeout (or the host's abort), the first one
                        // wins and stays (every later call raises)
  int* pending;         // host-mapped, 0 = fine: a call's own problem (an overflow, a bad expert
                        // id), raised once by the host, which then clears it
  uint32_t* gave_up;    // device memory: set by a wait that timed out, or by the host's abort; every
                        // later wait of this rank's kernels (queued calls' included) then ends at once
  uint64_t* trace;      // phase timestamps (kTraceWords), or null: off
  bool whatif_copy_puts;  // the send kernels in their what-if instances (whatif_puts.cuh)
};

struct DispatchSendParams {
  GroupArgs g;
  const uint16_t* x;        // [N, H] bf16
  const int64_t* topk_idx;  // [N, K] global expert ids, -1 = not routed
  int32_t* send_slot;       // [N, K] out: each pair's row among its expert's rows from this rank, -1 = not sent
  int num_tokens, hidden, num_topk, num_experts, max_tokens;
  bool use_fp8;
  bool round_scale;         // fp8 scales rounded up to a power of two
  // Groups across nodes, how the tokens are put (TORCH_EP_LL_REMOTE_PUTS): 0, a warp casts a
  // token whole and puts it to each remote owner (one put per token and owner); n >= 1, a block
  // casts a group of consecutive tokens ((token, chunk) a warp, as within a node), then its
  // warps share the group's puts, one per run of up to n consecutive tokens going to an owner.
  int remote_put_tokens;
  // With remote_put_tokens 0: a token's puts to its owners go without signals, then one fence,
  // then a signal to each (TORCH_EP_LL_REMOTE_PUTS=fenced), instead of a put with its signal each.
  bool remote_one_fence;
  // With remote_put_tokens 0 (TORCH_EP_LL_REMOTE_PUTS=block): every put (tokens, lists, counts)
  // goes without a signal, each warp waits for its own puts once (nvshmem_quiet) after its last,
  // and remote peers' flags count the blocks' arrivals as local ones do (arrive_everywhere), not
  // the puts: one system fence a warp instead of one a put, and no count of the puts.
  bool remote_block_signals;
};
cudaError_t launch_dispatch_send(const DispatchSendParams& params, cudaStream_t stream);

struct DispatchRecvParams {
  GroupArgs g;
  int hidden, num_topk, num_experts, max_tokens;
  bool use_fp8;
  void* recv_x;              // [E_local, R*max, H] fp8 or bf16; an expert's rows packed from row 0,
                             // by source rank (as DeepEP's), each rank's in its (token, slot) order
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
  const int32_t* send_slot;     // [N, K]: the dispatch's (DispatchSendParams::send_slot)
  const float* topk_weights;    // [N, K]
  uint16_t* out;                // [N, H] bf16
  int num_tokens, hidden, num_topk, num_experts, max_tokens;
};
cudaError_t launch_combine_recv(const CombineRecvParams& params, cudaStream_t stream);

// Waits (on the device, bounded by the timeout) until every reader of this half's combine region
// has given its credit back: after it, the region may be written (low_latency_combine_buffer).
cudaError_t launch_combine_region_wait(const GroupArgs& g, cudaStream_t stream);

}  // namespace ep::kernels::ll
