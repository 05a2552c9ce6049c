// The one-copy move of all_to_all_v's kernels, for groups with a comm pool (all_to_all_v.cuh says
// when the plan chooses it). Device functions only: all_to_all_v.cu's move kernels run them.
//
// Push, not pull: the sender's blocks write each message straight into the receiver's output
// (over NVLink between GPUs, stores are posted and need no round trip), and the receiver, whose
// next kernels read that output, is the one that waits. A pull would make every sender wait
// instead, until each receiver had read its input.
//
// Work: this rank's messages, one after another from its own destination onwards (so that ranks
// start on different receivers), form one stream of bytes.
// - By default (push_pieces) the blocks that fit at once take its 64 KiB pieces in turn from a
//   counter until none is left: a block that starts late takes fewer, rather than a wave of its own.
// - With TORCH_EP_POOL_PIECES=0 (push) worker w of W copies the piece [w * piece, (w + 1) * piece),
//   piece = the stream over W (at least one pass of a block's loads), whatever messages it crosses:
//   one contiguous piece per block, as a plain copy kernel cuts its range.
// Either way long runs of 16-byte accesses, and one fence per block rather than one per chunk (a
// fence waits until the block's stores have landed, while its loads stand still). No block waits
// on another before its copies, so the grid need not be resident at once (ranks sharing a GPU
// hold a slice of its SMs each).
//
// Done (push; push_pieces counts pieces, below): a message's "segments" are the workers whose
// pieces it crosses (an empty message: one, the worker its offset falls in), a function of the
// plan that every worker computes alike; each counts its segment for the destination after its
// fence, and the one that counts the last raises the destination's "done" flag for this rank.
#pragma once

#include <cstdint>
#include <type_traits>

#include "backend/kernels/all_to_all_v.cuh"
#include "backend/kernels/copy.cuh"
#include "backend/kernels/sync.cuh"

namespace ep::kernels::pool {

constexpr uint64_t kMinPiece = kPoolMinPiece;  // all_to_all_v.cuh's, shared with the host

// Issue 16's candidates, off until tools/pool_copy_probe.cu (gpu_suite.sh's pool_probe step) and the
// all_to_all benchmark say otherwise; a build sets them with -D (CUDAFLAGS on a fresh build folder).
// kPieceAlign: a piece is a multiple of it. 16 keeps vector copies aligned; 128 or more starts every
// block on a cache line where the messages start on one (tools/sm_copy_ceiling.cu's 16-byte loads
// ran 5-16 % slower per SM at the SM counts whose pieces began 48 or 96 bytes into a line).
#ifndef TORCH_EP_POOL_PIECE_ALIGN
#define TORCH_EP_POOL_PIECE_ALIGN 16
#endif
constexpr uint64_t kPieceAlign = TORCH_EP_POOL_PIECE_ALIGN;
static_assert(kPieceAlign >= 16 && kPieceAlign % 16 == 0 && kMinPiece % kPieceAlign == 0,
              "TORCH_EP_POOL_PIECE_ALIGN: a multiple of 16 that divides 64 KiB");
// TORCH_EP_POOL_STREAMING_STORES: stores evict-first (st.global.cs). Off: the receiver's next kernels
// read the output, which plain stores leave in L2 where it fits (small calls); 64 MiB do not fit.
#ifndef TORCH_EP_POOL_STREAMING_STORES
#define TORCH_EP_POOL_STREAMING_STORES 0
#endif
using PushStore = std::conditional_t<TORCH_EP_POOL_STREAMING_STORES != 0, StreamingStore, PlainStore>;

__device__ __forceinline__ uint32_t* word_at(char* block, size_t offset) {
  return reinterpret_cast<uint32_t*>(block + offset);
}

__device__ __forceinline__ uint64_t piece_bytes(uint64_t total, uint64_t workers) {
  const uint64_t even = ((total + workers - 1) / workers + kPieceAlign - 1) / kPieceAlign * kPieceAlign;
  return even > kMinPiece ? even : kMinPiece;
}

// This rank's part of the plan, per destination (PoolPlan's words), read into `plan` by the block:
// bytes, their offset in its arena, their offset in input.
struct PushPlan {
  const int64_t *bytes_to, *arena_offset, *input_offset;
};
__device__ __forceinline__ PushPlan load_push_plan(const AllToAllVParams& p, int64_t* plan) {
  const int R = p.num_ranks;
  for (int i = threadIdx.x; i < 3 * R; i += blockDim.x) plan[i] = __ldcg(p.pool_plan + PoolPlan::bytes(0) + i);
  __syncthreads();
  return {plan, plan + R, plan + 2 * R};
}

// After the caller's fence: `done` more parts of this rank's message to `dst` are written; the
// count that reaches `parts` (the message's whole) raises dst's "done" flag for this rank.
__device__ __forceinline__ void count_parts(const AllToAllVParams& p, int dst, uint32_t done, uint64_t parts) {
  using L = AllToAllVLayout;
  uint32_t* count = word_at(p.blocks[p.rank], L::pool_chunk_count(dst));
  if (atomicAdd(count, done) + done == parts) {
    // The acquire side of the count: the other parts' stores, fenced before their counts, come
    // before the release below (the atomic alone is relaxed).
    __threadfence();
    *reinterpret_cast<volatile uint32_t*>(count) = 0;  // ready for the next call
    store_release_in(word_at(p.blocks[dst], L::pool_done_flag(p.rank)), 1, p.gpu_scope);
  }
}

// Worker `worker` of `workers` (one block of kThreads each): its piece of the stream, then its
// segments counted.
template <int kUnroll, int kThreads>
__device__ void push(const AllToAllVParams& p, uint64_t worker, uint64_t workers) {
  const int R = p.num_ranks, me = p.rank;
  __shared__ int64_t plan[3 * kMaxRanksPerNode];
  const PushPlan mine = load_push_plan(p, plan);
  const int64_t *bytes_to = mine.bytes_to, *arena_offset = mine.arena_offset, *input_offset = mine.input_offset;
  uint64_t total = 0;
  for (int d = 0; d < R; ++d) total += uint64_t(bytes_to[d]);
  const uint64_t piece = piece_bytes(total, workers), lo = worker * piece;
  const uint64_t hi = lo + piece < total ? lo + piece : total;
  uint64_t begin = 0;  // the message's offset in the stream
  for (int k = 0; k < R; ++k) {
    const int d = (me + k) % R;
    const uint64_t end = begin + uint64_t(bytes_to[d]);
    const uint64_t from = begin > lo ? begin : lo, to = end < hi ? end : hi;
    if (from < to)
      block_copy_call<kUnroll, kThreads>(p.pool[d] + arena_offset[d] + (from - begin),
                                         p.input + input_offset[d] + (from - begin), to - from, StreamingLoad{},
                                         PushStore{});
    begin = end;
  }
  __syncthreads();  // every thread's stores are issued before thread 0's fence
  if (threadIdx.x != 0) return;
  fence_in(p.gpu_scope);
  begin = 0;
  for (int k = 0; k < R; ++k) {
    const int d = (me + k) % R;
    const uint64_t bytes = uint64_t(bytes_to[d]), end = begin + bytes;
    const uint64_t first = begin / piece < workers - 1 ? begin / piece : workers - 1;
    const uint64_t last = bytes == 0 ? first : (end - 1) / piece;
    if (worker >= first && worker <= last) count_parts(p, d, 1, last - first + 1);
    begin = end;
  }
}

// Before the plan (kSelfFirst): this rank's message to itself as the host knows it
// (all_to_all_single), in its place of `plan`; the plan, once it has met the peers and found that
// they agree, says the same.
__device__ __forceinline__ PushPlan host_self_plan(const AllToAllVParams& p, int64_t* plan) {
  const int R = p.num_ranks, me = p.rank;
  if (threadIdx.x == 0) {
    int64_t sent_before = 0, expected_before = 0;
    for (int r = 0; r < me; ++r) sent_before += p.host_splits[r], expected_before += p.expected_splits[r];
    plan[me] = p.host_splits[me] * p.row_bytes;
    plan[R + me] = p.out_arena + expected_before * p.row_bytes;
    plan[2 * R + me] = sent_before * p.row_bytes;
  }
  __syncthreads();
  return {plan, plan + R, plan + 2 * R};
}

// The move in pieces taken in turn (p.pool_pieces): each message cut into pieces of
// p.pool_piece_bytes (an empty message: one empty piece, so that its "done" flag rises too),
// numbered in the stream's order; every block takes the next number from the counter until none is
// left. Each block counts the pieces it copied per destination once, after one fence at its end;
// the count that reaches the message's pieces raises the destination's "done" flag.
// p.pool_ticket_ahead: thread 0 takes the next number as its block starts a piece, so that the
// atomic's round trip through L2 overlaps the copy instead of standing between two pieces. Either
// way a block stops at the first number past the last piece, and no piece is taken twice.
// kSelfFirst (p.pool_self_first): the stream begins with this rank's message to itself, whose place
// the host knows; its pieces go before the plan is there (the caller's plan_says_one_copy() waits
// for it, and says whether the plan chose one copy), so that the copy covers the plan's meeting
// with the peers. Returns false, counting nothing, when the plan did not choose one copy. A
// template parameter: as a runtime branch it would cost the default's kernels registers (4x the
// spills, ptxas -v).
template <int kUnroll, int kThreads, bool kSelfFirst, typename PlanSaysOneCopy>
__device__ bool push_pieces(const AllToAllVParams& p, PlanSaysOneCopy plan_says_one_copy) {
  const int R = p.num_ranks, me = p.rank;
  const uint64_t piece_bytes = p.pool_piece_bytes ? p.pool_piece_bytes : kMinPiece;
  __shared__ int64_t plan[3 * kMaxRanksPerNode];
  __shared__ uint32_t copied[kMaxRanksPerNode];  // by this block, per position k in the stream
  __shared__ uint64_t taken;
  if (threadIdx.x < R) copied[threadIdx.x] = 0;  // ordered by the barriers below
  bool planned = !kSelfFirst;  // until then only `plan`'s words for this rank hold
  const PushPlan mine = kSelfFirst ? host_self_plan(p, plan) : load_push_plan(p, plan);
  auto pieces_of = [&](int k) {
    const uint64_t bytes = uint64_t(mine.bytes_to[(me + k) % R]);
    return bytes == 0 ? uint64_t(1) : (bytes + piece_bytes - 1) / piece_bytes;
  };
  uint32_t* next = word_at(p.blocks[me], AllToAllVLayout::kPoolNextPiece);
  if (threadIdx.x == 0) taken = atomicAdd(next, 1u);
  for (;;) {
    __syncthreads();  // thread 0's `taken` is written
    uint64_t piece = taken;
    __syncthreads();  // every thread has read `taken` before thread 0 writes the next
    if constexpr (kSelfFirst) {
      if (!planned && piece >= pieces_of(0)) {
        if (!plan_says_one_copy()) return false;  // uniform across the block
        load_push_plan(p, plan);  // over the host's words: every thread is past their last read
        planned = true;
      }
    }
    int k = 0;
    if (planned) {
      for (; k < R; ++k) {
        const uint64_t n = pieces_of(k);
        if (piece < n) break;
        piece -= n;
      }
      if (k == R) break;  // none left (uniform across the block)
    }
    uint32_t ahead = 0;
    if (p.pool_ticket_ahead && threadIdx.x == 0) ahead = atomicAdd(next, 1u);  // read only after the copy
    const int d = (me + k) % R;
    const uint64_t from = piece * piece_bytes, bytes = uint64_t(mine.bytes_to[d]);
    const uint64_t to = from + piece_bytes < bytes ? from + piece_bytes : bytes;
    if (from < to)
      block_copy_call<kUnroll, kThreads>(p.pool[d] + mine.arena_offset[d] + from, p.input + mine.input_offset[d] + from,
                                         to - from, StreamingLoad{}, PushStore{});
    if (threadIdx.x == 0) {
      ++copied[k];
      taken = p.pool_ticket_ahead ? ahead : atomicAdd(next, 1u);
    }
  }
  if (threadIdx.x != 0) return true;  // the loop's last barrier: every thread's stores are issued
  fence_in(p.gpu_scope);
  for (int k = 0; k < R; ++k)
    if (copied[k] > 0) count_parts(p, (me + k) % R, copied[k], pieces_of(k));
  return true;
}

// The last block of this rank's move: every source's "done" flag (this rank's own included), so
// that the call ends once this rank's output is whole.
__device__ __forceinline__ void take_done(const AllToAllVParams& p) {
  using L = AllToAllVLayout;
  const uint64_t deadline = deadline_after(p.timeout_ns);
  const int src = threadIdx.x;
  if (src < p.num_ranks && !take(word_at(p.blocks[p.rank], L::pool_done_flag(src)), deadline, p.abort, p.gpu_scope))
    atomicExch(p.error, 1 + src);
}

}  // namespace ep::kernels::pool
