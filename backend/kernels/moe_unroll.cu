// MoE dispatch and combine for few SMs (MoeCopy::kUnroll): the warp kernels' split of the work
// (a warp per received row, a warp per token), with each warp's loads reordered so that it waits
// on memory about once per row rather than once per dependent load.
//
// Why: with a grid of 4-8 SMs the warps are few, so what bounds the rate is how many round trips
// to memory (~1 us each under load) a warp makes per row. moe.cu's kernels make several in a
// chain: dispatch looks up the row's source token, then copies the payload, then the fp8 scales,
// then the topk ids, then the weights (the compiler keeps every load after a store that might
// alias it); combine looks up the token's positions, then loads and sums one source's row at a
// time. Here:
//   dispatch  the source token of the warp's next row is loaded while the current row copies, as
//             an int32 widened only after that row (in the SASS of a lookup that widened it right
//             after its load, sm_90 / nvcc 13, the current row's payload loads waited on it: a round
//             trip more a row). A row's first 32 x kDepth payload units, its first 64 scales and
//             32 topk ids and weights are all loaded before any of them is stored: an fp8 row of
//             hidden 7168 (448 16-byte units) is one round trip, a bf16 row two. The sources' row
//             counts are read by a lane each, not one after another. Rows of whole rounds (their
//             16-byte units a multiple of 32 x depth for a depth of 8-16) go unguarded: with few
//             SMs the guards' instructions, not memory, cost fp8 rows 5 % (whole_depth).
//   combine   the positions of the warp's next token are looked up a token ahead; the rows of two
//             sources are loaded before they are summed. With at most two sources (every token of
//             a 2-rank group, most of a 4-rank one) no running sum is held across the loads, so
//             2 x kChunks 16-byte loads a lane are in flight; with more, pairs of sources at
//             kChunks / 2 chunks each. Sums run in float, in ascending rank from 0, as
//             moe.cu's kernel and torch_ep.reference do: the results are the same bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <type_traits>

#include "backend/kernels/moe_device.cuh"
#include "backend/kernels/module_kernels.hpp"
#include "backend/kernels/moe_unroll.cuh"

namespace ep::kernels {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kDispatchDepth = 16;  // dispatch: 16-byte payload loads a lane, per round trip
constexpr int kCombineChunks = 8;   // combine: chunks of a row a lane, per source, with <= 2 sources

// ------------------------------------------------------------------------------------ dispatch

// Where each source's rows start among this rank's received rows (first_row[R]: rows received),
// lane s of warp 0 reading source s's count; then the rows to copy, as dispatch_rows.
__device__ __forceinline__ int64_t dispatch_rows_at_once(const DispatchParams& p, int64_t* first_row) {
  const int R = p.num_ranks;
  if (threadIdx.x < 32) {  // R <= kMaxRanksPerNode = 32
    const int s = threadIdx.x;
    int64_t at = s < R ? p.src[s].meta[MetaLayout::tokens_per_rank() + p.rank] : 0;
    for (int offset = 1; offset < 32; offset <<= 1) {  // inclusive scan over the lanes
      const int64_t below = __shfl_up_sync(0xffffffffu, at, offset);
      if (s >= offset) at += below;
    }
    if (s < R) first_row[s + 1] = at;
    if (s == 0) first_row[0] = 0;
  }
  __syncthreads();
  return rows_within_capacity(p, first_row[R]);
}

// Rows from `row` (then every `warps`) to the capacity of a fixed-size output: routed nowhere.
__device__ __forceinline__ void pad_unrouted_rows(const DispatchParams& p, int64_t row, int64_t warps, int lane) {
  for (; row < p.capacity; row += warps) {
    for (int k = lane; k < p.num_topk; k += 32) {
      if (p.recv_topk_idx) p.recv_topk_idx[row * p.num_topk + k] = -1;
      if (p.recv_topk_weights) p.recv_topk_weights[row * p.num_topk + k] = 0.f;
    }
  }
}

// Row `row`'s source rank, searched up from `s` in shared memory only (a warp's rows only grow),
// and where its token lies: apart, so that the kernel can load the next row's token as an int32
// and widen it only after the current row (the header says why).
__device__ __forceinline__ int source_of(const int64_t* first_row, int R, int64_t row, int s) {
  while (s + 1 < R && row >= first_row[s + 1]) ++s;
  return s;
}
__device__ __forceinline__ const int32_t* token_slot(const DispatchParams& p, const int64_t* first_row, int64_t row,
                                                     int s) {
  const DispatchSource& src = p.src[s];
  const MetaLayout theirs{p.num_ranks, p.num_experts, src.num_tokens};
  return src.meta + theirs.send_tokens() + p.rank * src.num_tokens + (row - first_row[s]);
}

// A warp copies source token t of `src` to received row `row` (copy_row_to, moe_device.cuh).
template <typename V, int kDepth, bool kWhole>
__device__ __forceinline__ void copy_row(const DispatchParams& p, const DispatchSource& src, int64_t t, int64_t row,
                                         int64_t lo, int64_t hi, int lane) {
  const RowOutputs out{p.recv_x, p.recv_x_scales, p.recv_topk_idx, p.recv_topk_weights};
  copy_row_to<V, kDepth, kWhole>(src, t, out, row, p.row_bytes, p.num_scales, p.num_topk, lo, hi, lane);
}

// kWhole: rows of whole rounds, copied unguarded (copy_row_to).
template <typename V, int kDepth, bool kWhole = false>
__global__ void __launch_bounds__(kThreads) dispatch_unroll_kernel(DispatchParams p) {
  __shared__ int64_t first_row[kMaxRanksPerNode + 1];
  const int R = p.num_ranks;
  const int lane = threadIdx.x & 31;
  handshake_begin(p.handshake, R);
  const int64_t rows = dispatch_rows_at_once(p, first_row);
  const int64_t per_rank = p.num_experts / R, lo = p.rank * per_rank, hi = lo + per_rank;

  const int64_t warps = int64_t(gridDim.x) * kWarps;
  int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  int s = row < rows ? source_of(first_row, R, row, 0) : 0;
  int64_t t = row < rows ? *token_slot(p, first_row, row, s) : 0;
#pragma unroll 1
  for (; row < rows; row += warps) {
    const int64_t next = row + warps;
    const int next_s = next < rows ? source_of(first_row, R, next, s) : s;
    int32_t next_t = 0;  // on its way while this row copies, widened only after it
    if (next < rows) next_t = *token_slot(p, first_row, next, next_s);
    copy_row<V, kDepth, kWhole>(p, p.src[s], t, row, lo, hi, lane);
    s = next_s;
    t = next_t;
  }
  pad_unrouted_rows(p, row, warps, lane);
  handshake_end(p.handshake, R);
}

// ------------------------------------------------------------------------------------ combine

// A Pack's bytes as one integer word, the type the loads hold: a Pack of 16-bit elements loaded
// into registers as itself ends up an element a register, twice the registers of its bytes.
template <int kBytes> struct WordOf;
template <> struct WordOf<16> { using type = int4; };
template <> struct WordOf<8> { using type = int2; };
template <> struct WordOf<4> { using type = int; };
template <> struct WordOf<2> { using type = short; };
template <typename T, int V>
using Word = typename WordOf<sizeof(Pack<T, V>)>::type;

template <typename T, int V>
__device__ __forceinline__ float element(const Word<T, V>& word, int i) {
  Pack<T, V> pack;
  memcpy(&pack, &word, sizeof(pack));
  return to_float(pack.v[i]);
}

// Rank d's row of the warp's token (lane d holds its index). Every lane calls it, with the same d.
template <typename T, int V>
__device__ __forceinline__ const Word<T, V>* source_row(const CombineParams& p, const CombineSources& src, int d,
                                                        int64_t row_of_lane) {
  const int64_t row = __shfl_sync(0xffffffffu, row_of_lane, d);
  return reinterpret_cast<const Word<T, V>*>(reinterpret_cast<const T*>(src.x[d]) + row * p.hidden);
}

// The token's row from at most two sources (bits of `sources`): each round loads kChunks chunks
// a lane of both rows, then sums them; nothing is held across the loads but what they load.
template <typename T, int V, int kChunks>
__device__ __forceinline__ void sum_two_sources(const CombineParams& p, const CombineSources& src, unsigned sources,
                                                int64_t row,
                                                Pack<T, V>* out, int lane) {
  const int64_t chunks = p.hidden / V;
  const int d0 = __ffs(sources) - 1, d1 = __ffs(sources & (sources - 1)) - 1;  // -1: none
  const bool has0 = d0 >= 0, has1 = d1 >= 0;
  const Word<T, V>* in0 = has0 ? source_row<T, V>(p, src, d0, row) : nullptr;
  const Word<T, V>* in1 = has1 ? source_row<T, V>(p, src, d1, row) : nullptr;
#pragma unroll 1
  for (int64_t c0 = lane; c0 < chunks; c0 += 32 * kChunks) {
    Word<T, V> a[kChunks] = {}, b[kChunks] = {};  // zeros: no value lives on past the round
#pragma unroll
    for (int u = 0; u < kChunks; ++u)
      if (has0 && c0 + 32 * u < chunks) a[u] = in0[c0 + 32 * u];
#pragma unroll
    for (int u = 0; u < kChunks; ++u)
      if (has1 && c0 + 32 * u < chunks) b[u] = in1[c0 + 32 * u];
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      if (c0 + 32 * u >= chunks) break;
      Pack<T, V> sum;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        float acc = 0.f;
        if (has0) acc += element<T, V>(a[u], i);
        if (has1) acc += element<T, V>(b[u], i);
        sum.v[i] = from_float<T>(acc);
      }
      out[c0 + 32 * u] = sum;
    }
  }
}

// The token's row from any number of sources: each round holds a running sum of kChunks chunks a
// lane and adds the sources two at a time, both rows loaded before either is added. The rounds
// step together over the warp (every lane runs each, idle past the row's end), since source_row
// shuffles.
template <typename T, int V, int kChunks>
__device__ __forceinline__ void sum_sources(const CombineParams& p, const CombineSources& src, unsigned sources,
                                                int64_t row,
                                            Pack<T, V>* out, int lane) {
  const int64_t chunks = p.hidden / V;
#pragma unroll 1
  for (int64_t base = 0; base < chunks; base += 32 * kChunks) {
    const int64_t c0 = base + lane;
    float acc[kChunks][V];
#pragma unroll
    for (int u = 0; u < kChunks; ++u)
#pragma unroll
      for (int i = 0; i < V; ++i) acc[u][i] = 0.f;
#pragma unroll 1
    for (unsigned left = sources; left;) {
      const int d0 = __ffs(left) - 1;
      left &= left - 1;
      const int d1 = __ffs(left) - 1;  // -1: d0 was the last
      left &= left - 1;
      const Word<T, V>* in0 = source_row<T, V>(p, src, d0, row);
      const bool has1 = d1 >= 0;
      const Word<T, V>* in1 = has1 ? source_row<T, V>(p, src, d1, row) : nullptr;
      Word<T, V> a[kChunks] = {}, b[kChunks] = {};  // zeros: no value lives on past the round
#pragma unroll
      for (int u = 0; u < kChunks; ++u)
        if (c0 + 32 * u < chunks) a[u] = in0[c0 + 32 * u];
#pragma unroll
      for (int u = 0; u < kChunks; ++u)
        if (has1 && c0 + 32 * u < chunks) b[u] = in1[c0 + 32 * u];
#pragma unroll
      for (int u = 0; u < kChunks; ++u)
#pragma unroll
        for (int i = 0; i < V; ++i) acc[u][i] += element<T, V>(a[u], i);
      if (has1) {
#pragma unroll
        for (int u = 0; u < kChunks; ++u)
#pragma unroll
          for (int i = 0; i < V; ++i) acc[u][i] += element<T, V>(b[u], i);
      }
    }
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      if (c0 + 32 * u >= chunks) break;
      Pack<T, V> sum;
#pragma unroll
      for (int i = 0; i < V; ++i) sum.v[i] = from_float<T>(acc[u][i]);
      out[c0 + 32 * u] = sum;
    }
  }
}

template <typename T, int V, int kChunks>
__global__ void __launch_bounds__(kThreads) combine_unroll_kernel(CombineParams p) {
  __shared__ CombineSources src;
  const int R = p.num_ranks;
  const int lane = threadIdx.x & 31;
  const MetaLayout l{R, p.num_experts, p.num_tokens};
  handshake_begin(p.handshake, R);
  load_combine_sources(p, src);
  __syncthreads();
  const int32_t* token_pos = p.meta[p.rank] + l.token_pos();  // [N, R]
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  int64_t t = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  // Lane d: the token's row among those sent to rank d, or -1; looked up a token ahead.
  int pos = lane < R && t < p.num_tokens ? token_pos[t * R + lane] : -1;
#pragma unroll 1
  for (; t < p.num_tokens; t += warps) {
    int64_t row = -1;  // lane d: where the token's row sits in rank d's input
    if (pos >= 0) {
      row = src.first_row_at[lane] + int64_t(pos);
      if (row >= src.x_rows[lane]) row = -1;  // dropped by an overflowing dispatch
    }
    pos = lane < R && t + warps < p.num_tokens ? token_pos[(t + warps) * R + lane] : -1;
    const unsigned sources = __ballot_sync(0xffffffffu, row >= 0);
    auto* out = reinterpret_cast<Pack<T, V>*>(reinterpret_cast<T*>(p.out) + t * p.hidden);
    if (__popc(sources) <= 2)
      sum_two_sources<T, V, kChunks>(p, src, sources, row, out, lane);
    else
      sum_sources<T, V, kChunks / 2>(p, src, sources, row, out, lane);
    if (p.out_weights) {
      const int K = p.num_topk;
      for (int k0 = 0; k0 < K; k0 += 32) {  // every lane runs each step: source_row-like shuffles
        const int k = k0 + lane;
        float acc = 0.f;
        for (unsigned left = sources; left;) {
          const int d0 = __ffs(left) - 1;
          left &= left - 1;
          const int d1 = __ffs(left) - 1;
          left &= left - 1;
          const int64_t r0 = __shfl_sync(0xffffffffu, row, d0);
          const int64_t r1 = __shfl_sync(0xffffffffu, row, d1 >= 0 ? d1 : d0);
          if (k < K) {
            const float w0 = src.topk_weights[d0][r0 * K + k];
            const float w1 = d1 >= 0 ? src.topk_weights[d1][r1 * K + k] : 0.f;
            acc += w0;
            if (d1 >= 0) acc += w1;
          }
        }
        if (k < K) p.out_weights[t * K + k] = acc;
      }
    }
  }
  handshake_end(p.handshake, R, combine_says_done(p));
}

// The depth of the unguarded kernel for rows of `row_bytes` in 16-byte units: the largest of
// kWholeDepths whose round (32 lanes x depth) divides the row, else 0 (the guarded kernel). Hidden
// 7168 takes 14 (an fp8 row one round, a bf16 row two), 4096 8 (fp8) and 16 (bf16). H100, 2 ranks,
// fp8 with a layout, against the guarded kernel: 340.5 against 324.2 GB/s at 8 SMs, 180.2 / 172.4
// at 4, 607.1 / 583.1 at 16 (bf16 the same to 1.5 %).
constexpr int kWholeDepths[] = {16, 14, 12, 10, 8};

int whole_depth(int vec, int64_t row_bytes) {
  if (vec != 16 || row_bytes <= 0) return 0;  // vec 16: rows of 16-byte units
  for (const int depth : kWholeDepths)
    if ((row_bytes / 16) % (32 * depth) == 0) return depth;
  return 0;
}

template <typename F>
void with_whole_depth(int depth, F&& f) {
  switch (depth) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 14: f(std::integral_constant<int, 14>{}); break;
    case 12: f(std::integral_constant<int, 12>{}); break;
    case 10: f(std::integral_constant<int, 10>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

}  // namespace

cudaError_t launch_dispatch_unroll(const DispatchParams& p, int vec, cudaStream_t stream) {
  const int grid = grid_for_warps(p.num_blocks, p.capacity);
  if (const int depth = whole_depth(vec, p.row_bytes)) {
    with_whole_depth(depth, [&](auto d) {
      dispatch_unroll_kernel<int4, decltype(d)::value, true><<<grid, kThreads, 0, stream>>>(p);
    });
    return cudaGetLastError();
  }
  with_access_type(vec, [&](auto v) {
    dispatch_unroll_kernel<decltype(v), kDispatchDepth><<<grid, kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

cudaError_t launch_combine_unroll(const CombineParams& p, cudaStream_t stream) {
  const int grid = grid_for_warps(p.num_blocks, p.num_tokens);
  return with_combine_instance(p, [&](auto t, auto vector) {
    combine_unroll_kernel<decltype(t), decltype(vector)::value, kCombineChunks><<<grid, kThreads, 0, stream>>>(p);
  });
}

const void* moe_unroll_module_kernel() { return reinterpret_cast<const void*>(dispatch_unroll_kernel<int4, kDispatchDepth>); }

}  // namespace ep::kernels
