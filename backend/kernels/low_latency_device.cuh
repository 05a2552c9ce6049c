// Device helpers of the low-latency kernels (low_latency_dispatch.cu, low_latency_combine.cu): error
// reports and trace stamps, peer addressing (local peers by mapped address, remote ones through
// NVSHMEM), completion words, warp copies and scans. Protocol and buffer layout: low_latency.cuh.
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include "backend/kernels/low_latency.cuh"
#include "backend/kernels/sync.cuh"  // now_ns, load_acquire

namespace ep::kernels::ll {
namespace {

// Reports an error: a call's own problem (pending_report) in the word the host clears once it
// raised it, a timeout in the word it never clears, so that neither hides the other. The first
// one of each wins, mostly (report_first).
__device__ __forceinline__ void report(const GroupArgs& g, int kind, int peer) {
  const int code = kind * 65536 + peer + 1;
  report_first(pending_report(code) ? g.pending : g.error, code);
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

// Rank r is on another node: NVSHMEM's device API reaches it, no load or store does.
__device__ __forceinline__ bool is_remote(const GroupArgs& g, int r) { return g.peers[r] == nullptr; }

__host__ __device__ bool any_remote(const GroupArgs& g) {
  for (int r = 0; r < g.num_ranks; ++r)
    if (!g.peers[r]) return true;
  return false;
}

// The completion word of this rank at `offset` of rank r's half, as NVSHMEM names it: the
// symmetric address in this rank's own half.
__device__ __forceinline__ uint64_t* my_word(const GroupArgs& g, int64_t offset) {
  return at<uint64_t>(g.half, offset + 8 * g.rank);
}

// --------------------------------------------------------------------------- completion words

__device__ __forceinline__ bool complete(uint64_t v) { return v != 0 && (v >> 32) == (v & 0xffffffffu); }

// Whether a wait of this rank's kernels gave up (or the host aborted the group): the buffer's
// completion words are out of step with the peers' for good, so every later wait ends at once
// instead of waiting out a timeout of its own (calls queued behind a lost peer end within one
// timeout). In device memory: cheap to read in a wait's loop, where the error word crosses PCIe.
__device__ __forceinline__ bool gave_up(const GroupArgs& g) {
  return *reinterpret_cast<volatile const uint32_t*>(g.gave_up) != 0;
}

// Threads r < R wait (bounded by the timeout) until word r at `offset` of this rank's half is
// complete; true where this thread's words all completed. A word still incomplete at the deadline
// is reported, naming its peer (unless another wait gave up first: that one reported), and ends
// every other wait (gave_up), which then reports nothing of its own. Once gave_up is set a wait
// fails at once even on a complete word: the failed blocks reset no words, so a complete one may
// be left from an earlier call, and a block that passed on it would write or read a half out of
// step with its peers. `heed_gave_up` false: a wait that guards memory live peers still read,
// which the caller's own kernels write next (combine_region_wait), waits for them whatever
// failed elsewhere.
__device__ bool wait_complete(const GroupArgs& g, int64_t offset, int error_kind, bool heed_gave_up = true) {
  const uint64_t deadline = now_ns() + g.timeout_ns;
  bool ok = !(heed_gave_up && gave_up(g));
  for (int r = threadIdx.x; r < g.num_ranks && ok; r += blockDim.x) {
    const uint64_t* word = at<uint64_t>(g.half, offset + 8 * r);
    while (!complete(load_acquire(word))) {
      if (heed_gave_up && gave_up(g)) {
        ok = false;
        break;
      }
      if (now_ns() > deadline) {
        if (!gave_up(g)) report(g, error_kind, r);
        atomicExch(g.gave_up, 1u);
        ok = false;
        break;
      }
      __nanosleep(64);
    }
  }
  return ok;
}

// wait_complete, then the block that passes last resets the words: every block of this kernel
// has seen them, and no peer adds to them again before this kernel's own arrivals (which follow).
// After it every thread of the block may read what the peers published. False in every thread of
// a block where a word did not complete: the block must then neither write what the words guard
// (a live peer may still read it) nor arrive (nothing it guards was published). Blocks decide
// alone: one that passed may write, as its words were complete. Once a wait failed the words stay
// out of step for good (gave_up), so a failed block leaves the counter and the words as they are.
__device__ bool wait_words(const GroupArgs& g, int64_t offset, Counter counter, int error_kind) {
  const bool passed_here = __syncthreads_and(wait_complete(g, offset, error_kind));
  if (passed_here && threadIdx.x == 0) {
    uint32_t* passed = at<uint32_t>(g.half, g.layout.counters() + 4 * counter);
    __threadfence();
    if (atomicAdd(passed, 1u) == gridDim.x - 1) {
      *passed = 0;
      for (int r = 0; r < g.num_ranks; ++r) *at<uint64_t>(g.half, offset + 8 * r) = 0;
    }
  }
  return passed_here;
}

// This block's arrival at word `rank` of `offset` in every rank's half, once everything the
// block wrote (and read) before is done and visible system-wide. Every block of the grid
// arrives; block 0 also adds their number. Remote peers get it as an NVSHMEM signal, unless
// `remote_too` is false: their word then counts the puts that carry the data instead.
__device__ void arrive_everywhere(const GroupArgs& g, int64_t offset, bool remote_too) {
  __syncthreads();
  if (threadIdx.x < 32) {
    __threadfence_system();
    const uint64_t add = 1 + (blockIdx.x == 0 ? uint64_t(gridDim.x) << 32 : 0);
    for (int r = threadIdx.x; r < g.num_ranks; r += 32) {
      if (!is_remote(g, r))
        atomicAdd_system(reinterpret_cast<unsigned long long*>(g.peers[r] + offset + 8 * g.rank),
                         static_cast<unsigned long long>(add));
      else if (remote_too)
        nvshmemx_signal_op(my_word(g, offset), add, NVSHMEM_SIGNAL_ADD, r);
    }
  }
}

// The signal of the last put to a remote peer that receives `puts` puts in all (this one
// included): it adds the total, so the peer's word completes once every put has landed.
__device__ __forceinline__ uint64_t closing_signal(int64_t puts) { return (uint64_t(puts) << 32) | 1; }

// ----------------------------------------------------------------------------------- helpers

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

// Exclusive prefix of v[0..n) in place, v[n] = the total (one warp).
__device__ void warp_exclusive_scan(int* v, int n, int lane) {
  int running = 0;
  for (int base = 0; base < n; base += 32) {
    const int i = base + lane;
    const int x = i < n ? v[i] : 0;
    int incl = x;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += y;
    }
    if (i < n) v[i] = running + incl - x;
    running += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (lane == 0) v[n] = running;
}

// The index u with prefix[u] <= m < prefix[u + 1] (prefix ascending, n + 1 entries).
__device__ __forceinline__ int find_in_prefix(const int* prefix, int n, int m) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (prefix[mid] <= m) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace
}  // namespace ep::kernels::ll
