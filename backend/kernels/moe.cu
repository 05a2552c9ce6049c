#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

#include "backend/kernels/moe.cuh"
#include "backend/kernels/module_kernels.hpp"
#include "backend/kernels/moe_bulk.cuh"
#include "backend/kernels/moe_device.cuh"
#include "backend/kernels/moe_unroll.cuh"
#include "backend/kernels/sync.cuh"

namespace ep::kernels {
namespace {

constexpr int kWarps = kThreads / 32;

// ------------------------------------------------------------------------------------ layout

// One launch, one block per destination rank r, one pass over the tokens in tiles of kThreads:
// a token's row among those sent to r is the number of earlier tokens going there (a ballot per
// warp, a scan over the warps, a running total over the tiles). Each block writes only r's part
// of the table and counts in shared memory, so nothing is zeroed first. Block 0 also finds the
// id range, kept as min(0, smallest) and max(0, largest): enough to tell ids below -1 or from
// num_experts up. With a host header (pinned, mapped), each block also writes its part of the
// header there, then raises its ready flag: the host reads the sizes with no copy, event or
// stream wait, and the layout costs the host one launch.
__global__ void __launch_bounds__(kThreads) layout_kernel(LayoutParams p) {
  extern __shared__ int counters[];  // [2 * experts_per_rank]: pairs, then tokens, per local expert
  __shared__ int warp_counts[kWarps];
  __shared__ int id_lo, id_hi;
  const int r = blockIdx.x;
  const MetaLayout l{p.num_ranks, p.num_experts, p.num_tokens};
  const int64_t per_rank = l.experts_per_rank(), lo = r * per_rank, hi = lo + per_rank;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int* pairs = counters;
  int* tokens = counters + per_rank;
  for (int64_t i = threadIdx.x; i < 2 * per_rank; i += blockDim.x) counters[i] = 0;
  if (threadIdx.x == 0) id_lo = 0, id_hi = 0;
  __syncthreads();

  int sent = 0;  // tokens of the tiles before this one that go to r (the same in every thread)
  int my_lo = 0, my_hi = 0;
  for (int64_t first = 0; first < p.num_tokens; first += blockDim.x) {
    const int64_t t = first + threadIdx.x;
    bool goes = false;
    if (t < p.num_tokens) {
      const int64_t* row = p.topk_idx + t * p.num_topk;
      for (int k = 0; k < p.num_topk; ++k) {
        const int64_t e = row[k];
        if (r == 0) {  // block 0 also finds the id range, to reject bad input
          const int c = int(e < INT_MIN ? INT_MIN : (e > INT_MAX ? INT_MAX : e));
          my_lo = min(my_lo, c);
          my_hi = max(my_hi, c);
        }
        if (e < lo || e >= hi) continue;
        goes = true;
        atomicAdd(&pairs[e - lo], 1);
        bool repeated = false;  // a token counts once per expert, however many slots name it
        for (int j = 0; j < k; ++j) repeated = repeated || row[j] == e;
        if (!repeated) atomicAdd(&tokens[e - lo], 1);
      }
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, goes);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    if (t < p.num_tokens) {
      const int pos = goes ? sent + before + __popc(ballot & ((1u << lane) - 1)) : -1;
      p.meta[l.token_pos() + t * p.num_ranks + r] = pos;
      if (goes) p.meta[l.send_tokens() + r * p.num_tokens + pos] = int32_t(t);
      if (p.is_token_in_rank) p.is_token_in_rank[t * p.num_ranks + r] = goes;
    }
    sent += total;
    __syncthreads();  // the next tile writes warp_counts again
  }
  if (r == 0 && (my_lo < 0 || my_hi > 0)) {
    atomicMin(&id_lo, my_lo);
    atomicMax(&id_hi, my_hi);
  }
  __syncthreads();

  // r's part of the header: in the table, in the caller's count tensors, on the host.
  int32_t* host = p.host_header;
  auto put = [&](int64_t index, int value) {
    p.meta[index] = value;
    if (host) host[index] = value;
  };
  if (threadIdx.x == 0) {
    put(l.tokens_per_rank() + r, sent);
    if (p.tokens_per_rank) p.tokens_per_rank[r] = sent;
    if (r == 0) {
      put(l.id_range(), id_lo);
      put(l.id_range() + 1, id_hi);
    }
  }
  for (int64_t i = threadIdx.x; i < per_rank; i += blockDim.x) {
    put(l.pairs_per_expert() + lo + i, pairs[i]);
    if (p.pairs_per_expert) p.pairs_per_expert[lo + i] = pairs[i];
    put(l.tokens_per_rank_expert() + lo + i, tokens[i]);
  }
  if (host) {
    __syncthreads();  // every thread's part of the header is written before the flag says so
    if (threadIdx.x == 0) {
      __threadfence_system();
      store_release(reinterpret_cast<uint32_t*>(host + l.header_size() + r), 1u);
    }
  }
}

// ------------------------------------------------------------------------------------ signal

__global__ void signal_kernel(SignalParams p) {
  const uint64_t deadline = now_ns() + p.timeout_ns;
  const int peer = threadIdx.x;
  if (peer >= p.num_ranks) return;
  __threadfence_system();  // what this stream wrote before is visible before the flag says so
  if (p.to_set[peer]) store_release(p.to_set[peer], 1);
  if (p.to_wait[peer] && !take_flag(p.to_wait[peer], deadline)) atomicExch(p.error, 1 + peer);
}

// ------------------------------------------------------------------------------------ dispatch

// A warp copies `bytes` in units of V, kDepth loads in flight per lane (the last round guarded).
template <typename V, int kDepth>
__device__ __forceinline__ void warp_copy(char* dst, const char* src, int64_t bytes, int lane) {
  const int64_t n = bytes / int64_t(sizeof(V));
  V* d = reinterpret_cast<V*>(dst);
  const V* s = reinterpret_cast<const V*>(src);
  int64_t i = lane;
  for (; i + 32 * (kDepth - 1) < n; i += 32 * kDepth) {
    V v[kDepth];
#pragma unroll
    for (int u = 0; u < kDepth; ++u) v[u] = s[i + 32 * u];
#pragma unroll
    for (int u = 0; u < kDepth; ++u) d[i + 32 * u] = v[u];
  }
  if (i < n) {
    V v[kDepth];
#pragma unroll
    for (int u = 0; u < kDepth; ++u)
      if (i + 32 * u < n) v[u] = s[i + 32 * u];
#pragma unroll
    for (int u = 0; u < kDepth; ++u)
      if (i + 32 * u < n) d[i + 32 * u] = v[u];
  }
}

// MoeCopy::kWarp, kDepth = 4 loads in flight per lane; kUnroll has its own kernel (moe_unroll.cu).
template <typename V, int kDepth>
__global__ void __launch_bounds__(kThreads) dispatch_kernel(DispatchParams p) {
  __shared__ int64_t first_row[kMaxRanksPerNode + 1];  // where each source's rows start here
  const int R = p.num_ranks;
  const int lane = threadIdx.x & 31;
  handshake_begin(p.handshake, R);
  const int64_t rows = dispatch_rows(p, first_row);
  const int64_t per_rank = p.num_experts / R, lo = p.rank * per_rank, hi = lo + per_rank;

  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + (threadIdx.x >> 5); row < p.capacity; row += warps) {
    if (row >= rows) {  // padding of a fixed-size output: routed nowhere
      for (int k = lane; k < p.num_topk; k += 32) {
        if (p.recv_topk_idx) p.recv_topk_idx[row * p.num_topk + k] = -1;
        if (p.recv_topk_weights) p.recv_topk_weights[row * p.num_topk + k] = 0.f;
      }
      continue;
    }
    int s = 0;
    while (row >= first_row[s + 1]) ++s;
    const DispatchSource src = p.src[s];
    const MetaLayout theirs{R, p.num_experts, src.num_tokens};
    const int64_t t = src.meta[theirs.send_tokens() + p.rank * src.num_tokens + (row - first_row[s])];
    warp_copy<V, kDepth>(p.recv_x + row * p.row_bytes, src.x + t * p.row_bytes, p.row_bytes, lane);
    for (int i = lane; i < p.num_scales; i += 32)
      p.recv_x_scales[row * p.num_scales + i] = src.x_scales[t * p.num_scales + i];
    if (src.topk_idx) {
      for (int k = lane; k < p.num_topk; k += 32) {
        const int64_t e = src.topk_idx[t * p.num_topk + k];
        const bool mine = e >= lo && e < hi;
        p.recv_topk_idx[row * p.num_topk + k] = mine ? e - lo : -1;
        if (p.recv_topk_weights)
          p.recv_topk_weights[row * p.num_topk + k] = mine ? src.topk_weights[t * p.num_topk + k] : 0.f;
      }
    }
  }
  handshake_end(p.handshake, R);
}

// ------------------------------------------------------------------------------------ combine

// A warp per token: lane d holds where the token's row sits in rank d's input, and the warp
// sums those rows (ascending rank: the result does not depend on timing), V elements a lane,
// kUnroll chunks of the row per lane at once (MoeCopy::kWarp: 4; kUnroll has its own kernel,
// moe_unroll.cu).
template <typename T, int V, int kUnroll>
__global__ void __launch_bounds__(kThreads) combine_kernel(CombineParams p) {
  __shared__ int64_t rows_of_warp[kWarps][kMaxRanksPerNode];
  __shared__ CombineSources src;
  const int R = p.num_ranks;
  const int lane = threadIdx.x & 31;
  int64_t* rows = rows_of_warp[threadIdx.x >> 5];
  const MetaLayout l{R, p.num_experts, p.num_tokens};
  handshake_begin(p.handshake, R);
  load_combine_sources(p, src);
  __syncthreads();
  const int32_t* mine = p.meta[p.rank];
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t t = blockIdx.x * int64_t(blockDim.x / 32) + (threadIdx.x >> 5); t < p.num_tokens; t += warps) {
    int64_t row = -1;
    if (lane < R) {
      const int pos = mine[l.token_pos() + t * R + lane];
      if (pos >= 0) row = src.first_row_at[lane] + int64_t(pos);
      if (row >= src.x_rows[lane]) row = -1;  // dropped by an overflowing dispatch
      rows[lane] = row;
    }
    __syncwarp();
    const unsigned sources = __ballot_sync(0xffffffffu, row >= 0);
    // kUnroll chunks of the row per lane at once: kUnroll loads in flight from each source.
    const int64_t chunks = p.hidden / V;
    for (int64_t c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
      float acc[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int i = 0; i < V; ++i) acc[u][i] = 0.f;
      for (unsigned left = sources; left; left &= left - 1) {
        const int d = __ffs(left) - 1;
        const auto* in = reinterpret_cast<const Pack<T, V>*>(reinterpret_cast<const T*>(src.x[d]) + rows[d] * p.hidden);
        Pack<T, V> pk[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (c0 + u * 32 < chunks) pk[u] = in[c0 + u * 32];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int i = 0; i < V; ++i) acc[u][i] += to_float(pk[u].v[i]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (c0 + u * 32 >= chunks) break;
        Pack<T, V> out;
#pragma unroll
        for (int i = 0; i < V; ++i) out.v[i] = from_float<T>(acc[u][i]);
        reinterpret_cast<Pack<T, V>*>(reinterpret_cast<T*>(p.out) + t * p.hidden)[c0 + u * 32] = out;
      }
    }
    if (p.out_weights) {
      for (int k = lane; k < p.num_topk; k += 32) {
        float acc = 0.f;
        for (unsigned left = sources; left; left &= left - 1) {
          const int d = __ffs(left) - 1;
          const int64_t r = rows[d];
          acc += src.topk_weights[d][r * p.num_topk + k];
        }
        p.out_weights[t * p.num_topk + k] = acc;
      }
    }
    __syncwarp();  // rows[] is rewritten for the next token
  }
  handshake_end(p.handshake, R, combine_says_done(p));
}

constexpr int kWarpChunks = 4;  // combine_kernel's kUnroll and dispatch_kernel's kDepth for MoeCopy::kWarp

cudaError_t launch_dispatch_warps(const DispatchParams& p, int vec, cudaStream_t stream) {
  const int grid = grid_for_warps(p.num_blocks, p.capacity);
  with_access_type(vec, [&](auto v) { dispatch_kernel<decltype(v), kWarpChunks><<<grid, kThreads, 0, stream>>>(p); });
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_layout(const LayoutParams& p, cudaStream_t stream) {
  if (p.num_ranks < 1 || p.num_experts % p.num_ranks) return cudaErrorInvalidValue;
  const MetaLayout l{p.num_ranks, p.num_experts, p.num_tokens};
  const size_t smem = 2 * size_t(l.experts_per_rank()) * sizeof(int);
  layout_kernel<<<unsigned(p.num_ranks), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_signal(const SignalParams& p, cudaStream_t stream) {
  if (p.num_ranks < 1 || p.num_ranks > kMaxRanksPerNode) return cudaErrorInvalidValue;
  signal_kernel<<<1, 32, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_dispatch(const DispatchParams& p, cudaStream_t stream) {
  if (p.num_ranks < 1 || p.num_ranks > kMaxRanksPerNode || p.num_blocks < 1) return cudaErrorInvalidValue;
  // The widest access that the row size and every row's address allow.
  int vec = 16;
  auto fits = [&](const void* ptr) { return !ptr || aligned(ptr, vec); };
  for (;; vec /= 2) {
    bool ok = p.row_bytes % vec == 0 && fits(p.recv_x);
    for (int s = 0; s < p.num_ranks; ++s) ok = ok && fits(p.src[s].x);
    if (ok || vec == 1) break;
  }
  if (p.copy == MoeCopy::kBulk && vec == 16) {  // bulk copies need 16-byte rows and addresses
    const cudaError_t err = launch_dispatch_bulk(p, stream);
    if (err != cudaErrorNotSupported) return err;  // else no sm_90: warps
  }
  return p.copy == MoeCopy::kUnroll ? launch_dispatch_unroll(p, vec, stream) : launch_dispatch_warps(p, vec, stream);
}

cudaError_t launch_combine(const CombineParams& p, cudaStream_t stream) {
  if (p.num_ranks < 1 || p.num_ranks > kMaxRanksPerNode || p.num_blocks < 1) return cudaErrorInvalidValue;
  if (p.copy == MoeCopy::kBulk) {
    const cudaError_t err = launch_combine_bulk(p, stream);
    if (err != cudaErrorNotSupported) return err;  // else the rows do not suit bulk copies: warps
  }
  if (p.copy == MoeCopy::kUnroll) return launch_combine_unroll(p, stream);
  const int grid = grid_for_warps(p.num_blocks, p.num_tokens);
  return with_combine_instance(p, [&](auto t, auto vector) {
    combine_kernel<decltype(t), decltype(vector)::value, kWarpChunks><<<grid, kThreads, 0, stream>>>(p);
  });
}

const void* moe_module_kernel() { return reinterpret_cast<const void*>(layout_kernel); }

}  // namespace ep::kernels
