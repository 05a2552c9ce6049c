// Device helpers of the internode kernels (internode_*.cu, their only includers): addressing of
// the symmetric buffer, error reports, bounded waits, row copies. Completion words and warp copies
// are the low-latency kernels' (low_latency_device.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include "backend/kernels/internode_device.cuh"
#include "backend/kernels/low_latency_device.cuh"  // ll::complete, ll::closing_signal, ll::warp_copy_l2
#include "backend/kernels/sync.cuh"                // now_ns, load_acquire

namespace ep::kernels::ix {
namespace {

// Reports an error in the host-mapped word: the first one wins, except that a timeout replaces a
// pending refusal or overflow (the host would clear the word, and the timeout would never be
// raised). A plain check-then-store, as report_first (sync.cuh). A timeout looks again after its
// fence: a pending code stored at the same moment (once a kernel at most) would otherwise win and
// be cleared.
__device__ __forceinline__ void report(int* error, int kind, int peer) {
  volatile int* word = error;
  const int code = kind * 65536 + peer + 1, held = *word;
  if (held == 0 || (pending_refusal(held) && !pending_refusal(code))) *word = code;
  __threadfence_system();
  if (!pending_refusal(code) && pending_refusal(*word)) {
    *word = code;
    __threadfence_system();
  }
}

template <typename T>
__device__ __forceinline__ T* at(char* base, int64_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

__device__ __forceinline__ IxCtrl& ctrl(const IxParams& p) { return *at<IxCtrl>(p.base, p.layout.ctrl()); }
__device__ __forceinline__ char* row(const IxParams& p, int64_t region, int64_t index) {
  return p.base + region + index * p.row_stride;
}
// Row `index` of block `block` (C rows) of a region, the blocks C x W bytes apart whatever the
// call's stride: where a call's rows are narrower than W (a combine's), row(block * C + index)
// would run into the next block, e.g. the combine's sums for node m into this node's packed rows,
// which dispatch_buffer hands out between calls. In a dispatch (stride W) both agree.
__device__ __forceinline__ char* block_row(const IxParams& p, int64_t region, int64_t block, int64_t index) {
  return p.base + region + block * p.layout.capacity * p.layout.row_bytes + index * p.row_stride;
}
__device__ __forceinline__ uint64_t* chunk_flag(const IxParams& p, int node, int64_t chunk) {
  return at<uint64_t>(p.base, p.layout.chunk_flags()) + node * p.layout.chunks() + chunk;
}
__device__ __forceinline__ uint64_t* row_flag(const IxParams& p, int node, int64_t slot) {
  return at<uint64_t>(p.base, p.layout.row_flags()) + node * p.layout.capacity + slot;
}
__device__ __forceinline__ uint64_t* count_word(const IxParams& p, int index) {
  return at<uint64_t>(p.base, p.layout.counts()) + index;
}
__device__ __forceinline__ uint64_t* combine_in_done(const IxParams& p, int local) {
  return at<uint64_t>(p.base, p.layout.combine_in_done()) + local;
}
__device__ __forceinline__ uint64_t* dispatch_in_done(const IxParams& p, int local) {
  return at<uint64_t>(p.base, p.layout.dispatch_in_done()) + local;
}
__device__ __forceinline__ uint64_t* route_flag(const IxParams& p, int node) {
  return at<uint64_t>(p.base, p.layout.route_flags()) + node;
}
__device__ __forceinline__ int rank_of(const IxParams& p, int node, int local) {
  return node * p.layout.ranks_per_node + local;
}

// Whether a wait of this rank's kernels gave up (or the host aborted the group): the buffer's
// signals are out of step with the peers' for good, so every later wait ends at once instead of
// waiting out a timeout of its own (calls queued behind a dead peer end within one timeout). In
// device memory: cheap to read in every wait's loop, where the host-mapped error word crosses PCIe.
__device__ __forceinline__ bool gave_up(const IxParams& p) {
  return *reinterpret_cast<volatile const uint32_t*>(&ctrl(p).gave_up) != 0;
}

// A wait that gave up: reports its timeout (naming `peer`) unless another wait gave up first (that
// one reported, or the host's abort named itself), and ends every other wait (gave_up).
__device__ __forceinline__ void give_up(const IxParams& p, int kind, int peer) {
  if (!gave_up(p)) report(p.error, kind, peer);
  atomicExch(&ctrl(p).gave_up, 1u);
}

// Waits (bounded) until *word >= value; false at the deadline, or once a wait gave up unless
// `heed_gave_up` is false: the waits that guard a region node peers read in place (dispatch_in,
// combine_in) wait for live readers whatever failed elsewhere, or the next writes would race them.
__device__ __forceinline__ bool wait_at_least(const IxParams& p, const uint64_t* word, uint64_t value,
                                              uint64_t deadline, bool heed_gave_up = true) {
  while (load_acquire(word) < value) {
    if (now_ns() > deadline || (heed_gave_up && gave_up(p))) return false;
    __nanosleep(64);
  }
  return true;
}

// Waits (bounded) until the completion word (ll::complete) is complete; false as wait_at_least.
__device__ __forceinline__ bool wait_complete(const IxParams& p, const uint64_t* word, uint64_t deadline) {
  while (!ll::complete(load_acquire(word))) {
    if (now_ns() > deadline || gave_up(p)) return false;
    __nanosleep(64);
  }
  return true;
}

// Rank pe's copy of the symmetric address ptr as this rank's pointer, for the node hop only (pe
// on this node): where NVSHMEM maps it (NVLink P2P, or one GPU) and IxParams::node_p2p allows,
// else null and the caller puts or gets. Never for a rank on another node: a NIC cannot serve a
// load or store.
template <typename T>
__device__ __forceinline__ T* node_peer(const IxParams& p, T* ptr, int pe) {
  return p.node_p2p ? static_cast<T*>(nvshmem_ptr(const_cast<void*>(static_cast<const void*>(ptr)), pe)) : nullptr;
}

// One word of rank pe's copy of a symmetric address.
__device__ __forceinline__ int64_t get_word(const int64_t* w, int pe) { return nvshmem_int64_g(w, pe); }
__device__ __forceinline__ float get_word(const float* w, int pe) { return nvshmem_float_g(w, pe); }

// A warp gets `bytes` of rank pe's copy of the symmetric src into dst (local memory, not
// necessarily symmetric). nvshmemx_getmem_warp over P2P keeps one load in flight per lane (its
// loop stores each word before it loads the next); typed gets issued back to back keep
// kInFlight, as warp_copy does. 8-byte words where both ends and bytes allow, else getmem.
__device__ __forceinline__ void get_warp(char* dst, const char* src, int64_t bytes, int pe, int lane) {
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | uintptr_t(bytes)) & 7) != 0) {
    nvshmemx_getmem_warp(dst, src, size_t(bytes), pe);
    return;
  }
  constexpr int kInFlight = 16;
  const int64_t n = bytes / 8;
  const uint64_t* from = reinterpret_cast<const uint64_t*>(src);
  uint64_t* to = reinterpret_cast<uint64_t*>(dst);
  for (int64_t base = lane; base < n; base += 32 * kInFlight) {
    uint64_t v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u)
      if (base + 32 * u < n) v[u] = nvshmem_uint64_g(from + base + 32 * u, pe);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u)
      if (base + 32 * u < n) to[base + 32 * u] = v[u];
  }
}

// A warp copies `bytes` from src to dst: 16-byte words where both are aligned, else bytes.
__device__ __forceinline__ void warp_copy(char* dst, const char* src, int64_t bytes, int lane) {
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | uintptr_t(bytes)) & 15) == 0) {
    ll::warp_copy_l2(reinterpret_cast<uint4*>(dst), reinterpret_cast<const uint4*>(src), bytes / 16, lane);
  } else {
    for (int64_t i = lane; i < bytes; i += 32) dst[i] = src[i];
  }
}

// The source rank of output row i (prefix ascending, R + 1 entries).
__device__ __forceinline__ int source_of(const int64_t* prefix, int num_ranks, int64_t i) {
  int lo = 0, hi = num_ranks;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (prefix[mid] <= i) lo = mid; else hi = mid;
  }
  return lo;
}

// Every thread of the block learns whether the call goes on (the notify step's verdict).
__device__ __forceinline__ bool call_ok(const IxParams& p) { return *static_cast<volatile int32_t*>(&ctrl(p).ok); }

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(float v) { return v; }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_float(float v) { return v; }

// Words per lane a row sum handles at once: their loads are independent, so a lane keeps
// kSumWords loads of each row in flight instead of one (a row sum is bound by load latency).
constexpr int kSumWords = 4;

// acc[u][0..16 / sizeof(T)) += the elements of 16-byte word v + 32 u of row (u < kSumWords, the
// words below `words`): the loads first, then the adds.
template <typename T>
__device__ __forceinline__ void add_words(float (*acc)[16 / sizeof(T)], const char* row, int64_t v, int64_t words) {
  uint4 w[kSumWords];
#pragma unroll
  for (int u = 0; u < kSumWords; ++u)
    if (v + 32 * u < words) w[u] = __ldcg(reinterpret_cast<const uint4*>(row) + v + 32 * u);
#pragma unroll
  for (int u = 0; u < kSumWords; ++u)
    if (v + 32 * u < words) {
      const T* e = reinterpret_cast<const T*>(&w[u]);
#pragma unroll
      for (int i = 0; i < int(16 / sizeof(T)); ++i) acc[u][i] += to_float(e[i]);
    }
}

// dst = the float32 sum, node by node, of one row per node, rounded once to T; a warp, 16 bytes
// a lane where the rows allow it. Node m's row is node_row(m) (null: none), except node `own`
// (-1: none), whose row is the float32 sum of local_row(0..L) (null: none) rounded to T, as a
// forwarder sums it (combine_reduce_kernel), so that both give the same bits.
template <typename T, typename NodeRow, typename LocalRow>
__device__ __forceinline__ void sum_node_rows(char* dst, int n, NodeRow node_row, int own, int L, LocalRow local_row,
                                              int64_t hidden, int lane) {
  constexpr int kPer = 16 / sizeof(T);
  bool any_local = false;
  for (int j = 0; j < L; ++j) any_local |= local_row(j) != nullptr;
  if ((hidden * int64_t(sizeof(T))) % 16 == 0 && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    const int64_t words = hidden / kPer;
    for (int64_t v = lane; v < words; v += 32 * kSumWords) {
      float acc[kSumWords][kPer];
#pragma unroll
      for (int u = 0; u < kSumWords; ++u)
#pragma unroll
        for (int i = 0; i < kPer; ++i) acc[u][i] = 0.f;
      for (int m = 0; m < n; ++m) {
        if (m != own) {
          if (const char* row = node_row(m)) add_words<T>(acc, row, v, words);
        } else if (any_local) {
          float part[kSumWords][kPer];
#pragma unroll
          for (int u = 0; u < kSumWords; ++u)
#pragma unroll
            for (int i = 0; i < kPer; ++i) part[u][i] = 0.f;
          for (int j = 0; j < L; ++j)
            if (const char* row = local_row(j)) add_words<T>(part, row, v, words);
#pragma unroll
          for (int u = 0; u < kSumWords; ++u)
#pragma unroll
            for (int i = 0; i < kPer; ++i) acc[u][i] += to_float(from_float<T>(part[u][i]));
        }
      }
#pragma unroll
      for (int u = 0; u < kSumWords; ++u)
        if (v + 32 * u < words) {
          uint4 out;
          T* o = reinterpret_cast<T*>(&out);
#pragma unroll
          for (int i = 0; i < kPer; ++i) o[i] = from_float<T>(acc[u][i]);
          reinterpret_cast<uint4*>(dst)[v + 32 * u] = out;
        }
    }
    return;
  }
  for (int64_t e = lane; e < hidden; e += 32) {
    float acc = 0.f;
    for (int m = 0; m < n; ++m) {
      if (m != own) {
        if (const char* row = node_row(m)) acc += to_float(reinterpret_cast<const T*>(row)[e]);
      } else if (any_local) {
        float part = 0.f;
        for (int j = 0; j < L; ++j)
          if (const char* row = local_row(j)) part += to_float(reinterpret_cast<const T*>(row)[e]);
        acc += to_float(from_float<T>(part));
      }
    }
    reinterpret_cast<T*>(dst)[e] = from_float<T>(acc);
  }
}

// dst = the float32 sum of the rows src(0..n) (null: none) in that order, rounded once to T.
template <typename T, typename Src>
__device__ __forceinline__ void sum_rows(char* dst, int n, Src src, int64_t hidden, int lane) {
  sum_node_rows<T>(dst, n, src, -1, 0, [](int) -> const char* { return nullptr; }, hidden, lane);
}

// Grid of a kernel whose blocks wait on peers: within the SM budget (ranks share a GPU under
// MPS), and no more blocks than units of work.
inline int grid_for(int num_blocks, int64_t units) {
  return int(units < 1 ? 1 : (units < num_blocks ? units : num_blocks));
}

}  // namespace
}  // namespace ep::kernels::ix
