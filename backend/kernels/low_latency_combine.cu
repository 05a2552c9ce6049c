// Low-latency combine kernels and their launchers: send copies the expert outputs into this
// rank's combine region (and pushes remote tokens' rows to their ranks), recv sums each token's
// rows from their owners. Protocol and buffer layout: low_latency.cuh; the dispatch:
// low_latency_dispatch.cu.
//
// Local peers are reached through the addresses the host mapped once (GroupArgs::peers, from
// nvshmem_ptr: NVLink P2P, or the same GPU under MPS). Remote peers (null there) only through
// NVSHMEM's device API: puts with a signal into symmetric addresses of this rank's own half,
// which NVSHMEM translates for the target.
#include <cuda_bf16.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include "backend/kernels/low_latency.cuh"
#include "backend/kernels/low_latency_device.cuh"  // completion words, peers, warp copies and scans
#include "backend/kernels/low_latency_launch.cuh"  // kWarps, grid sizes, group checks
#include "backend/kernels/module_kernels.hpp"
#include "backend/kernels/whatif_puts.cuh"

namespace ep::kernels::ll {
namespace {

constexpr int kRecvChunk = 256;  // channels per work unit of the combine receive (8 per lane)

// ------------------------------------------------------------------------------ combine send

// Rows of expert le from rank r live at [le][rows of ranks < r + i] in x and in the combine region
// alike (packed, as dispatch's recv_x): the copy keeps the layout and moves only received rows
// (layout[le, r] of them), a warp per row, numbered through prefixes of the per-(expert, rank)
// counts. Then every local rank may pull them; a remote rank r gets its rows pushed, each from
// the region to row [e][i] of its remote_rows (e = this rank's expert le). The remote rows come
// first (their pushes are the long pole; the local copies overlap them), and r's closing signal,
// with their number, goes before any: it needs only the layout. kPushRemote: the group has
// remote peers; without, the kernel holds no NVSHMEM call and fits two blocks per SM unspilled
// (with, it spills a little at two blocks per SM, kept: twice the pushes in flight).
template <bool kPushRemote, bool kCopyPuts = false>
__global__ void __launch_bounds__(kThreads, 2) combine_send_kernel(CombineSendParams p) {
  extern __shared__ int smem[];
  const GroupArgs& g = p.g;
  const int H = p.hidden, E = p.num_experts, R = g.num_ranks, E_local = E / R;
  int* packed = smem;                 // [E + 1]: rows before (le, r) in x, all of them
  int* remote_prefix = smem + E + 1;  // [E + 1]: rows to push before (le, r), remote r only
  int* local_prefix = smem + 2 * (E + 1);  // [E + 1]: rows to copy before (le, r), local r only
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint16_t* region = at<uint16_t>(g.half, g.layout.combine_region());
  const bool zero_copy = p.x == region;
  stamp(g, kCombineSendCounter, 0);
  // The readers of the call before last are done with this half's region (and remote ones with
  // their remote_rows, which this call overwrites, and have reset their flag for this rank).
  // Else (a timeout, or an earlier one: gave_up) the block writes and pushes nothing, and does
  // not arrive: its peers' receives then give up on this rank in turn.
  if (!wait_words(g, g.layout.combine_credits(), kCombineSendCounter, kCombineSendTimeout)) return;
  stamp(g, kCombineSendCounter, 1);
  uint64_t* flag = my_word(g, g.layout.combine_flags());
  if (kPushRemote && blockIdx.x == 0) {  // a warp per remote rank: the closing signal, with the number of rows
    for (int r = warp; r < R; r += kWarps) {
      if (!is_remote(g, r)) continue;
      int rows = 0;
      for (int le = lane; le < E_local; le += 32) rows += min(max(p.layout[le * R + r], 0), p.max_tokens);
      rows = __reduce_add_sync(0xffffffffu, rows);
      if (lane == 0) nvshmemx_signal_op(flag, closing_signal(rows + 1), NVSHMEM_SIGNAL_ADD, r);
    }
  }
  // x's rows of expert le are packed by source rank: (le, r)'s start at packed[q] - packed[le * R]
  // within the expert. Block 0 publishes those offsets for the readers (before its arrival).
  for (int q = threadIdx.x; q < E; q += blockDim.x) packed[q] = min(max(p.layout[q], 0), p.max_tokens);
  __syncthreads();
  if (warp == 0) warp_exclusive_scan(packed, E, lane);
  __syncthreads();
  if (blockIdx.x == 0)
    for (int q = threadIdx.x; q < E; q += blockDim.x)
      at<int>(g.half, g.layout.combine_offsets())[q] = packed[q] - packed[q / R * R];
  if (!zero_copy || kPushRemote) {  // else nothing to move
    // Rows to move: every remote rank's (pushed, from the region: copied in first unless zero
    // copy), then every local rank's (copied in, unless zero copy).
    for (int q = threadIdx.x; q < E; q += blockDim.x) {
      const int rows = packed[q + 1] - packed[q];
      const bool remote = kPushRemote && is_remote(g, q % R);
      remote_prefix[q] = remote ? rows : 0;
      local_prefix[q] = remote || zero_copy ? 0 : rows;
    }
    __syncthreads();
    if (warp == 0) warp_exclusive_scan(remote_prefix, E, lane);
    if (warp == 1) warp_exclusive_scan(local_prefix, E, lane);
    __syncthreads();
    const int64_t warps = int64_t(gridDim.x) * kWarps, pushed = remote_prefix[E];
    for (int64_t m = int64_t(blockIdx.x) * kWarps + warp; m < pushed + local_prefix[E]; m += warps) {
      const bool remote = kPushRemote && m < pushed;
      const int* prefix = remote ? remote_prefix : local_prefix;
      const int mq = int(remote ? m : m - pushed);
      const int q = find_in_prefix(prefix, E, mq);  // q = le * R + r
      const int i = mq - prefix[q], le = q / R, r = q % R;
      const int64_t row = int64_t(le) * R * p.max_tokens + (packed[q] - packed[le * R]) + i;
      if (!zero_copy)
        warp_copy_l2(reinterpret_cast<uint4*>(region + row * H), reinterpret_cast<const uint4*>(p.x + row * H),
                     int64_t(H) * 2 / 16, lane);
      if (kPushRemote && remote) {
        __syncwarp();  // the lanes' copies are in before the put reads them
        uint16_t* dst = at<uint16_t>(g.half, g.layout.remote_rows()) +
                        ((int64_t(g.rank) * E_local + le) * p.max_tokens + i) * H;
        put_signal_nbi_warp<kCopyPuts>(dst, region + row * H, size_t(H) * 2, flag, 1, NVSHMEM_SIGNAL_ADD, r);
      }
    }
  }
  stamp(g, kCombineSendCounter, 2);
  arrive_everywhere(g, g.layout.combine_flags(), false);  // every local rank, rows or not
  stamp(g, kCombineSendCounter, 3);
}

// Waits, without taking them, for the credits of this half's combine region (one block). The
// caller's kernels write the region next and nothing stops them, so this wait ignores gave_up:
// live readers of the call before last finish first, whatever failed elsewhere.
__global__ void combine_region_wait_kernel(GroupArgs g) {
  wait_complete(g, g.layout.combine_credits(), kCombineSendTimeout, /*heed_gave_up=*/false);
}

// ------------------------------------------------------------------------------ combine recv

// out[t] = bf16(sum over k = 0..K-1 with a valid expert of w[t,k] * row(t, k)), in float32,
// multiply then add (no FMA), in k order: torch_ep.reference does the same arithmetic. Row
// (t, k) is row [le][offset + send_slot] of its owner's combine region, offset where the owner
// put this rank's rows for le (published in its half), or pushed here for a remote owner.
__global__ void __launch_bounds__(kThreads, 1) combine_recv_kernel(CombineRecvParams p) {
  const GroupArgs& g = p.g;
  const int R = g.num_ranks, H = p.hidden, K = p.num_topk, E = p.num_experts, E_local = E / R;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  stamp(g, kCombineRecvCounter, 0);
  // Else some owner's rows never came (or an earlier wait gave up): nothing is read, the block's
  // rows of out are zeros, and the credits go back (this block reads nothing more).
  const bool rows_ready = wait_words(g, g.layout.combine_flags(), kCombineRecvCounter, kCombineRecvTimeout);
  stamp(g, kCombineRecvCounter, 1);

  const int chunks = (H + kRecvChunk - 1) / kRecvChunk;
  const int64_t units = int64_t(p.num_tokens) * chunks;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  const int64_t region = g.layout.combine_region();
  for (int64_t u = int64_t(blockIdx.x) * kWarps + warp; u < units; u += warps) {
    const int t = int(u / chunks), c = int(u % chunks);
    const int ch0 = c * kRecvChunk + lane * 8;
    if (ch0 >= H) continue;
    if (!rows_ready) {
      *reinterpret_cast<uint4*>(p.out + int64_t(t) * H + ch0) = make_uint4(0, 0, 0, 0);
      continue;
    }
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    // Eight slots' rows in flight at once (all of DeepEP's top-8), then summed in k order.
    constexpr int kSlotsInFlight = 8;
    for (int k0 = 0; k0 < K; k0 += kSlotsInFlight) {
      uint4 v[kSlotsInFlight];
      float w[kSlotsInFlight];
      bool routed[kSlotsInFlight];
#pragma unroll
      for (int s = 0; s < kSlotsInFlight; ++s) {
        const int k = k0 + s;
        const int64_t q = int64_t(t) * K + k;
        const int64_t e = k < K ? __ldg(p.topk_idx + q) : -1;
        const int slot = e >= 0 && e < E ? __ldg(p.send_slot + q) : -1;
        routed[s] = slot >= 0 && slot < p.max_tokens;
        if (!routed[s]) continue;
        const int owner = int(e) / E_local, le = int(e) - owner * E_local;
        const char* src;
        if (is_remote(g, owner)) {  // pushed here by the owner
          src = g.half + g.layout.remote_rows() + ((e * p.max_tokens + slot) * H + ch0) * 2;
        } else {  // read at the owner, where this rank's rows for le start at its published offset
          const int start = __ldcg(at<int>(g.peers[owner], g.layout.combine_offsets()) + le * R + g.rank);
          const int64_t row = int64_t(le) * R * p.max_tokens + start + slot;
          src = g.peers[owner] + region + (row * H + ch0) * 2;
        }
        w[s] = __ldg(p.topk_weights + q);
        v[s] = __ldcg(reinterpret_cast<const uint4*>(src));
      }
#pragma unroll
      for (int s = 0; s < kSlotsInFlight; ++s) {
        if (!routed[s]) continue;
        const uint32_t* w32 = reinterpret_cast<const uint32_t*>(&v[s]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(w[s], bf16_bits_to_float(w32[i] & 0xffffu)));
          acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(w[s], bf16_bits_to_float(w32[i] >> 16)));
        }
      }
    }
    uint32_t out[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i]));
      const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * i + 1]));
      out[i] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(p.out + int64_t(t) * H + ch0) = make_uint4(out[0], out[1], out[2], out[3]);
  }
  stamp(g, kCombineRecvCounter, 2);
  arrive_everywhere(g, g.layout.combine_credits(), true);  // every row read: the owners may write again
  stamp(g, kCombineRecvCounter, 3);
}

}  // namespace

cudaError_t launch_combine_send(const CombineSendParams& p, cudaStream_t stream) {
  if (!valid_group(p.g) || p.num_experts % p.g.num_ranks || p.hidden % kHiddenMultiple) return cudaErrorInvalidValue;
  const bool zero_copy = reinterpret_cast<const char*>(p.x) == p.g.half + p.g.layout.combine_region();
  // Zero copy with every peer local: nothing to move, one block only takes the credits and
  // raises the flags.
  const bool idle = zero_copy && !any_remote(p.g);
  const int64_t smem = 3 * (int64_t(p.num_experts) + 1) * int64_t(sizeof(int));
  if (any_remote(p.g)) {
    auto* kernel = p.g.whatif_copy_puts ? combine_send_kernel<true, true> : combine_send_kernel<true>;
    if (const cudaError_t err = allow_dynamic_smem(kernel, smem); err != cudaSuccess) return err;
    kernel<<<p.g.num_blocks, kThreads, smem, stream>>>(p);
  } else {
    if (const cudaError_t err = allow_dynamic_smem(combine_send_kernel<false>, smem); err != cudaSuccess) return err;
    combine_send_kernel<false><<<idle ? 1 : p.g.num_blocks, kThreads, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_combine_recv(const CombineRecvParams& p, cudaStream_t stream) {
  if (!valid_group(p.g) || p.num_experts % p.g.num_ranks || p.hidden % kHiddenMultiple ||
      (p.num_tokens > 0 && !p.send_slot))
    return cudaErrorInvalidValue;
  const int64_t units = int64_t(p.num_tokens) * ((p.hidden + kRecvChunk - 1) / kRecvChunk);
  combine_recv_kernel<<<grid_for(p.g.num_blocks, units), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_combine_region_wait(const GroupArgs& g, cudaStream_t stream) {
  if (!valid_group(g)) return cudaErrorInvalidValue;
  combine_region_wait_kernel<<<1, 64, 0, stream>>>(g);
  return cudaGetLastError();
}

}  // namespace ep::kernels::ll

const void* ep::kernels::low_latency_combine_module_kernel() {
  return reinterpret_cast<const void*>(ep::kernels::ll::combine_region_wait_kernel);
}
