// Low-latency dispatch / combine kernels (protocol and buffer layout: low_latency.cuh).
//
// Peers are reached through nvshmem_ptr: every rank of the group must map every other's
// symmetric heap (NVLink P2P, or the same GPU under MPS). A peer it cannot map is reported as
// an error; remote (network) puts are not implemented here.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include "backend/kernels/low_latency.cuh"
#include "backend/kernels/sync.cuh"  // now_ns, load_acquire, store_release

namespace ep::kernels::ll {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kSendChunk = 512;      // channels a warp moves per work unit (16 per lane)
constexpr int kRecvChunk = 256;      // channels per work unit of the combine receive (8 per lane)

// After this thread's own system fence, a plain system-scope store publishes like a release.
__device__ __forceinline__ void store_relaxed_u64(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// The first error wins, mostly: a plain check-then-store (a race only picks which error shows),
// as the word is pinned host memory, where device atomics are not guaranteed on every platform.
__device__ __forceinline__ void report(int* error, int kind, int peer) {
  volatile int* word = error;
  if (*word == 0) *word = kind * 65536 + peer + 1;
  __threadfence_system();
}

// Waits until *p != 0 and returns it; 0 after the deadline (the peer never came).
__device__ __forceinline__ uint64_t wait_nonzero(const uint64_t* p, uint64_t deadline) {
  uint64_t v;
  while ((v = load_acquire(p)) == 0) {
    if (now_ns() > deadline) return 0;
    __nanosleep(64);
  }
  return v;
}

// Thread 0 of the block stamps `point` of `kernel` (a no-op unless tracing).
__device__ __forceinline__ void stamp(const GroupArgs& g, Counter kernel, int point) {
  if (g.trace && threadIdx.x == 0 && blockIdx.x < kTraceBlocks)
    g.trace[(int64_t(kernel) * kTraceBlocks + blockIdx.x) * kTracePoints + point] = now_ns();
}

template <typename T>
__device__ __forceinline__ T* at(char* base, int64_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

// Every rank's address of this half, for the threads r < R of the block; null where a peer is
// not mapped (reported once, by block 0).
__device__ __forceinline__ void map_peers(const GroupArgs& g, char** peer_half) {
  for (int r = threadIdx.x; r < g.num_ranks; r += blockDim.x) {
    peer_half[r] = static_cast<char*>(nvshmem_ptr(g.half, r));
    if (!peer_half[r] && blockIdx.x == 0) report(g.error, kNoPeerMapping, r);
  }
}

// Waits (threads r < R) until rank r has given the credit of `credits[r]` back. Read only: the
// last block of the kernel takes the credits once every block has seen them.
__device__ __forceinline__ void wait_credits(const GroupArgs& g, int64_t credits, int error_kind) {
  const uint64_t deadline = now_ns() + g.timeout_ns;
  for (int r = threadIdx.x; r < g.num_ranks; r += blockDim.x)
    if (!wait_nonzero(at<uint64_t>(g.half, credits + 8 * r), deadline)) report(g.error, error_kind, r);
}

// True in the one block that finishes last; every block's writes (to peers as well) are
// visible system-wide before it returns true, and the counter is back at zero. Each block
// orders its writes before its count at GPU scope only; the last block's one system fence
// then covers them all (fences are cumulative), as a system fence in every block is costly.
__device__ __forceinline__ bool last_block(const GroupArgs& g, Counter counter) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t* c = at<uint32_t>(g.half, g.layout.counters() + 4 * counter);
    __threadfence();
    last = atomicAdd(c, 1u) == gridDim.x - 1;
    if (last) {
      *c = 0;
      __threadfence_system();
    }
  }
  __syncthreads();
  return last;
}

// Sets `offset` (a flag or credit slot) to `value` in every rank's half, a release store per
// rank: what this block (and, through last_block, the grid) wrote before is visible first.
__device__ __forceinline__ void signal_ranks(const GroupArgs& g, char* const* peer_half, int64_t offset,
                                             uint64_t value) {
  for (int r = threadIdx.x; r < g.num_ranks; r += blockDim.x)
    if (peer_half[r]) store_release(at<uint64_t>(peer_half[r], offset), value);
}

// A warp copies n 16-byte words, eight L2 loads in flight per lane before any store: rows are
// a few kilobytes, so a copy is a handful of memory round trips, not one per word.
__device__ __forceinline__ void warp_copy_l2(uint4* dst, const uint4* src, int64_t n, int lane) {
  constexpr int kInFlight = 8;
  for (int64_t base = lane; base < n; base += 32 * kInFlight) {
    uint4 v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u)
      if (base + 32 * u < n) v[u] = __ldcg(src + base + 32 * u);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u)
      if (base + 32 * u < n) dst[base + 32 * u] = v[u];
  }
}

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// fp8 scale of a group whose largest magnitude is `amax`: amax / 448 (amax at least 1e-4),
// rounded up to a power of two with `round_scale`. torch_ep.reference computes the same.
__device__ __forceinline__ float fp8_scale(float amax, bool round_scale) {
  float scale = __fdiv_rn(fmaxf(amax, 1e-4f), 448.f);
  if (round_scale) {
    uint32_t bits = __float_as_uint(scale);
    if (bits & 0x7fffffu) bits = (bits & 0x7f800000u) + 0x800000u;
    scale = __uint_as_float(bits);
  }
  return scale;
}

// ------------------------------------------------------------------------------ pair numbering

// This rank's (token, slot) pairs numbered per expert in pair order (the reference's order):
// the dispatch sends pair q = t*K + k to row slot(q) of expert idx[q]'s block for this rank, and
// the combine finds the row there again. Shared memory (numbering_smem): idx [N*K] (int32
// expert ids, -1 when not routed), rank_in_segment [N*K], segment_base [kWarps][E] (per-warp
// counts, then their exclusive prefix), totals [E].
struct PairSlots {
  int* idx;
  int* rank_in_segment;
  int* segment_base;
  int* totals;
  int segment;  // pairs per warp segment
  int num_experts;
  __device__ int slot(int q) const { return rank_in_segment[q] + segment_base[(q / segment) * num_experts + idx[q]]; }
};

// Every block computes the whole numbering (a few microseconds; no grid-wide step needed).
// Ends with __syncthreads.
__device__ PairSlots number_pairs(const GroupArgs& g, const int64_t* topk_idx, int num_pairs, int E, int* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  PairSlots s;
  s.idx = smem;
  s.rank_in_segment = s.idx + num_pairs;
  s.segment_base = s.rank_in_segment + num_pairs;
  s.totals = s.segment_base + kWarps * E;
  s.segment = (num_pairs + kWarps * 32 - 1) / (kWarps * 32) * 32;
  s.num_experts = E;
  for (int i = threadIdx.x; i < num_pairs; i += blockDim.x) {
    const int64_t e = topk_idx[i];
    const bool valid = e >= 0 && e < E;
    if (!valid && e != -1 && blockIdx.x == 0) report(g.error, kBadExpert, g.rank);
    s.idx[i] = valid ? int(e) : -1;
  }
  for (int i = threadIdx.x; i < kWarps * E; i += blockDim.x) s.segment_base[i] = 0;
  __syncthreads();

  // Per-warp counts over contiguous segments of pairs, 32 pairs at a time.
  {
    const int begin = warp * s.segment, end = min(num_pairs, begin + s.segment);
    int* counts = s.segment_base + warp * E;
    for (int base = begin; base < end; base += 32) {
      const int q = base + lane;
      const int e = q < end ? s.idx[q] : -1;
      const unsigned same = __match_any_sync(0xffffffffu, e);
      const int before = e >= 0 ? counts[e] : 0;
      __syncwarp();
      if (e >= 0) {
        s.rank_in_segment[q] = before + __popc(same & ((1u << lane) - 1));
        if (lane == __ffs(same) - 1) counts[e] = before + __popc(same);
      }
      __syncwarp();
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int running = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int c = s.segment_base[w * E + e];
      s.segment_base[w * E + e] = running;
      running += c;
    }
    s.totals[e] = running;
  }
  __syncthreads();
  return s;
}

// ------------------------------------------------------------------------------ dispatch send

__global__ void __launch_bounds__(kThreads, 2) dispatch_send_kernel(DispatchSendParams p) {
  extern __shared__ int smem[];
  __shared__ char* peer_half[kMaxRanks];
  const GroupArgs& g = p.g;
  const int R = g.num_ranks, E = p.num_experts, K = p.num_topk, H = p.hidden;
  const int E_local = E / R;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  stamp(g, kDispatchSendCounter, 0);
  map_peers(g, peer_half);
  // The numbering first: the credit it then waits for is almost always there already.
  const PairSlots slots = number_pairs(g, p.topk_idx, p.num_tokens * K, E, smem);
  if (blockIdx.x == 0)
    for (int e = threadIdx.x; e < E; e += blockDim.x)
      if (slots.totals[e] > p.max_tokens) report(g.error, kDispatchOverflow, e / E_local);
  stamp(g, kDispatchSendCounter, 1);
  wait_credits(g, g.layout.dispatch_credits(), kDispatchSendTimeout);
  __syncthreads();
  stamp(g, kDispatchSendCounter, 2);

  // Payload: a warp takes (token, 512-channel chunk) units, casts once, stores to every slot.
  const int64_t msg_bytes = LowLatencyLayout::message_bytes(H, p.use_fp8);
  const int64_t payload_bytes = p.use_fp8 ? H : 2 * int64_t(H);
  const int chunks = (H + kSendChunk - 1) / kSendChunk;
  const int64_t units = int64_t(p.num_tokens) * chunks;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  for (int64_t u = int64_t(blockIdx.x) * kWarps + warp; u < units; u += warps) {
    const int t = int(u / chunks), c = int(u % chunks);
    const int ch0 = c * kSendChunk + lane * 16;
    const bool active = ch0 < H;
    uint4 raw[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
    if (active) {
      const uint4* src = reinterpret_cast<const uint4*>(p.x + int64_t(t) * H + ch0);
      raw[0] = __ldg(src);
      raw[1] = __ldg(src + 1);
    }
    uint4 packed = make_uint4(0, 0, 0, 0);  // fp8: 16 channels
    float scale = 0.f;
    if (p.use_fp8) {
      float v[16];
      const uint32_t* w32 = reinterpret_cast<const uint32_t*>(raw);
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        v[2 * i] = bf16_bits_to_float(w32[i] & 0xffffu);
        v[2 * i + 1] = bf16_bits_to_float(w32[i] >> 16);
        amax = fmaxf(amax, fmaxf(fabsf(v[2 * i]), fabsf(v[2 * i + 1])));
      }
      // 8 lanes hold one 128-channel group.
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
      scale = fp8_scale(amax, p.round_scale);
      const float inv = __fdiv_rn(1.f, scale);
      uint32_t out[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const __nv_fp8x2_storage_t lo = __nv_cvt_float2_to_fp8x2(
            make_float2(__fmul_rn(v[4 * i], inv), __fmul_rn(v[4 * i + 1], inv)), __NV_SATFINITE, __NV_E4M3);
        const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(
            make_float2(__fmul_rn(v[4 * i + 2], inv), __fmul_rn(v[4 * i + 3], inv)), __NV_SATFINITE, __NV_E4M3);
        out[i] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
      packed = make_uint4(out[0], out[1], out[2], out[3]);
    }
    for (int k = 0; k < K; ++k) {
      const int q = t * K + k;
      const int e = slots.idx[q];
      if (e < 0) continue;
      const int slot = slots.slot(q);
      if (slot >= p.max_tokens) continue;
      const int dst = e / E_local, local_expert = e - dst * E_local;
      char* peer = peer_half[dst];
      if (!peer) continue;
      char* msg = peer + g.layout.dispatch_region() +
                  ((int64_t(local_expert) * R + g.rank) * p.max_tokens + slot) * msg_bytes;
      if (active) {
        if (p.use_fp8) {
          *reinterpret_cast<uint4*>(msg + 16 + ch0) = packed;
          if ((lane & 7) == 0) *reinterpret_cast<float*>(msg + 16 + payload_bytes + (ch0 / kChannelsPerScale) * 4) = scale;
        } else {
          uint4* d = reinterpret_cast<uint4*>(msg + 16 + int64_t(ch0) * 2);
          d[0] = raw[0];
          d[1] = raw[1];
        }
      }
      if (c == 0 && lane == 0) *reinterpret_cast<int4*>(msg) = make_int4(q, t, k, 0);
    }
  }

  stamp(g, kDispatchSendCounter, 3);
  // Counts out: once every block's rows are visible, count + 1 into each expert's flag. One
  // warp does it: a system fence per lane, then plain stores (a fence per flag costs more).
  const bool last = last_block(g, kDispatchSendCounter);
  stamp(g, kDispatchSendCounter, 4);
  if (last && warp == 0) {
    for (int r = lane; r < R; r += 32)  // credits taken before anyone can give them back
      *at<uint64_t>(g.half, g.layout.dispatch_credits() + 8 * r) = 0;
    __syncwarp();
    __threadfence_system();
    for (int e = lane; e < E; e += 32) {
      const int dst = e / E_local, local_expert = e - dst * E_local;
      if (!peer_half[dst]) continue;
      const uint64_t count = uint64_t(min(slots.totals[e], p.max_tokens));
      store_relaxed_u64(at<uint64_t>(peer_half[dst], g.layout.dispatch_flags() + 8 * (int64_t(local_expert) * R + g.rank)),
                        count + 1);
    }
  }
  stamp(g, kDispatchSendCounter, 5);
}

// ------------------------------------------------------------------------------ dispatch recv

// A block per local expert: threads r < R wait for rank r's count, then warps copy the rows
// out of the symmetric buffer (L2 loads: peers wrote them) into the caller's tensors.
__global__ void __launch_bounds__(kThreads, 2) dispatch_recv_kernel(DispatchRecvParams p) {
  __shared__ char* peer_half[kMaxRanks];
  __shared__ int counts[kMaxRanks + 1];
  const GroupArgs& g = p.g;
  const int R = g.num_ranks, H = p.hidden, E_local = p.num_experts / R;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t msg_bytes = LowLatencyLayout::message_bytes(H, p.use_fp8);
  const int64_t payload_bytes = p.use_fp8 ? H : 2 * int64_t(H);
  const int num_scales = H / kChannelsPerScale;
  const int64_t rows_per_expert = int64_t(R) * p.max_tokens;
  stamp(g, kDispatchRecvCounter, 0);
  map_peers(g, peer_half);
  const uint64_t deadline = now_ns() + g.timeout_ns;

  for (int le = blockIdx.x; le < E_local; le += gridDim.x) {
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
      uint64_t* flag = at<uint64_t>(g.half, g.layout.dispatch_flags() + 8 * (int64_t(le) * R + r));
      const uint64_t v = wait_nonzero(flag, deadline);
      if (!v) report(g.error, kDispatchRecvTimeout, r);
      *flag = 0;
      counts[r] = v ? int(v - 1) : 0;
      p.recv_layout[int64_t(le) * R + r] = counts[r];
    }
    __syncthreads();
    if (le == blockIdx.x) stamp(g, kDispatchRecvCounter, 1);  // the first expert's flags are in
    if (threadIdx.x == 0) {  // counts become the exclusive prefix over sources, total last
      int total = 0;
      for (int r = 0; r < R; ++r) {
        const int c = counts[r];
        counts[r] = total;
        total += c;
      }
      counts[R] = total;
      p.recv_count[le] = total;
    }
    __syncthreads();
    // The expert's rows of every source, spread over all warps of the block.
    for (int m = warp; m < counts[R]; m += kWarps) {
      int r = 0;
      while (m >= counts[r + 1]) ++r;
      const int i = m - counts[r];
      const char* msg = g.half + g.layout.dispatch_region() + ((int64_t(le) * R + r) * p.max_tokens + i) * msg_bytes;
      const int64_t row = le * rows_per_expert + int64_t(r) * p.max_tokens + i;
      warp_copy_l2(reinterpret_cast<uint4*>(static_cast<char*>(p.recv_x) + row * payload_bytes),
                   reinterpret_cast<const uint4*>(msg + 16), payload_bytes / 16, lane);
      if (p.use_fp8) {
        const float* s = reinterpret_cast<const float*>(msg + 16 + payload_bytes);
        for (int j = lane; j < num_scales; j += 32) p.recv_scales[row * num_scales + j] = __ldcg(s + j);
      }
      if (lane == 0) p.recv_src_info[row] = __ldcg(reinterpret_cast<const int*>(msg));
    }
    __syncthreads();  // counts[] is rewritten for the next expert
  }

  stamp(g, kDispatchRecvCounter, 2);
  if (last_block(g, kDispatchRecvCounter))  // every row read: the senders may write this half again
    signal_ranks(g, peer_half, g.layout.dispatch_credits() + 8 * int64_t(g.rank), 1);
  stamp(g, kDispatchRecvCounter, 3);
}

// ------------------------------------------------------------------------------ combine send

// Rows of expert le from rank r live at [le][r][i] in x and in the combine region alike: the
// copy keeps the layout and moves only received rows (layout[le, r] of them), a warp per row,
// numbered through a prefix of the per-(expert, rank) counts. Then every rank may pull them.
__global__ void __launch_bounds__(kThreads, 2) combine_send_kernel(CombineSendParams p) {
  extern __shared__ int prefix[];  // [E + 1]: rows before (le, r), pairs in (le, r) order
  __shared__ char* peer_half[kMaxRanks];
  const GroupArgs& g = p.g;
  const int R = g.num_ranks, H = p.hidden, E = p.num_experts;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint16_t* region = at<uint16_t>(g.half, g.layout.combine_region());
  const bool zero_copy = p.x == region;
  stamp(g, kCombineSendCounter, 0);
  map_peers(g, peer_half);
  wait_credits(g, g.layout.combine_credits(), kCombineSendTimeout);  // readers of the call before last are done
  stamp(g, kCombineSendCounter, 1);
  if (!zero_copy) {
    if (warp == 0) {  // exclusive scan of layout [E_local * R], 32 at a time
      int running = 0;
      for (int base = 0; base < E; base += 32) {
        const int q = base + lane;
        int v = q < E ? min(max(p.layout[q], 0), p.max_tokens) : 0;
        int incl = v;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const int n = __shfl_up_sync(0xffffffffu, incl, d);
          if (lane >= d) incl += n;
        }
        if (q < E) prefix[q] = running + incl - v;
        running += __shfl_sync(0xffffffffu, incl, 31);
      }
      if (lane == 0) prefix[E] = running;
    }
    __syncthreads();
    const int64_t warps = int64_t(gridDim.x) * kWarps;
    for (int64_t m = int64_t(blockIdx.x) * kWarps + warp; m < prefix[E]; m += warps) {
      int lo = 0, hi = E;  // the pair q with prefix[q] <= m < prefix[q + 1]
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (prefix[mid] <= m) lo = mid; else hi = mid;
      }
      const int64_t row = int64_t(lo) * p.max_tokens + (m - prefix[lo]);  // lo = le * R + r
      warp_copy_l2(reinterpret_cast<uint4*>(region + row * H), reinterpret_cast<const uint4*>(p.x + row * H),
                   int64_t(H) * 2 / 16, lane);
    }
  }
  stamp(g, kCombineSendCounter, 2);

  if (last_block(g, kCombineSendCounter)) {
    for (int r = threadIdx.x; r < R; r += blockDim.x) *at<uint64_t>(g.half, g.layout.combine_credits() + 8 * r) = 0;
    __syncthreads();
    signal_ranks(g, peer_half, g.layout.combine_flags() + 8 * int64_t(g.rank), 1);  // every rank, rows or not
  }
  stamp(g, kCombineSendCounter, 3);
}

// Waits, without taking them, for the credits of this half's combine region (one block).
__global__ void combine_region_wait_kernel(GroupArgs g) {
  wait_credits(g, g.layout.combine_credits(), kCombineSendTimeout);
}

// ------------------------------------------------------------------------------ combine recv

// out[t] = bf16(sum over k = 0..K-1 with a valid expert of w[t,k] * row(t, k)), in float32,
// multiply then add (no FMA), in k order: torch_ep.reference does the same arithmetic. Row
// (t, k) is row [le][me][slot] of its owner's combine region, slot numbered as the dispatch did.
__global__ void __launch_bounds__(kThreads, 2) combine_recv_kernel(CombineRecvParams p) {
  extern __shared__ int smem[];
  __shared__ char* peer_half[kMaxRanks];
  const GroupArgs& g = p.g;
  const int R = g.num_ranks, H = p.hidden, K = p.num_topk, E = p.num_experts, E_local = E / R;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  stamp(g, kCombineRecvCounter, 0);
  map_peers(g, peer_half);
  const PairSlots slots = number_pairs(g, p.topk_idx, p.num_tokens * K, E, smem);
  {
    const uint64_t deadline = now_ns() + g.timeout_ns;
    for (int r = threadIdx.x; r < R; r += blockDim.x)
      if (!wait_nonzero(at<uint64_t>(g.half, g.layout.combine_flags() + 8 * r), deadline))
        report(g.error, kCombineRecvTimeout, r);
  }
  __syncthreads();
  stamp(g, kCombineRecvCounter, 1);

  const int chunks = (H + kRecvChunk - 1) / kRecvChunk;
  const int64_t units = int64_t(p.num_tokens) * chunks;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  const int64_t region = g.layout.combine_region();
  for (int64_t u = int64_t(blockIdx.x) * kWarps + warp; u < units; u += warps) {
    const int t = int(u / chunks), c = int(u % chunks);
    const int ch0 = c * kRecvChunk + lane * 8;
    if (ch0 >= H) continue;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    // Four slots' rows in flight at once, then summed in k order.
    constexpr int kSlotsInFlight = 4;
    for (int k0 = 0; k0 < K; k0 += kSlotsInFlight) {
      uint4 v[kSlotsInFlight];
      float w[kSlotsInFlight];
      bool routed[kSlotsInFlight];
#pragma unroll
      for (int u = 0; u < kSlotsInFlight; ++u) {
        const int k = k0 + u;
        const int q = t * K + k;
        const int e = k < K ? slots.idx[q] : -1;
        const int slot = e >= 0 ? slots.slot(q) : 0;
        const int owner = e >= 0 ? e / E_local : 0;
        routed[u] = e >= 0 && slot < p.max_tokens && peer_half[owner];
        if (!routed[u]) continue;
        const int64_t row = (int64_t(e - owner * E_local) * R + g.rank) * p.max_tokens + slot;
        w[u] = p.topk_weights[q];
        v[u] = __ldcg(reinterpret_cast<const uint4*>(peer_half[owner] + region + (row * H + ch0) * 2));
      }
#pragma unroll
      for (int u = 0; u < kSlotsInFlight; ++u) {
        if (!routed[u]) continue;
        const uint32_t* w32 = reinterpret_cast<const uint32_t*>(&v[u]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(w[u], bf16_bits_to_float(w32[i] & 0xffffu)));
          acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(w[u], bf16_bits_to_float(w32[i] >> 16)));
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

  if (last_block(g, kCombineRecvCounter)) {  // every row read: the owners may write their regions again
    for (int r = threadIdx.x; r < R; r += blockDim.x) *at<uint64_t>(g.half, g.layout.combine_flags() + 8 * r) = 0;
    __syncthreads();
    signal_ranks(g, peer_half, g.layout.combine_credits() + 8 * int64_t(g.rank), 1);
  }
  stamp(g, kCombineRecvCounter, 3);
}

int grid_for(int num_blocks, int64_t warps_of_work) {
  const int64_t wanted = (warps_of_work + kWarps - 1) / kWarps;
  return int(wanted < 1 ? 1 : (wanted < num_blocks ? wanted : num_blocks));
}

// Lets `kernel` take `smem` bytes of dynamic shared memory (beyond 48 KiB needs opting in).
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, int64_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
}

bool valid_group(const GroupArgs& g) {
  return g.num_ranks >= 1 && g.num_ranks <= kMaxRanks && g.rank >= 0 && g.rank < g.num_ranks && g.half &&
         g.num_blocks >= 1 && g.error;
}

}  // namespace

int64_t numbering_smem(int num_tokens, int num_topk, int num_experts) {
  const int64_t bytes = (2 * int64_t(num_tokens) * num_topk + int64_t(kWarps + 1) * num_experts) * 4;
  int device = 0, limit = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return -1;
  return bytes <= limit - 1024 ? bytes : -1;  // some static shared memory besides
}

cudaError_t launch_dispatch_send(const DispatchSendParams& p, cudaStream_t stream) {
  if (!valid_group(p.g) || p.num_experts % p.g.num_ranks || p.hidden % kHiddenMultiple) return cudaErrorInvalidValue;
  const int64_t smem = numbering_smem(p.num_tokens, p.num_topk, p.num_experts);
  if (smem < 0) return cudaErrorInvalidValue;
  if (const cudaError_t err = allow_dynamic_smem(dispatch_send_kernel, smem); err != cudaSuccess) return err;
  const int64_t units = int64_t(p.num_tokens) * ((p.hidden + kSendChunk - 1) / kSendChunk);
  dispatch_send_kernel<<<grid_for(p.g.num_blocks, units), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_dispatch_recv(const DispatchRecvParams& p, cudaStream_t stream) {
  if (!valid_group(p.g) || p.num_experts % p.g.num_ranks || p.hidden % kHiddenMultiple) return cudaErrorInvalidValue;
  const int E_local = p.num_experts / p.g.num_ranks;
  const int grid = E_local < p.g.num_blocks ? E_local : p.g.num_blocks;
  dispatch_recv_kernel<<<grid < 1 ? 1 : grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_combine_send(const CombineSendParams& p, cudaStream_t stream) {
  if (!valid_group(p.g) || p.num_experts % p.g.num_ranks || p.hidden % kHiddenMultiple) return cudaErrorInvalidValue;
  const size_t smem = (size_t(p.num_experts) + 1) * sizeof(int);
  if (const cudaError_t err = allow_dynamic_smem(combine_send_kernel, smem); err != cudaSuccess) return err;
  combine_send_kernel<<<p.g.num_blocks, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_combine_recv(const CombineRecvParams& p, cudaStream_t stream) {
  if (!valid_group(p.g) || p.num_experts % p.g.num_ranks || p.hidden % kHiddenMultiple) return cudaErrorInvalidValue;
  const int64_t smem = numbering_smem(p.num_tokens, p.num_topk, p.num_experts);
  if (smem < 0) return cudaErrorInvalidValue;
  if (const cudaError_t err = allow_dynamic_smem(combine_recv_kernel, smem); err != cudaSuccess) return err;
  const int64_t units = int64_t(p.num_tokens) * ((p.hidden + kRecvChunk - 1) / kRecvChunk);
  combine_recv_kernel<<<grid_for(p.g.num_blocks, units), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_combine_region_wait(const GroupArgs& g, cudaStream_t stream) {
  if (!valid_group(g)) return cudaErrorInvalidValue;
  combine_region_wait_kernel<<<1, 64, 0, stream>>>(g);
  return cudaGetLastError();
}

}  // namespace ep::kernels::ll
