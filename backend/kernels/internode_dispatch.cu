// Dispatch across nodes on the device (internode_device.cuh): the pack and rail puts of the
// sender, the forwarder's notes to its node's ranks, and the receive into the outputs. Three
// launches on one stream; only the forward and receive kernels wait, on other ranks, each wait
// bounded.
//
// Copies per token (n nodes it goes to, own node included; k_own / k_rem receiving ranks on this
// node / others): it is packed once (1); each receiver on this node copies it from the packed row
// (k_own); for every other node, the same packed row is put over the rail (n - 1) and each
// receiver there copies it from its forwarder's rail_recv (k_rem): 1 + (n - 1) + k. x is the
// caller's tensor, not symmetric, so a peer cannot read it in place and a NIC cannot put from it:
// the pack is the least one copy. Unless x is already there: dispatch_buffer hands out the
// packed rows' payload (and scales) for the caller to write x into, and the pack then writes only
// the row's other fields beside it (x_packed): (n - 1) + k copies. Before handing them out it
// waits until the last dispatch's readers of the packed rows are done (dispatch_in_wait_kernel).
#include "backend/kernels/internode_common.cuh"
#include "backend/kernels/module_kernels.hpp"
#include "backend/kernels/whatif_puts.cuh"

namespace ep::kernels::ix {
namespace {

// The bytes of a dispatch row that travel: its fields up to the positions (rows lie W apart).
__device__ __forceinline__ size_t row_fields(const IxParams& p) {
  return size_t(p.off_pos + (4 * int64_t(p.layout.num_ranks) + 15) / 16 * 16);
}

// A warp a token: packs token t, when it goes to any node, once into rail_send[this node][t]
// (payload | scales | global ids | weights | its row index at every rank of the group), tells
// each rank j of this node that gets it which packed row its row is (own_slots), and puts the
// packed row to the rail peer (m, local) of every other node m it goes to, into rail_peer's
// rail_recv[this node][t's rail slot at m], with that slot's row signal SET to seq (put with
// signal: the signal lands after the row, whatever QP or thread issued what; the rows of a
// chunk are not contiguous here, so there is no one put per chunk). On a NIC each put is one
// RDMA write of the row; on one GPU, NVSHMEM's P2P copy keeps one 16-byte load in flight per
// thread, so the bytes in flight follow the threads that put at once (Threads, below). Rows lie
// W apart; a put carries the row's fields only. x (scales) in place already (x_packed,
// scales_packed) is not copied; where both are (or x has no scales), the variant without kPack
// runs: it holds no copy loop, whose registers would not fit the 64 of a 1024-thread block.
// kCopyPuts: the what-if of whatif_puts.cuh (IxParams::whatif_copy_puts), instances of their own.
template <int Threads, bool kPack, bool kCopyPuts = false>
__global__ void __launch_bounds__(Threads) dispatch_send_kernel(IxParams p) {
  if (!call_ok(p)) return;
  const IxLayout& l = p.layout;
  const int R = l.num_ranks, L = l.ranks_per_node, NN = l.num_nodes;
  const int64_t C = l.capacity, K = p.num_topk;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint64_t seq = ctrl(p).seq;
  const int32_t* token_pos = p.meta + MetaLayout{R, p.num_experts, p.num_tokens}.token_pos();
  int32_t* own_slots = at<int32_t>(p.base, l.own_slots());
  const int64_t warps = int64_t(gridDim.x) * (Threads / 32);
  bool put = false;
  for (int64_t t = int64_t(blockIdx.x) * (Threads / 32) + warp; t < p.num_tokens; t += warps) {
    const int32_t* slots = p.node_pos + t * NN;  // t's rail slot at each node, -1 where it does not go
    bool goes = false;
    for (int m = 0; m < NN; ++m) goes |= slots[m] >= 0;
    if (!goes) continue;
    char* packed = row(p, l.rail_send(), p.node * C + t);
    if (kPack && !p.x_packed) warp_copy(packed, p.x + t * p.x_bytes, p.x_bytes, lane);
    if (kPack && p.x_scales && !p.scales_packed)
      warp_copy(packed + p.off_scales, reinterpret_cast<const char*>(p.x_scales + t * p.num_scales),
                4 * p.num_scales, lane);
    if (!p.cached) {
      for (int64_t k = lane; k < K; k += 32) at<int64_t>(packed, p.off_ids)[k] = p.topk_idx[t * K + k];
      if (p.topk_weights)
        for (int64_t k = lane; k < K; k += 32) at<float>(packed, p.off_weights)[k] = p.topk_weights[t * K + k];
    }
    for (int r = lane; r < R; r += 32) {
      const int32_t pos = token_pos[t * R + r];
      at<int32_t>(packed, p.off_pos)[r] = pos;
      if (r / L == p.node && pos >= 0) own_slots[(r % L) * C + pos] = int32_t(t);
    }
    __syncwarp();  // the packed row, whole, before the puts read it
    // Nodes from this one on, so that the puts of consecutive tokens spread over the rail peers.
    for (int i = 1; i < NN; ++i) {
      const int m = (p.node + i) % NN;
      if (slots[m] < 0) continue;
      put_signal_nbi_warp<kCopyPuts>(row(p, l.rail_recv(), p.node * C + slots[m]), packed, row_fields(p),
                                     row_flag(p, p.node, slots[m]), seq, NVSHMEM_SIGNAL_SET, rank_of(p, m, p.local));
      put = true;
    }
  }
  if (put && lane == 0) nvshmem_quiet();  // rail_send is packed again by the next call
}

// First, as a source: the send kernel is over, so this node's rows are packed; add the rows
// each rank j of this node gets from this rank to j's count for it (j gets them in place).
// Then, as the forwarder of every other source node m's rows, chunk by chunk (kChunkRows rail
// slots) as their rows land (a signal per row): no row moves. For each row and each rank j of
// this node that gets it (the row's positions at this node's ranks), j learns the row's slot in
// this rank's rail_recv (j's relay_slots[source][its row index there]); at the end j's count for
// each source grows by the rows this block gave it, one signal per (source, rank) and block; j
// reads the rows in place. Stores through j's mapped buffer (the node hop), puts where j is not
// mapped.
__global__ void __launch_bounds__(kThreads) dispatch_forward_kernel(IxParams p) {
  if (!call_ok(p)) return;
  const IxLayout& l = p.layout;
  const int L = l.ranks_per_node, NN = l.num_nodes;
  const int64_t C = l.capacity;
  const IxCtrl& c = ctrl(p);
  const uint64_t seq = c.seq;
  __shared__ int failed;
  __shared__ int forwarded[kMaxRanks];  // [m * L + j]: rows from node m's source this block gave rank j of this node
  if (blockIdx.x == 0 && threadIdx.x < L) {
    const int j = rank_of(p, p.node, threadIdx.x);
    const int32_t rows = p.meta[MetaLayout{l.num_ranks, p.num_experts, p.num_tokens}.tokens_per_rank() + j];
    __threadfence_system();  // the pack (previous kernel) before the count, for every observer
    if (rows > 0) nvshmemx_signal_op(count_word(p, p.rank), uint64_t(rows), NVSHMEM_SIGNAL_ADD, j);
  }
  int32_t* relay_slots = at<int32_t>(p.base, l.relay_slots());
  if (threadIdx.x == 0) failed = 0;
  for (int e = threadIdx.x; e < NN * L; e += blockDim.x) forwarded[e] = 0;
  __syncthreads();
  bool put = false;
  for (int m = 0; m < NN; ++m) {
    if (m == p.node) continue;
    const int s = rank_of(p, m, p.local);  // the source these rows come from
    const int64_t n = c.relay[m], chunks = (n + kChunkRows - 1) / kChunkRows;
    for (int64_t k = (blockIdx.x + int64_t(m) * 7) % gridDim.x; k < chunks; k += gridDim.x) {
      const int64_t first = k * kChunkRows, rows = n - first < kChunkRows ? n - first : kChunkRows;
      // A thread a row of the chunk waits for the row's signal (its acquire, then the barrier,
      // orders every thread's reads of the row).
      if (threadIdx.x < rows && !wait_at_least(p, row_flag(p, m, first + threadIdx.x), seq, now_ns() + p.timeout_ns)) {
        give_up(p, kForwardTimeout, s);
        failed = 1;
      }
      __syncthreads();
      if (failed) return;
      for (int64_t e = threadIdx.x; e < rows * L; e += blockDim.x) {
        const int64_t slot = m * C + first + e / L;
        const int j = int(e % L), pe = rank_of(p, p.node, j);
        const int32_t at_j = at<int32_t>(row(p, l.rail_recv(), slot), p.off_pos)[p.node * L + j];
        if (at_j < 0) continue;
        int32_t* where = relay_slots + int64_t(s) * C + at_j;
        if (int32_t* mapped = node_peer(p, where, pe)) {
          *mapped = int32_t(slot);
        } else {
          nvshmem_int32_p(where, int32_t(slot), pe);
          put = true;
        }
        atomicAdd_block(&forwarded[m * L + j], 1);
      }
    }
  }
  // One fence and one signal per (source, rank of this node) for all of this block's chunks,
  // not one per chunk: the receivers wait for every row of a source before they copy any.
  if (put) nvshmem_fence();  // the puts before the counts that announce them
  __threadfence_system();    // and the stores
  __syncthreads();
  for (int e = threadIdx.x; e < NN * L; e += blockDim.x)
    if (e / L != p.node && forwarded[e] > 0)
      nvshmemx_signal_op(count_word(p, rank_of(p, e / L, p.local)), uint64_t(forwarded[e]), NVSHMEM_SIGNAL_ADD,
                         rank_of(p, p.node, e % L));
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_quiet();
}

// Waits for the sources' rows (their counts; this node's sources first, then the others'), then
// copies them into the outputs at the prefix offsets: rows by source rank, then source token
// order; another node's source's from its forwarder's rail_recv, this node's source's from its
// packed rows, both in place. Ids become local (-1 for other ranks' experts, weight 0). Rows
// past the received ones are padding (num_worst_tokens). At the end, the last block tells each
// rank of this node that this rank is done reading its packed rows (dispatch_buffer's wait).
__global__ void __launch_bounds__(kThreads) dispatch_receive_kernel(IxParams p) {
  const IxLayout& l = p.layout;
  const int R = l.num_ranks, L = l.ranks_per_node;
  const int64_t C = l.capacity, K = p.num_topk, per = p.num_experts / R;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const IxCtrl& c = ctrl(p);
  const bool ok = call_ok(p);
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  const uint64_t deadline = now_ns() + p.timeout_ns;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  // Two passes: this node's sources' rows first (their counts come at the start of the peers'
  // forward kernels), then the other nodes' (counted as their forwarders relay them), so that
  // the first copies do not wait for the rail's rows. Padding (rows past the received ones,
  // num_worst_tokens) in the first pass; the rows of a pass whose wait failed become padding.
  for (int pass = 0; pass < 2; ++pass) {
    const bool own_pass = pass == 0;
    if (ok) {
      for (int s = threadIdx.x; s < R; s += blockDim.x)
        if ((s / L == p.node) == own_pass && !wait_at_least(p, count_word(p, s), uint64_t(c.recv[s]), deadline)) {
          give_up(p, kReceiveTimeout, rank_of(p, p.node, s % L));
          failed = 1;
        }
    }
    __syncthreads();
    const bool lost = !ok || failed;
    const int64_t M = ok ? c.prefix[R] : 0;
    if (own_pass && M > p.out_rows && blockIdx.x == 0 && threadIdx.x == 0) report(p.error, kOverflow, p.rank);
    for (int64_t i = int64_t(blockIdx.x) * (kThreads / 32) + warp; i < p.out_rows; i += warps) {
      const int s = i < M ? source_of(c.prefix, R, i) : -1;
      if (s >= 0 && (s / L == p.node) != own_pass) continue;  // the other pass's row
      if (s < 0 || lost) {  // padding: past the received rows (first pass), or a pass whose wait failed
        if (s < 0 && !own_pass) continue;
        for (int64_t b = lane; b < p.x_bytes; b += 32) p.recv_x[i * p.x_bytes + b] = 0;
        if (p.recv_x_scales)
          for (int64_t k = lane; k < p.num_scales; k += 32) p.recv_x_scales[i * p.num_scales + k] = 0.f;
        if (!p.cached)
          for (int64_t k = lane; k < K; k += 32) {
            p.recv_topk_idx[i * K + k] = -1;
            if (p.recv_topk_weights) p.recv_topk_weights[i * K + k] = 0.f;
          }
        continue;
      }
      const int64_t index = i - c.prefix[s];  // among s's rows to this rank
      // Global ids (and weights) from the row at src, made local; load(ptr) reads a word of it.
      const auto ids_out = [&](const char* src, auto load) {
        for (int64_t k = lane; k < K && !p.cached; k += 32) {
          const int64_t id = load(reinterpret_cast<const int64_t*>(src + p.off_ids) + k);
          const bool owned = id >= 0 && id / per == p.rank;
          p.recv_topk_idx[i * K + k] = owned ? id - p.rank * per : -1;
          if (p.recv_topk_weights)
            p.recv_topk_weights[i * K + k] =
                owned ? load(reinterpret_cast<const float*>(src + p.off_weights) + k) : 0.f;
        }
      };
      // Where row i lies: a row from another node's source in its forwarder's rail_recv (this
      // node's rank with s's local index; the slot it wrote here), one from this node's source s
      // in s's packed rows (rail_send[this node], at the token index s's own_slots names). Read
      // through the holder's mapped buffer (the node hop), or got where it is not mapped.
      int holder;
      int32_t slot = 0;
      int64_t region, first = 0;
      if (s / l.ranks_per_node != p.node) {
        holder = rank_of(p, p.node, s % l.ranks_per_node);
        if (lane == 0) slot = __ldcg(at<int32_t>(p.base, l.relay_slots()) + int64_t(s) * C + index);
        region = l.rail_recv();
      } else {
        holder = s;
        const int32_t* slots = at<int32_t>(p.base, l.own_slots()) + p.local * C;
        const int32_t* mapped_slots = node_peer(p, slots, s);
        if (lane == 0) slot = mapped_slots ? __ldcg(mapped_slots + index) : nvshmem_int32_g(slots + index, s);
        region = l.rail_send();
        first = p.node * C;
      }
      const char* src = row(p, region, first + __shfl_sync(0xffffffffu, slot, 0));
      // The row's payload and scales by copy(dst, from, bytes), its ids and weights by load(word).
      const auto take = [&](const char* from, auto copy, auto load) {
        copy(p.recv_x + i * p.x_bytes, from, p.x_bytes);
        if (p.recv_x_scales)
          copy(reinterpret_cast<char*>(p.recv_x_scales + i * p.num_scales), from + p.off_scales, 4 * p.num_scales);
        ids_out(from, load);
      };
      if (const char* mapped = node_peer(p, src, holder))
        take(mapped, [&](char* dst, const char* from, int64_t bytes) { warp_copy(dst, from, bytes, lane); },
             [](const auto* w) { return __ldcg(w); });
      else
        take(src, [&](char* dst, const char* from, int64_t bytes) { get_warp(dst, from, bytes, holder, lane); },
             [holder](const auto* w) { return get_word(w, holder); });
    }
  }
  // Every block past its reads (gets included: they return the data), the last one signals
  // this node's other ranks; a call that did not go ahead read nothing, and nobody waits for it.
  if (!ok || L == 1) return;
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&ctrl(p).receive_blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence_system();  // every block's loads before the signals
  const uint64_t seq = c.seq;
  for (int j = threadIdx.x; j < L; j += blockDim.x)
    if (j != p.local) nvshmemx_signal_op(dispatch_in_done(p, p.local), seq, NVSHMEM_SIGNAL_SET, rank_of(p, p.node, j));
}

// One warp: lane k waits for node rank k's reads of this rank's packed rows in the last dispatch
// that went ahead (IxCtrl::dispatch_seq; 0: none yet). This rank's own reads are earlier on the
// stream, and so is the send kernel's nvshmem_quiet (its rail puts read the rows).
__global__ void dispatch_in_wait_kernel(IxParams p) {
  const int k = int(threadIdx.x);
  if (k >= p.layout.ranks_per_node || k == p.local) return;
  const uint64_t deadline = now_ns() + p.timeout_ns;
  if (!wait_at_least(p, dispatch_in_done(p, k), ctrl(p).dispatch_seq, deadline, /*heed_gave_up=*/false))
    give_up(p, kDispatchInTimeout, rank_of(p, p.node, k));
}

}  // namespace

cudaError_t launch_dispatch_send(const IxParams& p, cudaStream_t stream) {
  // With the payload packed already (dispatch_buffer) the kernel only puts: twice the threads
  // a block keep twice the put loads in flight (2x2, bf16: 305 -> 200 us). Where it packs x its
  // own unrolled copy wants the registers that 1024 threads halve (64: spills; no gain measured).
  const bool packed = p.x_packed && (p.x_scales == nullptr || p.scales_packed);
  if (packed && p.whatif_copy_puts)
    dispatch_send_kernel<kPutThreads, false, true><<<p.num_blocks, kPutThreads, 0, stream>>>(p);
  else if (packed)
    dispatch_send_kernel<kPutThreads, false><<<p.num_blocks, kPutThreads, 0, stream>>>(p);
  else if (p.whatif_copy_puts)
    dispatch_send_kernel<kThreads, true, true><<<p.num_blocks, kThreads, 0, stream>>>(p);
  else
    dispatch_send_kernel<kThreads, true><<<p.num_blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_dispatch_forward(const IxParams& p, cudaStream_t stream) {
  dispatch_forward_kernel<<<p.num_blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_dispatch_in_wait(const IxParams& p, cudaStream_t stream) {
  dispatch_in_wait_kernel<<<1, 32, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_dispatch_receive(const IxParams& p, cudaStream_t stream) {
  dispatch_receive_kernel<<<grid_for(p.num_blocks, (p.out_rows + kThreads / 32 - 1) / (kThreads / 32)), kThreads, 0,
                            stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ep::kernels::ix

const void* ep::kernels::internode_dispatch_module_kernel() {
  return reinterpret_cast<const void*>(ep::kernels::ix::dispatch_in_wait_kernel);
}
