// The one-copy move of all_to_all_v's kernels, for groups with a comm pool (all_to_all_v.cuh says
// when the plan chooses it). Device functions only: all_to_all_v.cu's move kernel runs them.
//
// Push, not pull: the sender's blocks write each message straight into the receiver's output
// (over NVLink between GPUs, stores are posted and need no round trip), and the receiver, whose
// next kernels read that output, is the one that waits. A pull would make every sender wait
// instead, until each receiver had read its input.
//
// Work: each message is cut into chunks of one size (about two per block over the whole call),
// an empty message is one empty chunk; chunk i of the call goes to block i % gridDim.x, so
// uneven splits still spread over every block. No block waits on another before its copies, so
// the grid need not be resident at once (ranks sharing a GPU hold a slice of its SMs each).
#pragma once

#include <cstdint>

#include "backend/kernels/all_to_all_v.cuh"
#include "backend/kernels/copy.cuh"
#include "backend/kernels/sync.cuh"

namespace ep::kernels::pool {

constexpr uint64_t kMinChunk = 32 << 10;  // what one block of 512 threads has in flight (4 x 16 B each)

__device__ __forceinline__ uint32_t* word_at(char* block, size_t offset) {
  return reinterpret_cast<uint32_t*>(block + offset);
}

__device__ __forceinline__ uint64_t chunk_bytes(uint64_t total, uint64_t blocks) {
  const uint64_t per_chunk = (total + 2 * blocks - 1) / (2 * blocks);
  const uint64_t rounded = (per_chunk + 15) / 16 * 16;  // 16-byte multiples keep vector copies aligned
  return rounded < kMinChunk ? kMinChunk : rounded;
}

// An empty message still counts one chunk: its "done" signal goes like any other.
__device__ __forceinline__ uint64_t chunks_of(uint64_t bytes, uint64_t chunk) {
  return bytes == 0 ? 1 : (bytes + chunk - 1) / chunk;
}

// This block's chunks. After each, the block counts it for its destination; the block that
// counts a message's last chunk raises the destination's "done" flag for this rank.
template <int kUnroll>
__device__ void push(const AllToAllVParams& p) {
  using L = AllToAllVLayout;
  const int R = p.num_ranks, me = p.rank;
  const int64_t* plan = p.pool_plan;
  uint64_t total = 0;
  for (int d = 0; d < R; ++d) total += uint64_t(plan[PoolPlan::bytes(d)]);
  const uint64_t chunk = chunk_bytes(total, gridDim.x);
  uint64_t items = 0;
  for (int d = 0; d < R; ++d) items += chunks_of(uint64_t(plan[PoolPlan::bytes(d)]), chunk);
  for (uint64_t i = blockIdx.x; i < items; i += gridDim.x) {
    // Item i: chunk c of the message to d; destinations in turn from this rank's own onwards,
    // so that ranks start on different receivers.
    int d = me;
    uint64_t c = i, n = 1;
    for (int k = 0; k < R; ++k) {
      d = (me + k) % R;
      n = chunks_of(uint64_t(plan[PoolPlan::bytes(d)]), chunk);
      if (c < n) break;
      c -= n;
    }
    const uint64_t bytes = uint64_t(plan[PoolPlan::bytes(d)]), from = c * chunk;
    const uint64_t length = bytes > from ? (bytes - from < chunk ? bytes - from : chunk) : 0;
    if (length > 0)
      block_copy<kUnroll>(p.pool[d] + plan[PoolPlan::arena_offset(R, d)] + from,
                          p.input + plan[PoolPlan::input_offset(R, d)] + from, length);
    __syncthreads();  // every thread's stores are issued before the count
    if (threadIdx.x == 0) {
      __threadfence_system();
      uint32_t* count = word_at(p.blocks[me], L::pool_chunk_count(d));
      if (atomicAdd(count, 1u) + 1 == n) {
        *reinterpret_cast<volatile uint32_t*>(count) = 0;  // ready for the next call
        __threadfence_system();
        store_release(word_at(p.blocks[d], L::pool_done_flag(me)), 1);
      }
    }
  }
}

// Every block, after push: the last of this rank's blocks to get here takes every source's
// "done" flag (this rank's own included), so that the call ends once this rank's output is whole.
__device__ void finish(const AllToAllVParams& p) {
  using L = AllToAllVLayout;
  const int R = p.num_ranks, me = p.rank;
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t* finished = word_at(p.blocks[me], L::kPoolFinished);
    last = atomicAdd(finished, 1u) + 1 == gridDim.x;
    if (last) *reinterpret_cast<volatile uint32_t*>(finished) = 0;
  }
  __syncthreads();
  if (!last) return;
  const uint64_t deadline = now_ns() + p.timeout_ns;
  const int src = threadIdx.x;
  if (src < R && !take(word_at(p.blocks[me], L::pool_done_flag(src)), deadline, p.abort))
    atomicExch(p.error, 1 + src);
}

}  // namespace ep::kernels::pool
