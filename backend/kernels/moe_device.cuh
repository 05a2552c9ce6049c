// Device code shared by the MoE pull kernels (moe.cu, moe_unroll.cu, moe_bulk.cu): the flag
// handshake around a pull, where a dispatch's rows come from, the payload element types combine
// sums; and the launchers' grid and alignment helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <type_traits>

#include "backend/kernels/moe.cuh"
#include "backend/kernels/moe_records.cuh"  // a combine's plan
#include "backend/kernels/sync.cuh"

namespace ep::kernels {

// Before a pull kernel reads any peer: block 0 says this rank's inputs are ready, and every
// block waits (without clearing) for the peers' word. With kSayIfSeen (a pushing kernel, which
// writes into the peers' outputs) it returns, alike to every thread of the block, whether every
// peer really raised its word: false where a wait timed out or found a word the watchdog forced
// (release_waits writes 0x01 into every byte; a peer stores 1), so that the block stores into no
// peer whose outputs may still be in use. The pull instances (kSayIfSeen false) are unchanged.
template <bool kSayIfSeen = false>
__device__ inline bool handshake_begin(const Handshake& h, int num_ranks) {
  const int peer = threadIdx.x;
  bool seen = true;
  if (peer < num_ranks) {
    if (blockIdx.x == 0 && h.ready_to_set[peer]) {
      __threadfence_system();
      store_release(h.ready_to_set[peer], 1);
    }
    if (h.ready_to_wait[peer]) {
      const uint64_t deadline = now_ns() + h.timeout_ns;
      uint32_t word;
      while ((word = load_acquire(h.ready_to_wait[peer])) == 0) {
        if (now_ns() > deadline) {
          atomicExch(h.error, 1 + peer);
          break;
        }
        __nanosleep(100);
      }
      if (kSayIfSeen) seen = word == 1;
    }
  }
  if (!kSayIfSeen) {
    __syncthreads();
    return true;
  }
  return __syncthreads_and(seen) != 0;
}

// After a block's last read of a peer. The last block of the grid clears the ready flags it
// waited on (before its done flag lets a peer's next call set them again), says done, and
// waits until every peer is done reading this rank's inputs. A pushing kernel (kPushed) wrote
// peers' memory instead: each block fences at system scope, so that a peer's acquire of the
// done flag sees every block's stores. `say_done` false (device records whose verdict moved
// nothing, alike on every rank): no done half, as no rank read or wrote a peer.
template <bool kPushed = false>
__device__ inline void handshake_end(const Handshake& h, int num_ranks, bool say_done = true) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    if (kPushed) __threadfence_system();
    else __threadfence();
    last = atomicAdd(h.blocks_finished, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  const int peer = threadIdx.x;
  if (peer < num_ranks) {
    if (h.ready_to_wait[peer]) *h.ready_to_wait[peer] = 0;
    if (say_done && h.done_to_set[peer]) {
      __threadfence_system();
      store_release(h.done_to_set[peer], 1);
    }
    if (say_done && h.done_to_wait[peer] && !take_flag(h.done_to_wait[peer], now_ns() + h.timeout_ns))
      atomicExch(h.error, 1 + peer);
  }
  if (threadIdx.x == 0) *h.blocks_finished = 0;
}

// Whether a combine's done half runs: always on the host records' path; with device records where
// the plan says so (kPlanSayDone: rows moved, alike on every rank, or a record never came).
__device__ inline bool combine_says_done(const CombineParams& p) { return !p.plan || p.plan[kPlanSayDone] != 0; }

// Where each rank d's rows for this rank's tokens lie, for a combine block (in shared memory):
// from the parameters (the host exchanged records), or from the plan of device records.
struct CombineSources {
  const char* x[kMaxRanksPerNode];              // rank d's combine input
  const float* topk_weights[kMaxRanksPerNode];  // its weights, or null
  int64_t x_rows[kMaxRanksPerNode];             // its rows: a row past them counts as not sent
  int64_t first_row_at[kMaxRanksPerNode];       // where this rank's rows start there
};

// Threads 0..R-1 fill `s` (thread d rank d's entries); the caller syncs before reading it. A plan
// that moves nothing (a bad verdict, a record that never came) gives every rank 0 rows: each
// token sums no row, and the combined rows are zeros.
__device__ inline void load_combine_sources(const CombineParams& p, CombineSources& s) {
  const int d = threadIdx.x;
  if (d >= p.num_ranks) return;
  if (p.plan) {
    const bool moves = p.plan[kPlanMoves] != 0;
    const int64_t* offset = p.plan + kPlanOffset + 4 * d;
    s.x[d] = offset[0] < 0 ? nullptr : p.arenas[d] + offset[0];
    s.topk_weights[d] = offset[1] < 0 ? nullptr : reinterpret_cast<const float*>(p.arenas[d] + offset[1]);
    s.x_rows[d] = moves && s.x[d] ? p.plan[kPlanCapacity + d] : 0;
    s.first_row_at[d] = p.plan[kPlanFirstRow + d];
    return;
  }
  int64_t at = 0;  // rank d received the rows of ranks 0 .. rank-1 before ours
  for (int r = 0; r < p.rank; ++r) at += p.meta[r][MetaLayout::tokens_per_rank() + d];
  s.x[d] = p.x[d];
  s.topk_weights[d] = p.topk_weights[d];
  s.x_rows[d] = p.x_rows[d];
  s.first_row_at[d] = at;
}

// Block 0's thread 0 reports that more rows arrived than the outputs hold, unless an earlier
// overflow is still waiting for the host to take it.
__device__ inline void report_overflow(DispatchOverflow* overflow, int64_t call_id, int64_t received,
                                       int64_t capacity) {
  if (received > capacity && blockIdx.x == 0 && threadIdx.x == 0 &&
      atomicCAS(&overflow->state, 0, 1) == 0) {  // the first overflow since the host took the last one
    overflow->call_id = call_id;
    overflow->received = received;
    overflow->capacity = capacity;
    __threadfence_system();
    atomicExch(&overflow->state, 2);
  }
}

// The rows a dispatch copies of those this rank received: at most capacity. Block 0 reports an
// overflow (more received than the outputs hold).
__device__ inline int64_t rows_within_capacity(const DispatchParams& p, int64_t received) {
  report_overflow(p.overflow, p.call_id, received, p.capacity);
  return received < p.capacity ? received : p.capacity;
}

// Where each source's rows start among this rank's received rows (first_row[R]: rows received),
// thread 0 reading the sources' counts; then rows_within_capacity. Every thread of the block calls it.
__device__ inline int64_t dispatch_rows(const DispatchParams& p, int64_t* first_row) {
  const int R = p.num_ranks;
  if (threadIdx.x == 0) {
    int64_t at = 0;
    for (int s = 0; s < R; ++s) {
      first_row[s] = at;
      at += p.src[s].meta[MetaLayout::tokens_per_rank() + p.rank];
    }
    first_row[R] = at;
  }
  __syncthreads();
  return rows_within_capacity(p, first_row[R]);
}

// Where a dispatch writes a row: its outputs (this rank's, or a receiver's as mapped here).
struct RowOutputs {
  char* x;
  float* x_scales;
  int64_t* topk_idx;
  float* topk_weights;
};

// The first round of a row's meta: its scales (lanes j and j + 32) and its topk id and weight
// (lane k < K). routed: the source has ids (else a dispatch along a handle); weighted: the output
// takes weights.
struct RowMeta {
  float scale[2];
  int64_t id;
  float weight;
};

__device__ __forceinline__ RowMeta load_meta(const DispatchSource& src, int64_t t, const float* scales_in, int S,
                                             int K, bool routed, bool weighted, int lane) {
  RowMeta m{{0.f, 0.f}, -1, 0.f};
#pragma unroll
  for (int j = 0; j < 2; ++j)
    if (lane + 32 * j < S) m.scale[j] = scales_in[lane + 32 * j];
  if (routed && lane < K) {
    m.id = src.topk_idx[t * K + lane];
    if (weighted) m.weight = src.topk_weights[t * K + lane];  // in bounds whoever owns id: kept only if this rank does
  }
  return m;
}

// Stores load_meta's round into row `row` of `dst`: the ids local to the receiver ([lo, hi) its
// experts) as local ids, others' as -1 with weight 0.
__device__ __forceinline__ void store_meta(const RowMeta& m, const RowOutputs& dst, int64_t row, float* scales_out,
                                           int S, int K, bool routed, bool weighted, int64_t lo, int64_t hi,
                                           int lane) {
#pragma unroll
  for (int j = 0; j < 2; ++j)
    if (lane + 32 * j < S) scales_out[lane + 32 * j] = m.scale[j];
  if (routed && lane < K) {
    const bool mine = m.id >= lo && m.id < hi;
    dst.topk_idx[row * K + lane] = mine ? m.id - lo : -1;
    if (weighted) dst.topk_weights[row * K + lane] = mine ? m.weight : 0.f;
  }
}

// A row's scales past the first 64 and topk ids (and weights) past the first 32, which a warp's
// first round leaves (rare: hidden above 8192 at 128 a scale, top-k above 32), a round trip each.
__device__ __forceinline__ void copy_meta_rest(const DispatchSource& src, int64_t t, const RowOutputs& dst,
                                               int64_t row, const float* scales_in, float* scales_out, int S,
                                               int K, bool routed, bool weighted, int64_t lo, int64_t hi,
                                               int lane) {
#pragma unroll 1
  for (int i = lane + 64; i < S; i += 32) scales_out[i] = scales_in[i];
  if (routed) {
#pragma unroll 1
    for (int k = lane + 32; k < K; k += 32) {
      const int64_t id = src.topk_idx[t * K + k];
      const bool mine = id >= lo && id < hi;
      dst.topk_idx[row * K + k] = mine ? id - lo : -1;
      if (weighted) dst.topk_weights[row * K + k] = mine ? src.topk_weights[t * K + k] : 0.f;
    }
  }
}

// A warp copies source token t of `src` to row `row` of `dst`: payload, fp8 scales, topk ids (local
// ones, [lo, hi) being the receiver's experts; -1 for others' experts) and weights (0 for others'
// experts). The first round's loads all go out before its first store (MoeCopy::kUnroll's row).
// kWhole: the row is whole rounds (its units a multiple of 32 x kDepth, as the launcher checks), so
// no access needs a guard. The guarded loop's SASS (sm_90, nvcc 13) spends most of a row's ~400
// instructions on 64-bit guards, packing them into registers and zeroing the round's registers.
template <typename V, int kDepth, bool kWhole = false>
__device__ __forceinline__ void copy_row_to(const DispatchSource& src, int64_t t, const RowOutputs& dst, int64_t row,
                                            int64_t row_bytes, int S, int K, int64_t lo, int64_t hi, int lane) {
  const int64_t n = row_bytes / int64_t(sizeof(V));
  const V* in = reinterpret_cast<const V*>(src.x + t * row_bytes);
  V* out = reinterpret_cast<V*>(dst.x + row * row_bytes);
  const float* scales_in = src.x_scales + t * S;
  float* scales_out = dst.x_scales + row * S;
  const bool routed = src.topk_idx != nullptr;  // else a dispatch along a handle: no ids to send
  const bool weighted = dst.topk_weights != nullptr;

  V v[kDepth] = {};  // zeros: no value lives on past the round
#pragma unroll
  for (int u = 0; u < kDepth; ++u)
    if (kWhole || lane + 32 * u < n) v[u] = in[lane + 32 * u];
  const RowMeta meta = load_meta(src, t, scales_in, S, K, routed, weighted, lane);

#pragma unroll
  for (int u = 0; u < kDepth; ++u)
    if (kWhole || lane + 32 * u < n) out[lane + 32 * u] = v[u];
  store_meta(meta, dst, row, scales_out, S, K, routed, weighted, lo, hi, lane);

  // The rest, a round trip each: payload past the first round, scales past 64, ids past 32.
  // Guarded and not unrolled, unlike moe.cu's warp_copy: that loop here spills (int4: 148-180 bytes).
#pragma unroll 1
  for (int64_t i = lane + 32 * kDepth; i < n; i += 32 * kDepth) {
    V rest[kDepth] = {};
#pragma unroll
    for (int u = 0; u < kDepth; ++u)
      if (kWhole || i + 32 * u < n) rest[u] = in[i + 32 * u];
#pragma unroll
    for (int u = 0; u < kDepth; ++u)
      if (kWhole || i + 32 * u < n) out[i + 32 * u] = rest[u];
  }
  copy_meta_rest(src, t, dst, row, scales_in, scales_out, S, K, routed, weighted, lo, hi, lane);
}

constexpr int kPushDepth = 16;  // 16-byte payload loads a lane per round trip, as moe_unroll.cu's dispatch

// A pushing kernel's rows once it knows where they go. This rank's send list holds its rows to
// rank 0, then to rank 1, ... (send_tokens of its routing table; first_item[d] where those to rank
// d start, first_item[R] their count). Warp w of the grid takes items w, w + warps, ..., storing
// each into rank d's outputs at first_row_on[d] + its place among them; rows at or past
// capacity[d] are dropped (the receiver reports them). The next item's token is looked up while a
// row copies. Then this rank's own rows from `received` to its capacity are padded: routed nowhere,
// no sender writes them.
template <typename V, int kDepth>
__device__ __forceinline__ void push_send_list(const DispatchSource& src, int R, int me, int64_t num_experts,
                                               const int64_t* first_item, const int64_t* first_row_on,
                                               const RowOutputs* outputs, const int64_t* capacity, int64_t received,
                                               int64_t row_bytes, int S, int K) {
  const int lane = threadIdx.x & 31;
  const MetaLayout mine{R, num_experts, src.num_tokens};
  auto item_token = [&](int64_t i, int& d) {  // item i's receiver (into d) and token
    d = 0;
    while (i >= first_item[d + 1]) ++d;
    return src.meta[mine.send_tokens() + d * src.num_tokens + (i - first_item[d])];
  };
  const int64_t items = first_item[R], per_rank = num_experts / R;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  const int64_t first_warp_item = blockIdx.x * int64_t(kThreads / 32) + (threadIdx.x >> 5);
  int64_t i = first_warp_item;
  int d = 0;
  int64_t t = i < items ? item_token(i, d) : 0;
#pragma unroll 1
  for (; i < items; i += warps) {
    int next_d = 0;
    const int64_t next_t = i + warps < items ? item_token(i + warps, next_d) : 0;
    const int64_t row = first_row_on[d] + (i - first_item[d]);
    if (row < capacity[d])
      copy_row_to<V, kDepth>(src, t, outputs[d], row, row_bytes, S, K, d * per_rank, (d + 1) * per_rank, lane);
    d = next_d;
    t = next_t;
  }
  const RowOutputs& here = outputs[me];
#pragma unroll 1
  for (int64_t row = (received < capacity[me] ? received : capacity[me]) + first_warp_item; row < capacity[me];
       row += warps) {
    for (int64_t k = lane; k < K; k += 32) {
      if (here.topk_idx) here.topk_idx[row * K + k] = -1;
      if (here.topk_weights) here.topk_weights[row * K + k] = 0.f;
    }
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ float from_float(float v) { return v; }

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// ---- host side of the launchers
inline bool aligned(const void* p, int bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

// Blocks of kThreads for `warps_of_work` warps' work (a warp per row or token): at most the SM budget.
inline int grid_for_warps(int num_blocks, int64_t warps_of_work) {
  constexpr int kWarpsPerBlock = kThreads / 32;
  const int64_t wanted = (warps_of_work + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return int(wanted < 1 ? 1 : (wanted < num_blocks ? wanted : num_blocks));
}

// Calls launch(V{}) with V the access type of `vec` bytes (16, 8, 4, 2; else 1): the dispatch
// launchers' choice of kernel instance.
template <typename Launch>
inline void with_access_type(int vec, Launch&& launch) {
  switch (vec) {
    case 16: launch(int4{}); break;
    case 8: launch(int2{}); break;
    case 4: launch(int{}); break;
    case 2: launch(short{}); break;
    default: launch(char{}); break;
  }
}

// Whether combine may move `vector` elements per access: 16 bytes where the hidden size, the
// output and every rank's input allow it.
inline bool combine_wide(const CombineParams& p, int vector) {
  bool wide = p.hidden % vector == 0 && aligned(p.out, 16);
  for (int d = 0; d < p.num_ranks; ++d) wide = wide && (!p.x[d] || aligned(p.x[d], 16));
  return wide;
}

// Returns launch(T{}) with T the element type of `dtype` (bf16, fp16, fp32): the combine
// launchers' dtype switch; cudaErrorInvalidValue for another.
template <typename Launch>
inline cudaError_t with_element_type(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kBFloat16: return launch(__nv_bfloat16{});
    case DType::kFloat16: return launch(__half{});
    case DType::kFloat32: return launch(float{});
  }
  return cudaErrorInvalidValue;
}

// Calls launch(T{}, std::integral_constant<int, V>{}) for combine's element type T and its
// elements per access V (16 bytes' worth where combine_wide allows, else 1), then returns the
// launch's error: the warp kernels' choice of instance.
template <typename Launch>
inline cudaError_t with_combine_instance(const CombineParams& p, Launch&& launch) {
  return with_element_type(p.dtype, [&](auto t) {
    constexpr int kVector = 16 / int(sizeof(t));
    if (combine_wide(p, kVector)) launch(t, std::integral_constant<int, kVector>{});
    else launch(t, std::integral_constant<int, 1>{});
    return cudaGetLastError();
  });
}

}  // namespace ep::kernels
