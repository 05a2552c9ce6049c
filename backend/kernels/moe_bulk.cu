// MoE dispatch and combine on Hopper bulk async copies (MoeCopy::kBulk): for small grids.
//
// Why: the warp kernels keep at most 16 warps x 32 lanes x 4 x 16 B = 32 KiB of loads in flight
// per SM, and less around each row's index lookups; at ~1 us per round trip that caps an SM near
// 30-40 GB/s, so 4-8 SMs cannot reach the bandwidth the op needs. Here one thread per block
// issues cp.async.bulk copies (the TMA engine moves the bytes, no registers held) through a ring
// of kStages shared-memory stages of kStageBytes: ~kLag x 16 KiB = 128 KiB of loads in flight per
// SM, whatever the row size, plus stores draining behind them.
//
//   dispatch  warp 0 streams the block's rows, a contiguous range of recv_x: each stage is filled
//             by bulk loads of the source rows' pieces (peer memory through CUDA IPC), then
//             written by one bulk store to recv_x kLag stages later. Its lanes look up the next 32
//             rows' source tokens while the current 32 copy. The other warps write the small
//             columns (fp8 scales, topk ids and weights, padding rows), a lane per row, several
//             loads in flight each.
//   combine   warp 0 (producer) bulk-loads, per (token, chunk of the row), each source rank's
//             chunk into its slot of a stage; warp 1 + s (consumer) owns stage s: it sums the
//             slots in float (ascending rank, as the warp kernel), writes the chunk of the output
//             row with 16-byte stores and hands the stage back. One consumer per stage keeps
//             every wait on an mbarrier at most one phase ahead.
//
// Only sm_90 and up; moe_bulk.cuh's launchers refuse elsewhere, and where rows are not a multiple
// of 16 bytes or not 16-byte aligned (bulk copies need both), so the caller runs the warp kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "backend/kernels/moe_bulk.cuh"
#include "backend/kernels/module_kernels.hpp"
#include "backend/kernels/moe_device.cuh"

namespace ep::kernels {
namespace {

constexpr int kStageBytes = 16 << 10;  // one stage of the ring
constexpr int kStages = 12;            // 192 KiB of the 227 KiB a block may have on sm_90
constexpr int kLag = 8;                // dispatch: stages loading while the oldest is stored
constexpr int kDispatchThreads = 512;  // the copier warp and 15 warps for the small columns
constexpr int kCombineThreads = 32 * (1 + kStages);  // the producer and one consumer per stage
constexpr size_t kRingBytes = size_t(kStages) * kStageBytes;
static_assert(kLag < kStages, "the ring needs stages to store from while kLag stages load");

struct StageDesc {  // combine: what a stage holds
  int64_t token;
  int32_t chunk;
  uint32_t sources;  // bit d: rank d's chunk is in slot d
};

constexpr size_t dispatch_smem() { return kRingBytes + kStages * sizeof(uint64_t); }
constexpr size_t combine_smem() { return kRingBytes + 2 * kStages * sizeof(uint64_t) + kStages * sizeof(StageDesc); }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// ---- PTX of mbarriers and 1-D bulk copies (sm_90)
__device__ __forceinline__ uint32_t smem(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void bar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem(bar)), "r"(count) : "memory");
}

// Makes the barriers' initialisation visible to the async proxy (the bulk copies).
__device__ __forceinline__ void fence_bar_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

__device__ __forceinline__ void bar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem(bar)) : "memory");
}

// Arrives and expects `bytes` of bulk copies to complete the phase.
__device__ __forceinline__ void bar_arrive_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem(bar)), "r"(bytes) : "memory");
}

// Waits for the phase of parity `parity` to complete. Only our own copies complete it: no timeout.
__device__ __forceinline__ void bar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(smem(bar)), "r"(parity)
        : "memory");
  }
}

// global -> shared, completing `bytes` on `bar`. 16-byte aligned addresses, bytes a multiple of 16.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem(dst)),
               "l"(__cvta_generic_to_global(src)), "r"(bytes), "r"(smem(bar))
               : "memory");
}

// shared -> global, in the thread's current bulk group.
__device__ __forceinline__ void bulk_store(void* dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(__cvta_generic_to_global(dst)),
               "r"(smem(src)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Until at most N of this thread's bulk groups still read shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Until every bulk group of this thread has completed (its writes done).
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// ---- dispatch

// Received row `row` (< first_row[R]): its source rank and that rank's token.
__device__ __forceinline__ void source_of(const DispatchParams& p, const int64_t* first_row, int64_t row, int& s,
                                          int32_t& t) {
  s = 0;
  while (row >= first_row[s + 1]) ++s;
  const DispatchSource& src = p.src[s];
  const MetaLayout theirs{p.num_ranks, p.num_experts, src.num_tokens};
  t = src.meta[theirs.send_tokens() + p.rank * src.num_tokens + (row - first_row[s])];
}

// Warp 0: the payload of rows [lo, hi) into recv_x, a byte stream cut into stages. Lane 0 issues;
// every lane looks up one of the next 32 rows' source token ahead of use.
__device__ __forceinline__ void copy_rows(const DispatchParams& p, const int64_t* first_row, int64_t lo, int64_t hi,
                                          char* ring, uint64_t* full, int lane) {
  if (lo >= hi) return;
  const int64_t row_bytes = p.row_bytes;
  char* out = p.recv_x + lo * row_bytes;
  const int64_t total = (hi - lo) * row_bytes;
  const int64_t num_stages = (total + kStageBytes - 1) / kStageBytes;
  auto bytes_of = [&](int64_t k) { return uint32_t(total - k * kStageBytes < kStageBytes ? total - k * kStageBytes : kStageBytes); };
  auto slot = [&](int64_t k) { return ring + (k % kStages) * kStageBytes; };
  auto bar = [&](int64_t k) { return full + k % kStages; };
  // Stage k's slot last held stage k - kStages, whose store was committed kStages - kLag - 1
  // groups ago at least; then the loads of stage k are expected on its barrier.
  auto open = [&](int64_t k) {
    bulk_wait_read<kStages - kLag - 1>();
    bar_arrive_expect(bar(k), bytes_of(k));
  };
  auto store = [&](int64_t k) {
    bar_wait(bar(k), uint32_t(k / kStages) & 1);
    bulk_store(out + k * kStageBytes, slot(k), bytes_of(k));
    bulk_commit();
  };

  int64_t k = 0;      // the stage being filled
  uint32_t fill = 0;  // its bytes so far
  if (lane == 0) open(0);
  int s_next = 0;
  int32_t t_next = 0;
  if (lo + lane < hi) source_of(p, first_row, lo + lane, s_next, t_next);
  for (int64_t base = lo; base < hi; base += 32) {
    const int s_here = s_next;
    const int32_t t_here = t_next;
    if (base + 32 + lane < hi) source_of(p, first_row, base + 32 + lane, s_next, t_next);  // used a group later
    const int n = int(hi - base < 32 ? hi - base : 32);
    for (int j = 0; j < n; ++j) {
      const int s = __shfl_sync(0xffffffffu, s_here, j);
      const int32_t t = __shfl_sync(0xffffffffu, t_here, j);
      if (lane == 0) {
        const char* src = p.src[s].x + int64_t(t) * row_bytes;
        for (int64_t off = 0; off < row_bytes;) {
          const int64_t room = int64_t(bytes_of(k)) - fill;
          const uint32_t piece = uint32_t(row_bytes - off < room ? row_bytes - off : room);
          bulk_load(slot(k) + fill, src + off, piece, bar(k));
          off += piece;
          fill += piece;
          if (fill == bytes_of(k)) {  // stage k is full: store the one kLag behind, open the next
            if (k >= kLag) store(k - kLag);
            fill = 0;
            if (++k < num_stages) open(k);
          }
        }
      }
      __syncwarp();
    }
  }
  if (lane == 0) {
    for (int64_t j = num_stages > kLag ? num_stages - kLag : 0; j < num_stages; ++j) store(j);
    bulk_wait_all();
  }
  __syncwarp();
}

// Warps 1..: the small columns of rows [lo, hi) (the received ones below `rows`, padding above),
// a lane per row so that a warp has 32 rows' loads in flight, several columns at once.
__device__ __forceinline__ void copy_small_columns(const DispatchParams& p, const int64_t* first_row, int64_t lo,
                                                   int64_t hi, int64_t rows, int warp, int num_warps, int lane) {
  constexpr int kScales = 16, kTopk = 4;  // columns per round
  const int64_t per_rank = p.num_experts / p.num_ranks, mine_lo = p.rank * per_rank, mine_hi = mine_lo + per_rank;
  const int K = p.num_topk, S = p.num_scales;
  for (int64_t row = lo + int64_t(warp) * 32 + lane; row < hi; row += int64_t(num_warps) * 32) {
    if (row >= rows) {  // padding of a fixed-size output: routed nowhere
      for (int k = 0; k < K; ++k) {
        if (p.recv_topk_idx) p.recv_topk_idx[row * K + k] = -1;
        if (p.recv_topk_weights) p.recv_topk_weights[row * K + k] = 0.f;
      }
      continue;
    }
    int s;
    int32_t t;
    source_of(p, first_row, row, s, t);
    const DispatchSource& src = p.src[s];
    for (int i = 0; i < S; i += kScales) {
      float v[kScales];
#pragma unroll
      for (int u = 0; u < kScales; ++u)
        if (i + u < S) v[u] = src.x_scales[int64_t(t) * S + i + u];
#pragma unroll
      for (int u = 0; u < kScales; ++u)
        if (i + u < S) p.recv_x_scales[row * S + i + u] = v[u];
    }
    if (!src.topk_idx) continue;
    for (int k = 0; k < K; k += kTopk) {
      int64_t e[kTopk];
      float w[kTopk];
#pragma unroll
      for (int u = 0; u < kTopk; ++u) {
        if (k + u >= K) break;
        e[u] = src.topk_idx[int64_t(t) * K + k + u];
        if (p.recv_topk_weights) w[u] = src.topk_weights[int64_t(t) * K + k + u];
      }
#pragma unroll
      for (int u = 0; u < kTopk; ++u) {
        if (k + u >= K) break;
        const bool mine = e[u] >= mine_lo && e[u] < mine_hi;
        p.recv_topk_idx[row * K + k + u] = mine ? e[u] - mine_lo : -1;
        if (p.recv_topk_weights) p.recv_topk_weights[row * K + k + u] = mine ? w[u] : 0.f;
      }
    }
  }
}
#endif  // __CUDA_ARCH__ >= 900

// A block per SM of the budget, each a contiguous range of the output rows.
__global__ void __launch_bounds__(kDispatchThreads) dispatch_bulk_kernel(const __grid_constant__ DispatchParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) char ring[];  // [kStages][kStageBytes], then a barrier per stage
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + kRingBytes);
  __shared__ int64_t first_row[kMaxRanksPerNode + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  handshake_begin(p.handshake, p.num_ranks);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) bar_init(&full[s], 1);
    fence_bar_init();
  }
  const int64_t rows = dispatch_rows(p, first_row);  // syncs the block
  const int64_t per_block = (p.capacity + gridDim.x - 1) / gridDim.x;
  const int64_t lo = blockIdx.x * per_block, hi = lo + per_block < p.capacity ? lo + per_block : p.capacity;
  if (warp == 0)
    copy_rows(p, first_row, lo, hi < rows ? hi : rows, ring, full, lane);
  else
    copy_small_columns(p, first_row, lo, hi, rows, warp - 1, int(blockDim.x / 32) - 1, lane);
  handshake_end(p.handshake, p.num_ranks);
#endif
}

// ---- combine

template <typename T>
__global__ void __launch_bounds__(kCombineThreads, 1) combine_bulk_kernel(const __grid_constant__ CombineParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int V = 16 / sizeof(T);  // elements per 16-byte access
  extern __shared__ __align__(128) char ring[];  // [kStages][kStageBytes], full and empty barriers, descriptors
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + kRingBytes);
  uint64_t* empty = full + kStages;
  StageDesc* desc = reinterpret_cast<StageDesc*>(empty + kStages);
  __shared__ CombineSources src;
  const int R = p.num_ranks;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const MetaLayout l{R, p.num_experts, p.num_tokens};
  const int32_t* token_pos = p.meta[p.rank] + l.token_pos();  // [N, R]
  handshake_begin(p.handshake, R);
  load_combine_sources(p, src);
  if (threadIdx.x == 32) {
    for (int s = 0; s < kStages; ++s) bar_init(&full[s], 1), bar_init(&empty[s], 1);
    fence_bar_init();
  }
  __syncthreads();
  // Where token t's row sits in rank d's input, or -1 where it was not sent (or dropped by an
  // overflowing dispatch).
  auto row_on = [&](int d, int32_t pos) -> int64_t {
    const int64_t row = pos >= 0 ? src.first_row_at[d] + pos : -1;
    return row < src.x_rows[d] ? row : -1;
  };

  const int64_t per_block = (p.num_tokens + gridDim.x - 1) / gridDim.x;
  const int64_t lo = blockIdx.x * per_block, hi = lo + per_block < p.num_tokens ? lo + per_block : p.num_tokens;
  const int64_t row_bytes = p.hidden * int64_t(sizeof(T));
  // A row in chunks of which R fit a stage (slot d of a stage: rank d's), of balanced sizes.
  const int64_t slot_bytes = (kStageBytes / R) & ~int64_t(15);
  const int64_t num_chunks = (row_bytes + slot_bytes - 1) / slot_bytes;
  const int64_t chunk_bytes = ((row_bytes + num_chunks - 1) / num_chunks + 15) & ~int64_t(15);
  const int64_t items = lo < hi ? (hi - lo) * num_chunks : 0;  // item i: token lo + i / num_chunks, its chunk i % num_chunks
  auto bytes_of = [&](int64_t chunk) {
    const int64_t left = row_bytes - chunk * chunk_bytes;
    return uint32_t(left < chunk_bytes ? left : chunk_bytes);
  };

  if (warp == 0) {  // producer: lanes look up the next 32 tokens' rows while lane 0 issues
    int32_t pos_next[kMaxRanksPerNode], pos_here[kMaxRanksPerNode];
#pragma unroll
    for (int d = 0; d < kMaxRanksPerNode; ++d) pos_next[d] = d < R && lo + lane < hi ? token_pos[(lo + lane) * R + d] : -1;
    int64_t item = 0;
    for (int64_t base = lo; base < hi; base += 32) {
      const int64_t ahead = base + 32 + lane;  // looked up now, used a group later
#pragma unroll
      for (int d = 0; d < kMaxRanksPerNode; ++d) {
        pos_here[d] = pos_next[d];
        pos_next[d] = d < R && ahead < hi ? token_pos[ahead * R + d] : -1;
      }
      const int n = int(hi - base < 32 ? hi - base : 32);
#pragma unroll 1
      for (int j = 0; j < n; ++j) {
        int64_t row[kMaxRanksPerNode];
        uint32_t sources = 0;
#pragma unroll
        for (int d = 0; d < kMaxRanksPerNode; ++d) {
          row[d] = d < R ? row_on(d, __shfl_sync(0xffffffffu, pos_here[d], j)) : -1;
          if (row[d] >= 0) sources |= 1u << d;
        }
        if (lane == 0) {
          for (int32_t c = 0; c < num_chunks; ++c, ++item) {
            const int st = int(item % kStages);
            if (item >= kStages) bar_wait(&empty[st], uint32_t(item / kStages - 1) & 1);
            desc[st] = StageDesc{base + j, c, sources};
            const uint32_t bytes = bytes_of(c);
            bar_arrive_expect(&full[st], uint32_t(__popc(sources)) * bytes);  // no source: a row of zeros
            for (uint32_t left = sources; left; left &= left - 1) {
              const int d = __ffs(left) - 1;
              bulk_load(ring + st * kStageBytes + d * slot_bytes, src.x[d] + row[d] * row_bytes + c * chunk_bytes, bytes,
                        &full[st]);
            }
          }
        }
        __syncwarp();
      }
    }
  } else {
    const int st = warp - 1;  // this warp's stage
    // The combined weights first, a lane per token (the producer fills the ring meanwhile).
    if (p.out_weights) {
      const int K = p.num_topk;
      for (int64_t t = lo + int64_t(st) * 32 + lane; t < hi; t += int64_t(kStages) * 32) {
        int64_t row[kMaxRanksPerNode];
#pragma unroll
        for (int d = 0; d < kMaxRanksPerNode; ++d) row[d] = d < R ? row_on(d, token_pos[t * R + d]) : -1;
        for (int k = 0; k < K; k += 4) {
          float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int d = 0; d < kMaxRanksPerNode; ++d) {
            if (row[d] < 0) continue;
#pragma unroll
            for (int u = 0; u < 4; ++u)
              if (k + u < K) acc[u] += src.topk_weights[d][row[d] * K + k + u];
          }
#pragma unroll
          for (int u = 0; u < 4; ++u)
            if (k + u < K) p.out_weights[t * K + k + u] = acc[u];
        }
      }
    }
    const char* stage = ring + st * kStageBytes;
    for (int64_t item = st; item < items; item += kStages) {
      bar_wait(&full[st], uint32_t(item / kStages) & 1);
      const StageDesc dsc = desc[st];
      const uint32_t vectors = bytes_of(dsc.chunk) / 16;
      auto* out = reinterpret_cast<Pack<T, V>*>(p.out + dsc.token * row_bytes + dsc.chunk * chunk_bytes);
      for (uint32_t v = lane; v < vectors; v += 32) {
        float acc[V];
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = 0.f;
#pragma unroll
        for (int d = 0; d < kMaxRanksPerNode; ++d) {
          if (!(dsc.sources >> d & 1)) continue;
          const Pack<T, V> in = reinterpret_cast<const Pack<T, V>*>(stage + d * slot_bytes)[v];
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += to_float(in.v[i]);
        }
        Pack<T, V> sum;
#pragma unroll
        for (int i = 0; i < V; ++i) sum.v[i] = from_float<T>(acc[i]);
        out[v] = sum;
      }
      __syncwarp();
      if (lane == 0) bar_arrive(&empty[st]);  // the stage is read: the producer may refill it
    }
  }
  handshake_end(p.handshake, R, combine_says_done(p));
#endif
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Bulk copies are sm_90 instructions.
bool bulk_copies_available() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 9;
}

int grid_for(int num_blocks, int64_t work, int64_t per_block) {
  const int64_t wanted = (work + per_block - 1) / per_block;
  return int(wanted < 1 ? 1 : (wanted < num_blocks ? wanted : num_blocks));
}

template <typename T>
cudaError_t launch_combine_bulk_as(const CombineParams& p, cudaStream_t stream) {
  const size_t smem = combine_smem();
  cudaError_t err = cudaFuncSetAttribute(combine_bulk_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  // At least 32 tokens a block: fewer leave the producer's lookups idle.
  combine_bulk_kernel<T><<<grid_for(p.num_blocks, p.num_tokens, 32), kCombineThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dispatch_bulk(const DispatchParams& p, cudaStream_t stream) {
  bool fits = p.row_bytes % 16 == 0 && (!p.recv_x || aligned16(p.recv_x));
  for (int s = 0; s < p.num_ranks; ++s) fits = fits && (!p.src[s].x || aligned16(p.src[s].x));
  if (!fits || !bulk_copies_available()) return cudaErrorNotSupported;
  const size_t smem = dispatch_smem();
  cudaError_t err = cudaFuncSetAttribute(dispatch_bulk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  dispatch_bulk_kernel<<<grid_for(p.num_blocks, p.capacity, 32), kDispatchThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_combine_bulk(const CombineParams& p, cudaStream_t stream) {
  const int64_t element = p.dtype == DType::kFloat32 ? 4 : 2;
  bool fits = (p.hidden * element) % 16 == 0 && (!p.out || aligned16(p.out));
  for (int d = 0; d < p.num_ranks; ++d) fits = fits && (!p.x[d] || aligned16(p.x[d]));
  if (!fits || !bulk_copies_available()) return cudaErrorNotSupported;
  return with_element_type(p.dtype, [&](auto t) { return launch_combine_bulk_as<decltype(t)>(p, stream); });
}

const void* moe_bulk_module_kernel() { return reinterpret_cast<const void*>(dispatch_bulk_kernel); }

}  // namespace ep::kernels
