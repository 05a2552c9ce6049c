// Launchers of the MoE kernels (layout, dispatch, combine). Torch-free: raw pointers and POD
// parameter structs.
//
// Dispatch and combine pull: each rank's kernel reads its peers' memory (CUDA IPC mappings)
// and writes only its own outputs, so each row moves exactly once, straight from the tensor
// that holds it to the tensor that needs it. A token going to several experts of one rank is
// read once by that rank. Around the pull runs a flag handshake: first "my inputs are ready to
// be read", last "I have finished reading yours"; inside the pull kernel (Handshake), or in
// `launch_signal` where the ready half must go out before the host knows the sizes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/kernels/all_to_all.cuh"  // kMaxRanksPerNode
#include "backend/kernels/moe_meta.hpp"

namespace ep::kernels {

// ---- layout: the routing table (moe_meta.hpp) of one rank's topk_idx
constexpr int kThreads = 512;  // threads per block of every MoE kernel
struct LayoutParams {
  const int64_t* topk_idx;  // [N, K]
  int64_t num_tokens;
  int num_topk;
  int num_ranks;
  int64_t num_experts;
  int32_t* meta;               // MetaLayout{num_ranks, num_experts, num_tokens}.size() int32
  bool* is_token_in_rank;      // [N, R], or null
  int32_t* tokens_per_rank;    // [R]: the header's column, in a tensor of its own; or null
  int32_t* pairs_per_expert;   // [E]: likewise; or null
  int32_t* host_header;        // pinned host memory, [MetaLayout::host_header_size()]: the header,
                               // then a ready flag per rank (0 before the launch, 1 once that
                               // rank's part is there); or null
};
cudaError_t launch_layout(const LayoutParams& params, cudaStream_t stream);

// ---- flag handshake: set every flag of `to_set`, then wait for (and clear) every flag of `to_wait`
struct SignalParams {
  int num_ranks;
  uint32_t* to_set[kMaxRanksPerNode];   // null: nothing to tell that rank
  uint32_t* to_wait[kMaxRanksPerNode];  // null: nothing to wait for
  uint64_t timeout_ns;
  int* error;  // host-mapped: 1 + the rank a wait timed out on
};
cudaError_t launch_signal(const SignalParams& params, cudaStream_t stream);

// ---- the same handshake inside a pull kernel, so that a call is one launch: block 0 sets the
// `ready_to_set` flags and every block waits for the `ready_to_wait` ones before it reads a peer;
// the last block to finish clears those, sets `done_to_set` and waits for `done_to_wait`.
// Null entries skip that part (a signal kernel did it, or there is nothing to say).
struct Handshake {
  uint32_t* ready_to_set[kMaxRanksPerNode];
  uint32_t* ready_to_wait[kMaxRanksPerNode];
  uint32_t* done_to_set[kMaxRanksPerNode];
  uint32_t* done_to_wait[kMaxRanksPerNode];
  uint32_t* blocks_finished;  // device counter, 0 between kernels
  uint64_t timeout_ns;
  int* error;  // host-mapped: 1 + the rank a wait timed out on
};

// ---- how dispatch and combine move the rows (Options.moe_copy), all pulling the same bytes:
//   kWarp    a warp per row (dispatch) or token (combine), 16-byte loads, four per lane in flight:
//            enough with many SMs, too few bytes in flight per SM when the grid is small
//   kUnroll  for few SMs, where a warp's round trips to memory per row bound the rate (moe_unroll.cu):
//            the same split of the work, each warp's loads reordered. Dispatch loads the next row's
//            source token while the current row copies, widening it only after that row (widened
//            at once, the current row's payload loads waited on it), and loads a row's payload
//            (sixteen 16-byte loads a lane), scales, topk ids and weights together before storing
//            any: an fp8 row of hidden 7168 is one round trip. Combine looks a token's positions
//            up a token ahead and loads two sources' rows before summing them (in the same order:
//            the same bits as kWarp)
//   kBulk    Hopper bulk async copies (cp.async.bulk, TMA) through a ring of shared-memory stages
//            per block, one thread issuing: ~128 KiB in flight per SM whatever the grid (moe_bulk.cu).
//            Needs sm_90 and rows of a multiple of 16 bytes at 16-byte aligned addresses; anything
//            else runs kWarp.
enum class MoeCopy : int { kWarp = 0, kUnroll = 1, kBulk = 2 };

// ---- dispatch: pull the rows every source rank sends to this rank
// A dispatch whose rank received more rows than its outputs hold (num_worst_tokens), as its
// kernel reports it in host-mapped memory. The first one is kept until the host takes it
// (state 2 -> 0); later ones are not recorded meanwhile.
struct DispatchOverflow {
  int64_t call_id;   // the dispatch's number; a CUDA-graph replay reports the captured call's
  int64_t received;  // rows that arrived for this rank
  int64_t capacity;  // rows the outputs hold (num_worst_tokens); the rows past it were dropped
  int32_t state;     // 0 free, 1 being written, 2 written
  int32_t pad;
};
struct DispatchSource {
  const char* x;              // [N_src, H] payload rows
  const float* x_scales;      // [N_src, num_scales], or null
  const int64_t* topk_idx;    // [N_src, K], or null (a dispatch along a handle)
  const float* topk_weights;  // [N_src, K], or null
  const int32_t* meta;        // the source's routing table
  int64_t num_tokens;         // N_src
};
struct DispatchParams {
  int num_ranks;
  int rank;
  int64_t num_experts;
  DispatchSource src[kMaxRanksPerNode];
  int64_t row_bytes;  // H * element size
  int num_scales;
  int num_topk;
  char* recv_x;
  float* recv_x_scales;
  int64_t* recv_topk_idx;    // local expert ids, -1 for others' experts and for padding rows
  float* recv_topk_weights;
  int64_t capacity;          // rows of the outputs; rows past those received are padding
  int num_blocks;            // the SM budget
  MoeCopy copy;
  int64_t call_id;           // for the overflow report
  DispatchOverflow* overflow;  // host-mapped: where more rows arriving than `capacity` is reported
  Handshake handshake;
};
cudaError_t launch_dispatch(const DispatchParams& params, cudaStream_t stream);

// ---- push dispatch (Options.moe_push, moe_push.cu): each rank reads only its own inputs and
// routing table and writes every row it sends straight into the receiver's outputs, which lie in
// memory every rank maps (the MoE pool): at the row and with the local ids the pull kernel would
// have written there, so the outputs are the same bits. Handshake (same flags as the pull's):
//   block 0 writes this rank's row of the send matrix into every peer's block (counts_to_set),
//   then raises "ready" there: "my stream reached this call, my outputs may be written". Every
//   block waits for every peer's ready before it writes (a receiver's outputs) or reads (the
//   peers' rows of the send matrix in this rank's block). The last block says "done writing
//   yours" to every peer and waits for every peer's done: this rank's outputs are whole when
//   its kernel ends. Rows past a receiver's capacity (num_worst_tokens) are not written; the
//   receiver reports the overflow as the pull kernel does. MoeCopy::kUnroll's row copy whatever
//   Options.moe_copy says.
struct DispatchTarget {  // a receiver's outputs as mapped here (null: none, or nothing to write)
  char* recv_x;
  float* recv_x_scales;
  int64_t* recv_topk_idx;
  float* recv_topk_weights;
  int64_t capacity;  // rows they hold
};
constexpr int kPushCountsStride = kMaxRanksPerNode;  // int32 a rank's row of the send matrix takes
struct DispatchPushParams {
  int num_ranks;
  int rank;
  int64_t num_experts;
  DispatchSource src;                        // this rank's inputs and routing table
  DispatchTarget dst[kMaxRanksPerNode];      // every rank's outputs, this rank's own included
  int32_t* counts_to_set[kMaxRanksPerNode];  // this rank's row of the send matrix in peer r's block
                                             // (null for itself)
  const int32_t* counts;  // [kMaxRanksPerNode][kPushCountsStride] in this rank's block: row s is what
                          // rank s sends to each rank, written before s's ready flag
  int64_t row_bytes;      // H * element size
  int num_scales;
  int num_topk;
  int num_blocks;  // the SM budget
  int64_t call_id;               // for the overflow report
  DispatchOverflow* overflow;    // host-mapped: where more rows arriving than dst[rank].capacity is reported
  Handshake handshake;           // ready and done halves both set (a pushing dispatch has no signal kernel)
};
cudaError_t launch_dispatch_push(const DispatchPushParams& params, cudaStream_t stream);

// ---- combine: for each token, sum the rows the ranks it went to send back
enum class DType : int { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2 };
struct CombineParams {
  int num_ranks;
  int rank;
  int64_t num_experts;
  int64_t num_tokens;
  const int32_t* meta[kMaxRanksPerNode];        // each rank's routing table (this rank's: token_pos)
  const char* x[kMaxRanksPerNode];              // each rank's combine input [M_r, H]
  const float* topk_weights[kMaxRanksPerNode];  // each rank's [M_r, K], or null
  // Rows of each rank's x: a row past them was dropped by an overflowing dispatch
  // (num_worst_tokens too small) and counts as not sent, instead of being read out of bounds.
  int64_t x_rows[kMaxRanksPerNode];
  int64_t hidden;
  DType dtype;
  int num_topk;
  char* out;          // [N, H], dtype
  float* out_weights; // [N, K], or null
  int num_blocks;
  MoeCopy copy;
  Handshake handshake;
  // Device records (moe_records.cuh; null: none): the plan this rank's notify kernel wrote before
  // this kernel, which says where each rank's x and topk_weights lie in its MoE arena (`arenas`),
  // the rows of its x, where this rank's rows start there, and whether anything moves. `x`,
  // `topk_weights`, `x_rows` and meta[s] for s != rank are then unused (every rank's x is in its
  // arena, 16-byte aligned); meta[rank] is this rank's routing table as ever.
  const int64_t* plan;
  const char* arenas[kMaxRanksPerNode];
};
cudaError_t launch_combine(const CombineParams& params, cudaStream_t stream);

}  // namespace ep::kernels
