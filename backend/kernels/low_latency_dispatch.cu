// Low-latency dispatch kernels and their launchers: send casts and numbers this rank's tokens
// (and pushes them to remote owners), recv copies each expert's tokens out of every rank's
// region. Protocol and buffer layout: low_latency.cuh; the combine: low_latency_combine.cu.
//
// Local peers are reached through the addresses the host mapped once (GroupArgs::peers, from
// nvshmem_ptr: NVLink P2P, or the same GPU under MPS). Remote peers (null there) only through
// NVSHMEM's device API: puts with a signal into symmetric addresses of this rank's own half,
// which NVSHMEM translates for the target (or, with remote_block_signals, puts without one and a
// signal per block at the send's end).
#include <cuda_fp8.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include "backend/kernels/low_latency.cuh"
#include "backend/kernels/low_latency_device.cuh"  // completion words, peers, warp copies and scans
#include "backend/kernels/low_latency_launch.cuh"  // kWarps, grid sizes, group checks
#include "backend/kernels/module_kernels.hpp"
#include "backend/kernels/whatif_puts.cuh"

namespace ep::kernels::ll {
namespace {

constexpr int kSendChunk = 512;  // channels a warp casts per work unit (16 per lane)

// ------------------------------------------------------------------------------ dispatch send

// One warp numbers expert e's pairs in pair order (the reference's order): pair q's slot is the
// number of pairs before it with the same expert. Writes the list and count for the receiver
// and send_slot for the combine; pairs past max_tokens are dropped (reported). Returns the count
// (every lane).
__device__ int number_expert(const DispatchSendParams& p, int e, int* list, int* count, int lane) {
  const int num_pairs = p.num_tokens * p.num_topk;
  constexpr int kBatch = 8;  // loads in flight before the ballots
  int n = 0;
  for (int base = 0; base < num_pairs; base += 32 * kBatch) {
    int64_t v[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int q = base + 32 * i + lane;
      v[i] = q < num_pairs ? __ldg(p.topk_idx + q) : -1;
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const bool hit = v[i] == e;
      const unsigned hits = __ballot_sync(0xffffffffu, hit);
      if (hit) {
        const int q = base + 32 * i + lane;
        const int slot = n + __popc(hits & ((1u << lane) - 1));
        if (slot < p.max_tokens) list[slot] = q;
        p.send_slot[q] = slot < p.max_tokens ? slot : -1;
      }
      n += __popc(hits);
    }
  }
  if (lane == 0) {
    *count = min(n, p.max_tokens);
    if (n > p.max_tokens) report(p.g, kDispatchOverflow, e / (p.num_experts / p.g.num_ranks));
  }
  return min(n, p.max_tokens);
}

// Marks token t's unrouted slots in send_slot (and reports expert ids out of range). A warp.
__device__ void mark_unrouted(const DispatchSendParams& p, int t, int lane) {
  for (int k = lane; k < p.num_topk; k += 32) {
    const int64_t e = p.topk_idx[int64_t(t) * p.num_topk + k];
    if (e >= 0 && e < p.num_experts) continue;
    p.send_slot[int64_t(t) * p.num_topk + k] = -1;
    if (e != -1) report(p.g, kBadExpert, p.g.rank);
  }
}

// This lane's 16 channels of chunk c of token t (a chunk: kSendChunk channels, 16 per lane), or
// false past the hidden size (whole 8-lane groups drop out together: H is a multiple of 128).
__device__ __forceinline__ bool load_chunk(const DispatchSendParams& p, int t, int c, int lane, uint4 raw[2]) {
  const int ch0 = c * kSendChunk + lane * 16;
  if (ch0 >= p.hidden) return false;
  const uint4* src = reinterpret_cast<const uint4*>(p.x + int64_t(t) * p.hidden + ch0);
  raw[0] = __ldg(src);
  raw[1] = __ldg(src + 1);
  return true;
}

// Writes this lane's 16 channels of chunk c (raw, as load_chunk read them) into the token: bf16
// as is, or fp8 with one scale per 128 channels (8 lanes). Every lane of the warp calls it.
__device__ __forceinline__ void store_chunk(const DispatchSendParams& p, int c, const uint4 raw[2], char* token,
                                            int lane) {
  const int H = p.hidden;
  const int ch0 = c * kSendChunk + lane * 16;
  if (ch0 >= H) return;
  if (!p.use_fp8) {
    uint4* d = reinterpret_cast<uint4*>(token + int64_t(ch0) * 2);
    d[0] = raw[0];
    d[1] = raw[1];
    return;
  }
  float v[16];
  const uint32_t* w32 = reinterpret_cast<const uint32_t*>(raw);
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    v[2 * i] = bf16_bits_to_float(w32[i] & 0xffffu);
    v[2 * i + 1] = bf16_bits_to_float(w32[i] >> 16);
    amax = fmaxf(amax, fmaxf(fabsf(v[2 * i]), fabsf(v[2 * i + 1])));
  }
  // 8 lanes hold one 128-channel group; the lanes still here are whole groups, lanes 0..n-1.
  const int n = min(32, (H - c * kSendChunk) / 16);
  const unsigned active = n == 32 ? 0xffffffffu : (1u << n) - 1;
  amax = fmaxf(amax, __shfl_xor_sync(active, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(active, amax, 2));
  amax = fmaxf(amax, __shfl_xor_sync(active, amax, 4));
  const float scale = fp8_scale(amax, p.round_scale);
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
  *reinterpret_cast<uint4*>(token + ch0) = make_uint4(out[0], out[1], out[2], out[3]);
  if ((lane & 7) == 0) *reinterpret_cast<float*>(token + H + (ch0 / kChannelsPerScale) * 4) = scale;
}

// One warp casts channels [c * 512, c * 512 + 512) of token t into this rank's token region.
// Chunk 0 also marks the token's unrouted slots.
__device__ void cast_token_chunk(const DispatchSendParams& p, int t, int c, char* token, int lane) {
  if (c == 0) mark_unrouted(p, t, lane);
  uint4 raw[2];
  if (load_chunk(p, t, c, lane, raw)) store_chunk(p, c, raw, token, lane);
}

// Whether pair slots [k0, k1) of token t hold an expert of rank r.
__device__ __forceinline__ bool has_expert_of(const DispatchSendParams& p, int t, int r, int k0, int k1, int step) {
  const int64_t first = int64_t(r) * (p.num_experts / p.g.num_ranks), last = first + p.num_experts / p.g.num_ranks;
  bool hit = false;
  for (int k = k0; k < k1; k += step) {
    const int64_t e = __ldg(p.topk_idx + int64_t(t) * p.num_topk + k);
    hit |= e >= first && e < last;
  }
  return hit;
}

// Tokens per put across nodes: 1 unless puts take runs (DispatchSendParams::remote_put_tokens).
__device__ __forceinline__ int put_tokens(const DispatchSendParams& p) { return max(p.remote_put_tokens, 1); }

// Whether a put to rank r starts at token t: t goes to r, and starts a run of tokens going to r
// or a new piece of one (runs are cut at multiples of put_tokens). One thread.
__device__ __forceinline__ bool starts_put(const DispatchSendParams& p, int t, int r) {
  return has_expert_of(p, t, r, 0, p.num_topk, 1) &&
         (t % put_tokens(p) == 0 || !has_expert_of(p, t - 1, r, 0, p.num_topk, 1));
}

// How many token puts rank r gets from this rank (a warp, lanes over the tokens).
__device__ __forceinline__ int count_token_puts(const DispatchSendParams& p, int r, int lane) {
  int n = 0;
  for (int t = lane; t < p.num_tokens; t += 32) n += starts_put(p, t, r);
  return __reduce_add_sync(0xffffffffu, n);
}

// The remote ranks that own one of token t's experts, bit r for rank r (every lane of the warp).
__device__ __forceinline__ unsigned long long remote_owners_of(const DispatchSendParams& p, int t, int lane) {
  const int E_local = p.num_experts / p.g.num_ranks;
  unsigned long long owners = 0;
  for (int k = lane; k < p.num_topk; k += 32) {
    const int64_t e = __ldg(p.topk_idx + int64_t(t) * p.num_topk + k);
    if (e >= 0 && e < p.num_experts && is_remote(p.g, int(e / E_local))) owners |= 1ull << (e / E_local);
  }
#pragma unroll
  for (int d = 16; d > 0; d /= 2) owners |= __shfl_xor_sync(0xffffffffu, owners, d);
  return owners;
}

// Groups across nodes: a warp casts the whole of token t (kChunksInFlight chunks' loads in flight
// at once), then pushes it to each remote owner of one of its experts, to row [me][t] of their
// remote_tokens: the push starts as soon as the token is cast, while other warps still cast
// theirs, instead of in a kernel after every cast. One put per token and owner (a NIC moves
// whole tokens best); each signals the owner's flag for this rank (with remote_block_signals none
// does: the block's arrival at the kernel's end does).
template <bool kCopyPuts>
__device__ void cast_and_push_token(const DispatchSendParams& p, int t, int lane) {
  constexpr int kChunksInFlight = 4;
  const GroupArgs& g = p.g;
  const int64_t token_bytes = LowLatencyLayout::token_bytes(p.hidden, p.use_fp8);
  char* token = g.half + g.layout.dispatch_tokens() + t * token_bytes;
  const unsigned long long owners = remote_owners_of(p, t, lane);
  mark_unrouted(p, t, lane);
  const int chunks = (p.hidden + kSendChunk - 1) / kSendChunk;
  for (int c0 = 0; c0 < chunks; c0 += kChunksInFlight) {
    uint4 raw[kChunksInFlight][2];
#pragma unroll
    for (int i = 0; i < kChunksInFlight; ++i)
      if (c0 + i < chunks) load_chunk(p, t, c0 + i, lane, raw[i]);
#pragma unroll
    for (int i = 0; i < kChunksInFlight; ++i)
      if (c0 + i < chunks) store_chunk(p, c0 + i, raw[i], token, lane);  // skips what load_chunk did not load
  }
  __syncwarp();  // every lane's part of the token is in before the puts read it
  char* mirror = g.half + g.layout.remote_tokens() + (int64_t(g.rank) * p.max_tokens + t) * token_bytes;
  uint64_t* flag = my_word(g, g.layout.dispatch_flags());
  // No signal: the owners count this rank's blocks (the kernel's end). The what-if's copies
  // (kCopyPuts) do not apply here.
  if (p.remote_block_signals) {
    for (unsigned long long left = owners; left; left &= left - 1)
      nvshmemx_putmem_nbi_warp(mirror, token, size_t(token_bytes), __ffsll(left) - 1);
    return;
  }
  if (!p.remote_one_fence) {
    for (unsigned long long left = owners; left; left &= left - 1)
      put_signal_nbi_warp<kCopyPuts>(mirror, token, size_t(token_bytes), flag, 1, NVSHMEM_SIGNAL_ADD,
                                     __ffsll(left) - 1);
    return;
  }
  // One fence for the token's puts, by lane 0 once the warp's lanes have done their shares (the
  // pattern of NVSHMEM's own P2P put with signal), then its signals. For P2P only: on IBGDA a
  // fence waits on every queue pair, where a put with its signal needs none. The what-if's
  // copies (kCopyPuts) do not apply here.
  for (unsigned long long left = owners; left; left &= left - 1)
    nvshmemx_putmem_nbi_warp(mirror, token, size_t(token_bytes), __ffsll(left) - 1);
  __syncwarp();
  if (lane == 0) {
    nvshmem_fence();
    for (unsigned long long left = owners; left; left &= left - 1)
      nvshmemx_signal_op(flag, 1, NVSHMEM_SIGNAL_ADD, __ffsll(left) - 1);
  }
  __syncwarp();
}

// Tokens per block in the grouped send across nodes: the tokens spread over every block, in
// groups of whole pieces (so that where a put starts does not depend on the grid).
__host__ __device__ __forceinline__ int group_tokens(int num_tokens, int grid, int piece) {
  const int per_block = (num_tokens + grid - 1) / grid;
  return (per_block + piece - 1) / piece * piece;
}

// Groups across nodes, puts of runs (remote_put_tokens >= 1): block b casts its group of
// consecutive tokens, a warp per (token, 512-channel chunk) as within a node, so the cast is
// spread over every warp; then its warps share the group's puts: per remote owner r, each run
// of consecutive tokens going to r, cut at multiples of put_tokens, is one put (source and
// destination rows are consecutive alike), signalling r's flag once. Every thread of the block
// calls it.
template <bool kCopyPuts>
__device__ void cast_and_push_group(const DispatchSendParams& p, int lane, int warp) {
  const GroupArgs& g = p.g;
  const int piece = put_tokens(p);
  const int group = group_tokens(p.num_tokens, int(gridDim.x), piece);
  const int first = int(blockIdx.x) * group, last = min(first + group, p.num_tokens);
  if (first >= last) return;  // the whole block
  const int64_t token_bytes = LowLatencyLayout::token_bytes(p.hidden, p.use_fp8);
  char* tokens = g.half + g.layout.dispatch_tokens();
  const int chunks = (p.hidden + kSendChunk - 1) / kSendChunk;
  for (int u = warp; u < (last - first) * chunks; u += kWarps) {
    const int t = first + u / chunks;
    cast_token_chunk(p, t, u % chunks, tokens + t * token_bytes, lane);
  }
  // The remote ranks, so that the puts below spread over every warp (with (token, rank) pairs a
  // warp's rank stays the same whenever R divides kWarps, and same-node ranks leave warps idle).
  __shared__ int remote[kMaxRanks];
  __shared__ int num_remote;
  if (threadIdx.x == 0) {
    int n = 0;
    for (int r = 0; r < g.num_ranks; ++r)
      if (is_remote(g, r)) remote[n++] = r;
    num_remote = n;
  }
  __syncthreads();  // the group is cast, and the remote ranks listed, before any warp puts
  char* mirror = g.half + g.layout.remote_tokens() + int64_t(g.rank) * p.max_tokens * token_bytes;
  uint64_t* flag = my_word(g, g.layout.dispatch_flags());
  // (token, remote rank) pairs of the group, ranks inner.
  for (int j = warp; j < (last - first) * num_remote; j += kWarps) {
    const int t = first + j / num_remote, r = remote[j % num_remote];
    if (!__shfl_sync(0xffffffffu, lane == 0 && starts_put(p, t, r), 0)) continue;
    int n = 1;  // the run's length: tokens going to r, up to the piece's end
    while (t + n < last && (t + n) % piece != 0 &&
           __any_sync(0xffffffffu, has_expert_of(p, t + n, r, lane, p.num_topk, 32)))
      ++n;
    put_signal_nbi_warp<kCopyPuts>(mirror + t * token_bytes, tokens + t * token_bytes,
                        size_t(n * token_bytes), flag, 1, NVSHMEM_SIGNAL_ADD, r);
  }
}

// Groups across nodes, after a warp numbered expert e (n pairs) of a remote owner r: pushes the
// list to [me][le] of r's remote_lists, then counts itself among the warps that numbered r's
// experts; the last of them pushes their counts with the closing signal, the number of puts r
// gets from this rank in all (its tokens, non-empty lists and the counts): r's flag for this
// rank completes once every one has landed, in whatever order. With remote_block_signals the
// puts carry no signal and nothing counts them: the blocks' arrivals complete r's flag.
__device__ void push_numbering(const DispatchSendParams& p, int e, int n, int lane) {
  const GroupArgs& g = p.g;
  const int E_local = p.num_experts / g.num_ranks, r = e / E_local, le = e - r * E_local, cap = p.max_tokens;
  const int* lists = at<int>(g.half, g.layout.dispatch_lists());
  const int* counts = at<int>(g.half, g.layout.dispatch_counts());
  uint64_t* flag = my_word(g, g.layout.dispatch_flags());
  __syncwarp();  // the lanes' list entries (and lane 0's count) are in
  int* remote_list = at<int>(g.half, g.layout.remote_lists()) + (int64_t(g.rank) * E_local + le) * cap;
  if (n > 0 && p.remote_block_signals)
    nvshmemx_putmem_nbi_warp(remote_list, lists + int64_t(e) * cap, size_t(n) * 4, r);
  else if (n > 0)
    nvshmemx_putmem_signal_nbi_warp(remote_list, lists + int64_t(e) * cap, size_t(n) * 4, flag, 1, NVSHMEM_SIGNAL_ADD, r);
  uint32_t* numbered = at<uint32_t>(g.half, g.layout.owner_arrivals()) + r;
  __threadfence();  // this warp's count is visible before its arrival
  __syncwarp();
  uint32_t before = 0;
  if (lane == 0) before = atomicAdd(numbered, 1u);
  if (__shfl_sync(0xffffffffu, before, 0) != uint32_t(E_local - 1)) return;
  __syncwarp();  // lane 0 saw the counter: the shuffle alone orders no memory for the other lanes
  __threadfence();  // every other warp's count, seen through the counter, before reading them
  if (lane == 0) *numbered = 0;  // all of r's experts are numbered: nobody adds to it again this call
  if (p.remote_block_signals) {  // the counts, with no signal and no count of the puts
    nvshmemx_putmem_nbi_warp(at<int>(g.half, g.layout.remote_counts()) + g.rank * E_local, counts + r * E_local,
                             size_t(E_local) * 4, r);
    return;
  }
  int lists_put = 0;
  for (int k = lane; k < E_local; k += 32) lists_put += min(max(__ldcg(counts + r * E_local + k), 0), cap) > 0;
  const int64_t puts = count_token_puts(p, r, lane) + __reduce_add_sync(0xffffffffu, lists_put) + 1;
  nvshmemx_putmem_signal_nbi_warp(at<int>(g.half, g.layout.remote_counts()) + g.rank * E_local, counts + r * E_local,
                                  size_t(E_local) * 4, flag, closing_signal(puts), NVSHMEM_SIGNAL_ADD, r);
}

// Work units, a warp each. Within a node (kPushRemote false): first the E experts' numberings,
// then (token, 512-channel chunk) casts. Across nodes: first the tokens, whole, each pushed to its
// remote owners by the warp that cast it (the pushes are the long pole, so they start first);
// then the numberings, which push the lists and counts (push_numbering). Across nodes with
// remote_put_tokens, each block first casts and pushes its group of tokens (cast_and_push_group),
// then the warps take the numberings only.
// kCopyPuts: the what-if of whatif_puts.cuh (GroupArgs::whatif_copy_puts), an instance of its own.
template <bool kPushRemote, bool kCopyPuts = false>
__global__ void __launch_bounds__(kThreads, kPushRemote ? 1 : 2) dispatch_send_kernel(DispatchSendParams p) {
  const GroupArgs& g = p.g;
  const int E = p.num_experts, E_local = E / g.num_ranks;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  stamp(g, kDispatchSendCounter, 0);
  // The peers are done reading this half's tokens and lists (from the call before last). Else
  // (a timeout, or an earlier one: gave_up) this block writes nothing a live peer may still read,
  // and does not arrive: its peers' receives then give up on this rank in turn.
  if (!wait_words(g, g.layout.dispatch_credits(), kDispatchSendCounter, kDispatchSendTimeout)) return;
  stamp(g, kDispatchSendCounter, 1);

  char* tokens = g.half + g.layout.dispatch_tokens();
  int* lists = at<int>(g.half, g.layout.dispatch_lists());
  int* counts = at<int>(g.half, g.layout.dispatch_counts());
  const int64_t token_bytes = LowLatencyLayout::token_bytes(p.hidden, p.use_fp8);
  const int chunks = (p.hidden + kSendChunk - 1) / kSendChunk;
  const int64_t token_units = kPushRemote ? p.num_tokens : int64_t(p.num_tokens) * chunks;
  const bool grouped = kPushRemote && p.remote_put_tokens > 0;
  const int64_t first_token_unit = kPushRemote ? 0 : E, first_expert_unit = kPushRemote && !grouped ? token_units : 0;
  if (grouped) cast_and_push_group<kCopyPuts>(p, lane, warp);  // the tokens; then only the numberings below
  const int64_t units = E + (grouped ? 0 : token_units);
  for (int64_t u = int64_t(blockIdx.x) * kWarps + warp; u < units; u += int64_t(gridDim.x) * kWarps) {
    if (u >= first_expert_unit && u < first_expert_unit + E) {
      const int e = int(u - first_expert_unit);
      const int n = number_expert(p, e, lists + int64_t(e) * p.max_tokens, counts + e, lane);
      if (kPushRemote && is_remote(g, e / E_local)) push_numbering(p, e, n, lane);
    } else if (kPushRemote) {
      cast_and_push_token<kCopyPuts>(p, int(u - first_token_unit), lane);
    } else {
      const int t = int((u - first_token_unit) / chunks), c = int((u - first_token_unit) % chunks);
      cast_token_chunk(p, t, c, tokens + t * token_bytes, lane);
    }
  }
  stamp(g, kDispatchSendCounter, 2);
  // "my tokens, lists and counts are out" (local peers; remote ones count the puts, or with
  // remote_block_signals the blocks too, once each warp's puts are complete)
  const bool block_signals = kPushRemote && p.remote_block_signals;
  if (block_signals) {
    __syncwarp();
    if (lane == 0) nvshmem_quiet();
  }
  arrive_everywhere(g, g.layout.dispatch_flags(), block_signals);
  stamp(g, kDispatchSendCounter, 3);
}

// ------------------------------------------------------------------------------ dispatch recv

// Block b takes local experts b, b + grid, ...: for each (expert, rank) unit it reads the rank's
// count and list for the expert, then its warps copy the listed tokens out of that rank's token
// region (L2 loads: a peer wrote them) into the caller's tensors: row i of rank r's for expert le
// goes to [le][rows of ranks < r + i], packed from row 0 as DeepEP's (the block has every count).
__global__ void __launch_bounds__(kThreads, 1) dispatch_recv_kernel(DispatchRecvParams p) {
  extern __shared__ int prefix[];  // [units + 1]: rows of the block's units before each
  const GroupArgs& g = p.g;
  const int R = g.num_ranks, H = p.hidden, E_local = p.num_experts / R;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t token_bytes = LowLatencyLayout::token_bytes(H, p.use_fp8);
  const int64_t payload_bytes = p.use_fp8 ? H : 2 * int64_t(H);
  const int num_scales = H / kChannelsPerScale;
  const int64_t rows_per_expert = int64_t(R) * p.max_tokens;
  const int experts = (E_local - int(blockIdx.x) + int(gridDim.x) - 1) / int(gridDim.x);
  const int units = experts * R;  // unit j * R + r: expert blockIdx.x + j * grid, rank r
  auto expert_of = [&](int unit) { return int(blockIdx.x) + unit / R * int(gridDim.x); };
  stamp(g, kDispatchRecvCounter, 0);
  if (!wait_words(g, g.layout.dispatch_flags(), kDispatchRecvCounter, kDispatchRecvTimeout)) {
    // Some sender's tokens never came (or an earlier wait gave up): nothing is read, the block's
    // experts received no rows, and the credits go back (this block reads nothing more).
    for (int u = threadIdx.x; u < units; u += blockDim.x) p.recv_layout[int64_t(expert_of(u)) * R + u % R] = 0;
    for (int j = threadIdx.x; j < experts; j += blockDim.x) p.recv_count[expert_of(j * R)] = 0;
    arrive_everywhere(g, g.layout.dispatch_credits(), true);
    return;
  }
  stamp(g, kDispatchRecvCounter, 1);

  // Rank r's counts, lists and tokens for this rank's experts: at r (read in place), or, for a
  // remote r, in this rank's remote regions (pushed by r's dispatch send).
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    const int le = expert_of(u), r = u % R;
    const int e = g.rank * E_local + le;
    const int* count = is_remote(g, r) ? at<int>(g.half, g.layout.remote_counts()) + r * E_local + le
                                       : at<int>(g.peers[r], g.layout.dispatch_counts()) + e;
    const int c = min(max(__ldcg(count), 0), p.max_tokens);
    prefix[u] = c;
    p.recv_layout[int64_t(le) * R + r] = c;
  }
  __syncthreads();
  if (warp == 0) warp_exclusive_scan(prefix, units, lane);
  __syncthreads();
  for (int j = threadIdx.x; j < experts; j += blockDim.x)
    p.recv_count[expert_of(j * R)] = prefix[(j + 1) * R] - prefix[j * R];

  for (int m = warp; m < prefix[units]; m += kWarps) {
    const int u = find_in_prefix(prefix, units, m);
    const int le = expert_of(u), r = u % R, i = m - prefix[u];
    const int e = g.rank * E_local + le;
    int q;
    const char* token;
    if (is_remote(g, r)) {
      q = __ldcg(at<int>(g.half, g.layout.remote_lists()) + (int64_t(r) * E_local + le) * p.max_tokens + i);
      token = g.half + g.layout.remote_tokens() + (int64_t(r) * p.max_tokens + q / p.num_topk) * token_bytes;
    } else {
      char* peer = g.peers[r];
      q = __ldcg(at<int>(peer, g.layout.dispatch_lists()) + int64_t(e) * p.max_tokens + i);
      token = peer + g.layout.dispatch_tokens() + int64_t(q / p.num_topk) * token_bytes;
    }
    // Packed: the expert's rows from ranks before r come first (prefix[u - r]: its unit of rank 0).
    const int64_t row = le * rows_per_expert + (m - prefix[u - r]);
    warp_copy_l2(reinterpret_cast<uint4*>(static_cast<char*>(p.recv_x) + row * payload_bytes),
                 reinterpret_cast<const uint4*>(token), payload_bytes / 16, lane);
    if (p.use_fp8) {
      const float* s = reinterpret_cast<const float*>(token + payload_bytes);
      for (int k = lane; k < num_scales; k += 32) p.recv_scales[row * num_scales + k] = __ldcg(s + k);
    }
    if (lane == 0) p.recv_src_info[row] = q;
  }
  stamp(g, kDispatchRecvCounter, 2);
  arrive_everywhere(g, g.layout.dispatch_credits(), true);  // done reading every rank's tokens
  stamp(g, kDispatchRecvCounter, 3);
}

}  // namespace

cudaError_t launch_dispatch_send(const DispatchSendParams& p, cudaStream_t stream) {
  if (!valid_group(p.g) || p.num_experts % p.g.num_ranks || p.hidden % kHiddenMultiple ||
      (p.num_tokens > 0 && !p.send_slot) || p.remote_put_tokens < 0 || p.remote_put_tokens > 64)
    return cudaErrorInvalidValue;
  if (any_remote(p.g)) {  // a warp per token (cast and pushed whole) or expert
    const int64_t grid = grid_for(p.g.num_blocks, p.num_experts + int64_t(p.num_tokens));
    if (p.g.whatif_copy_puts)
      dispatch_send_kernel<true, true><<<grid, kThreads, 0, stream>>>(p);
    else
      dispatch_send_kernel<true><<<grid, kThreads, 0, stream>>>(p);
  } else {  // a warp per expert or (token, chunk)
    const int64_t units = p.num_experts + int64_t(p.num_tokens) * ((p.hidden + kSendChunk - 1) / kSendChunk);
    dispatch_send_kernel<false><<<grid_for(p.g.num_blocks, units), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_dispatch_recv(const DispatchRecvParams& p, cudaStream_t stream) {
  if (!valid_group(p.g) || p.num_experts % p.g.num_ranks || p.hidden % kHiddenMultiple || p.num_topk < 1)
    return cudaErrorInvalidValue;
  const int E_local = p.num_experts / p.g.num_ranks;
  const int grid = E_local < p.g.num_blocks ? E_local : p.g.num_blocks;
  const int experts_per_block = (E_local + grid - 1) / grid;
  const int64_t smem = (int64_t(experts_per_block) * p.g.num_ranks + 1) * int64_t(sizeof(int));
  if (const cudaError_t err = allow_dynamic_smem(dispatch_recv_kernel, smem); err != cudaSuccess) return err;
  dispatch_recv_kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ep::kernels::ll

const void* ep::kernels::low_latency_dispatch_module_kernel() {
  return reinterpret_cast<const void*>(ep::kernels::ll::dispatch_recv_kernel);
}
