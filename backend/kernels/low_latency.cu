// Low-latency dispatch / combine kernels (protocol and buffer layout: low_latency.cuh).
//
// Local peers are reached through the addresses the host mapped once (GroupArgs::peers, from
// nvshmem_ptr: NVLink P2P, or the same GPU under MPS). Remote peers (null there) only through
// NVSHMEM's device API: puts with a signal into symmetric addresses of this rank's own half,
// which NVSHMEM translates for the target.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include "backend/kernels/low_latency.cuh"
#include "backend/kernels/low_latency_device.cuh"  // completion words, peers, warp copies and scans
#include "backend/kernels/whatif_puts.cuh"

namespace ep::kernels::ll {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kSendChunk = 512;      // channels a warp casts per work unit (16 per lane)
constexpr int kRecvChunk = 256;      // channels per work unit of the combine receive (8 per lane)

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
    if (n > p.max_tokens) report(p.g.error, kDispatchOverflow, e / (p.num_experts / p.g.num_ranks));
  }
  return min(n, p.max_tokens);
}

// Marks token t's unrouted slots in send_slot (and reports expert ids out of range). A warp.
__device__ void mark_unrouted(const DispatchSendParams& p, int t, int lane) {
  for (int k = lane; k < p.num_topk; k += 32) {
    const int64_t e = p.topk_idx[int64_t(t) * p.num_topk + k];
    if (e >= 0 && e < p.num_experts) continue;
    p.send_slot[int64_t(t) * p.num_topk + k] = -1;
    if (e != -1) report(p.g.error, kBadExpert, p.g.rank);
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
// whole tokens best); each signals the owner's flag for this rank.
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
// rank completes once every one has landed, in whatever order.
__device__ void push_numbering(const DispatchSendParams& p, int e, int n, int lane) {
  const GroupArgs& g = p.g;
  const int E_local = p.num_experts / g.num_ranks, r = e / E_local, le = e - r * E_local, cap = p.max_tokens;
  const int* lists = at<int>(g.half, g.layout.dispatch_lists());
  const int* counts = at<int>(g.half, g.layout.dispatch_counts());
  uint64_t* flag = my_word(g, g.layout.dispatch_flags());
  __syncwarp();  // the lanes' list entries (and lane 0's count) are in
  if (n > 0)
    nvshmemx_putmem_signal_nbi_warp(at<int>(g.half, g.layout.remote_lists()) + (int64_t(g.rank) * E_local + le) * cap,
                                    lists + int64_t(e) * cap, size_t(n) * 4, flag, 1, NVSHMEM_SIGNAL_ADD, r);
  uint32_t* numbered = at<uint32_t>(g.half, g.layout.owner_arrivals()) + r;
  __threadfence();  // this warp's count is visible before its arrival
  __syncwarp();
  uint32_t before = 0;
  if (lane == 0) before = atomicAdd(numbered, 1u);
  if (__shfl_sync(0xffffffffu, before, 0) != uint32_t(E_local - 1)) return;
  __threadfence();  // every other warp's count, seen through the counter, before reading them
  if (lane == 0) *numbered = 0;  // all of r's experts are numbered: nobody adds to it again this call
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
  // The peers are done reading this half's tokens and lists (from the call before last).
  wait_words(g, g.layout.dispatch_credits(), kDispatchSendCounter, kDispatchSendTimeout);
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
  // "my tokens, lists and counts are out" (local peers; remote ones count the puts)
  arrive_everywhere(g, g.layout.dispatch_flags(), false);
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
  wait_words(g, g.layout.dispatch_flags(), kDispatchRecvCounter, kDispatchRecvTimeout);
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
  wait_words(g, g.layout.combine_credits(), kCombineSendCounter, kCombineSendTimeout);
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

// Waits, without taking them, for the credits of this half's combine region (one block).
__global__ void combine_region_wait_kernel(GroupArgs g) {
  wait_complete(g, g.layout.combine_credits(), kCombineSendTimeout);
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
  wait_words(g, g.layout.combine_flags(), kCombineRecvCounter, kCombineRecvTimeout);
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
         g.peers[g.rank] && g.num_blocks >= 1 && g.error && (!any_remote(g) || g.layout.remote);
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
