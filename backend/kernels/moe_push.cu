// MoE dispatch that pushes (Options.moe_push; the protocol is in moe.cuh, DispatchPushParams): a
// warp per row this rank sends, over its send list to each rank in turn (its rows to rank 0, then
// to rank 1, ...), each row stored into the receiver's outputs by moe_unroll.cu's row copy
// (copy_row_to). The receiver's row is where the pull kernel would have put it: the rows of
// lower ranks first, then this rank's in its token order.
#include "backend/kernels/moe_device.cuh"
#include "backend/kernels/module_kernels.hpp"
#include "backend/kernels/sync.cuh"

namespace ep::kernels {
namespace {

// Rows rank s sends to rank d: this rank's from its routing table, a peer's from the row of the
// send matrix it wrote into this rank's block before its ready flag (read after waiting for it).
__device__ __forceinline__ int64_t rows_sent(const DispatchPushParams& p, int s, int d) {
  if (s == p.rank) return p.src.meta[MetaLayout::tokens_per_rank() + d];
  return *reinterpret_cast<const volatile int32_t*>(p.counts + s * kPushCountsStride + d);
}

template <typename V, int kDepth>
__global__ void __launch_bounds__(kThreads) dispatch_push_kernel(DispatchPushParams p) {
  __shared__ int64_t first_item[kMaxRanksPerNode + 1];  // where this rank's rows to rank d start in its send list
  __shared__ int64_t first_row_on[kMaxRanksPerNode];    // where they start among rank d's received rows
  __shared__ RowOutputs outputs[kMaxRanksPerNode];      // rank d's outputs as mapped here
  __shared__ int64_t capacity[kMaxRanksPerNode];
  __shared__ int64_t received_here;                     // rows every rank sends to this one
  const int R = p.num_ranks, me = p.rank;
  const int lane = threadIdx.x & 31;

  // This rank's row of the send matrix to every peer, then the ready half of the handshake (the
  // same thread raises the flag after its stores and a system fence).
  if (blockIdx.x == 0 && threadIdx.x < R && p.counts_to_set[threadIdx.x]) {
    for (int d = 0; d < R; ++d) p.counts_to_set[threadIdx.x][d] = int32_t(rows_sent(p, me, d));
  }
  // A receiver whose ready word this block did not see (a timeout, or the watchdog releasing a
  // failed group) may still use its outputs: store nothing, only finish the handshake.
  if (!handshake_begin</*kSayIfSeen=*/true>(p.handshake, R)) {
    handshake_end</*kPushed=*/true>(p.handshake, R);
    return;
  }

  if (threadIdx.x < 32) {  // lane d: R <= kMaxRanksPerNode = 32
    const int d = lane;
    int64_t before = 0, sends = 0, arriving = 0;
    if (d < R) {
      for (int s = 0; s < me; ++s) before += rows_sent(p, s, d);
      sends = rows_sent(p, me, d);
      arriving = rows_sent(p, d, me);
    }
    for (int offset = 1; offset < 32; offset <<= 1) {  // inclusive scan of sends, sum of arriving
      const int64_t below = __shfl_up_sync(0xffffffffu, sends, offset);
      if (d >= offset) sends += below;
      arriving += __shfl_xor_sync(0xffffffffu, arriving, offset);
    }
    if (d < R) {
      first_row_on[d] = before;
      first_item[d + 1] = sends;
      const DispatchTarget& to = p.dst[d];
      outputs[d] = {to.recv_x, to.recv_x_scales, to.recv_topk_idx, to.recv_topk_weights};
      capacity[d] = to.capacity;
    }
    if (d == 0) {
      first_item[0] = 0;
      received_here = arriving;
    }
  }
  __syncthreads();
  report_overflow(p.overflow, p.call_id, received_here, capacity[me]);
  push_send_list<V, kDepth>(p.src, R, me, p.num_experts, first_item, first_row_on, outputs, capacity, received_here,
                            p.row_bytes, p.num_scales, p.num_topk);
  handshake_end</*kPushed=*/true>(p.handshake, R);
}

}  // namespace

cudaError_t launch_dispatch_push(const DispatchPushParams& p, cudaStream_t stream) {
  if (p.num_ranks < 1 || p.num_ranks > kMaxRanksPerNode || p.num_blocks < 1) return cudaErrorInvalidValue;
  // The widest access that the row size, this rank's x and every receiver's recv_x allow.
  int vec = 16;
  auto fits = [&](const void* ptr) { return !ptr || aligned(ptr, vec); };
  for (;; vec /= 2) {
    bool ok = p.row_bytes % vec == 0 && fits(p.src.x);
    for (int d = 0; d < p.num_ranks; ++d) ok = ok && fits(p.dst[d].recv_x);
    if (ok || vec == 1) break;
  }
  // Warps for every row this rank may send (a token goes to each rank at most once) and for its
  // padding rows; at most the SM budget.
  const int64_t rows = p.src.num_tokens * p.num_ranks;
  const int grid = grid_for_warps(p.num_blocks, rows > p.dst[p.rank].capacity ? rows : p.dst[p.rank].capacity);
  with_access_type(vec, [&](auto v) {
    dispatch_push_kernel<decltype(v), kPushDepth><<<grid, kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

const void* moe_push_module_kernel() { return reinterpret_cast<const void*>(dispatch_push_kernel<int4, kPushDepth>); }

}  // namespace ep::kernels
