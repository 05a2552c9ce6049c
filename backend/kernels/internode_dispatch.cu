// Dispatch across nodes on the device (internode_device.cuh): the rail puts of the sender, the
// forwarder's notes to its node's ranks, and the receive into the outputs. Three launches on one
// stream; only the forward and receive kernels wait, on other ranks, each wait bounded.
//
// Copies per token (n nodes it goes to, k_own / k_rem receiving ranks on this node / others):
// it is packed once; each receiver on this node copies it from the packed row (k_own); for each
// other node, the packed row is put over the rail and each receiver there copies it from its
// forwarder's rail_recv (1 + k_rem). x is the caller's tensor, not symmetric, so a peer cannot
// read it in place: the pack is the least one copy.
#include "backend/kernels/internode_common.cuh"

namespace ep::kernels::ix {
namespace {

// Packs each token going to node m, chunk by chunk (a warp a row), into rail_send[m] and puts
// the chunk to the rail peer (m, local), into its rail_recv[this node], with the chunk's signal
// SET to seq. A row: payload | scales | global ids | weights | where each rank of node m gets it.
// This node's rows stay in rail_send[node] (its ranks get them there; the forward kernel tells
// them), with own_slots saying which slot each of their rows is; positions are not written.
__global__ void __launch_bounds__(kThreads) dispatch_send_kernel(IxParams p) {
  if (!call_ok(p)) return;
  const IxLayout& l = p.layout;
  const int R = l.num_ranks, L = l.ranks_per_node, NN = l.num_nodes;
  const int64_t C = l.capacity, K = p.num_topk;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint64_t seq = ctrl(p).seq;
  const int32_t* token_pos = p.meta + MetaLayout{R, p.num_experts, p.num_tokens}.token_pos();
  int32_t* own_slots = at<int32_t>(p.base, l.own_slots());
  for (int m = 0; m < NN; ++m) {
    const int64_t n = p.node_count[m], chunks = (n + kChunkRows - 1) / kChunkRows;
    // Nodes start at different blocks, so that small sends to many nodes spread over the grid.
    for (int64_t c = (blockIdx.x + int64_t(m) * 7) % gridDim.x; c < chunks; c += gridDim.x) {
      const int64_t rows = n - c * kChunkRows < kChunkRows ? n - c * kChunkRows : kChunkRows;
      if (warp < rows) {
        const int64_t slot = c * kChunkRows + warp, t = p.node_tokens[int64_t(m) * p.num_tokens + slot];
        char* dst = row(p, l.rail_send(), m * C + slot);
        warp_copy(dst, p.x + t * p.x_bytes, p.x_bytes, lane);
        if (p.x_scales)
          warp_copy(dst + p.off_scales, reinterpret_cast<const char*>(p.x_scales + t * p.num_scales), 4 * p.num_scales,
                    lane);
        if (!p.cached) {
          for (int64_t k = lane; k < K; k += 32) at<int64_t>(dst, p.off_ids)[k] = p.topk_idx[t * K + k];
          if (p.topk_weights)
            for (int64_t k = lane; k < K; k += 32) at<float>(dst, p.off_weights)[k] = p.topk_weights[t * K + k];
        }
        for (int j = lane; j < L; j += 32) {
          const int32_t pos = token_pos[t * R + m * L + j];
          if (m != p.node) at<int32_t>(dst, p.off_pos)[j] = pos;
          else if (pos >= 0) own_slots[j * C + pos] = int32_t(slot);
        }
      }
      __syncthreads();
      if (m == p.node) continue;
      nvshmemx_putmem_signal_nbi_block(row(p, l.rail_recv(), p.node * C + c * kChunkRows),
                                       row(p, l.rail_send(), m * C + c * kChunkRows), size_t(rows * p.row_stride),
                                       chunk_flag(p, p.node, c), seq, NVSHMEM_SIGNAL_SET, rank_of(p, m, p.local));
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_quiet();  // rail_send is packed again by the next call
}

// First, as a source: the send kernel is over, so this node's rows are packed; add the rows
// each rank j of this node gets from this rank to j's count for it (j gets them in place).
// Then, as the forwarder of every other source node m's rows, chunk by chunk as they land: no
// row moves. For each row and each rank j of this node that gets it, j learns the row's slot in
// this rank's rail_recv (j's relay_slots[source][its row index there]), and j's count for the
// source grows by the chunk's rows for j, one signal per rank and chunk; j reads the rows in
// place. Stores through j's mapped buffer (the node hop), puts where j is not mapped.
__global__ void __launch_bounds__(kThreads) dispatch_forward_kernel(IxParams p) {
  if (!call_ok(p)) return;
  const IxLayout& l = p.layout;
  const int L = l.ranks_per_node, NN = l.num_nodes;
  const int64_t C = l.capacity;
  const IxCtrl& c = ctrl(p);
  const uint64_t seq = c.seq;
  __shared__ int failed;
  __shared__ int forwarded[kMaxLocal];  // rows of the current chunk each rank of this node gets
  if (blockIdx.x == 0 && threadIdx.x < L) {
    const int j = rank_of(p, p.node, threadIdx.x);
    const int32_t rows = p.meta[MetaLayout{l.num_ranks, p.num_experts, p.num_tokens}.tokens_per_rank() + j];
    __threadfence_system();  // the pack (previous kernel) before the count, for every observer
    if (rows > 0) nvshmemx_signal_op(count_word(p, p.rank), uint64_t(rows), NVSHMEM_SIGNAL_ADD, j);
  }
  int32_t* relay_slots = at<int32_t>(p.base, l.relay_slots());
  for (int m = 0; m < NN; ++m) {
    if (m == p.node) continue;
    const int s = rank_of(p, m, p.local);  // the source these rows come from
    const int64_t n = c.relay[m], chunks = (n + kChunkRows - 1) / kChunkRows;
    for (int64_t k = (blockIdx.x + int64_t(m) * 7) % gridDim.x; k < chunks; k += gridDim.x) {
      if (threadIdx.x == 0) {
        failed = !wait_at_least(chunk_flag(p, m, k), seq, now_ns() + p.timeout_ns);
        if (failed) ll::report(p.error, kForwardTimeout, s);
      }
      if (threadIdx.x < L) forwarded[threadIdx.x] = 0;
      __syncthreads();
      if (failed) return;
      const int64_t first = k * kChunkRows, rows = n - first < kChunkRows ? n - first : kChunkRows;
      bool put = false;
      for (int64_t e = threadIdx.x; e < rows * L; e += blockDim.x) {
        const int64_t slot = m * C + first + e / L;
        const int j = int(e % L), pe = rank_of(p, p.node, j);
        const int32_t at_j = at<int32_t>(row(p, l.rail_recv(), slot), p.off_pos)[j];
        if (at_j < 0) continue;
        int32_t* where = relay_slots + int64_t(s) * C + at_j;
        if (int32_t* mapped = node_peer(p, where, pe)) {
          *mapped = int32_t(slot);
        } else {
          nvshmem_int32_p(where, int32_t(slot), pe);
          put = true;
        }
        atomicAdd_block(&forwarded[j], 1);
      }
      if (put) nvshmem_fence();  // the puts before the counts that announce them
      __threadfence_system();    // and the stores
      __syncthreads();
      if (threadIdx.x < L && forwarded[threadIdx.x] > 0)
        nvshmemx_signal_op(count_word(p, s), uint64_t(forwarded[threadIdx.x]), NVSHMEM_SIGNAL_ADD,
                           rank_of(p, p.node, threadIdx.x));
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_quiet();
}

// Waits for every source's rows (its count), then copies them into the outputs at the prefix
// offsets: rows by source rank, then source token order; another node's source's from its
// forwarder's rail_recv, this node's source's from its rail_send, both in place. Ids become
// local (-1 for other ranks' experts, weight 0). Rows past the received ones are padding
// (num_worst_tokens).
__global__ void __launch_bounds__(kThreads) dispatch_receive_kernel(IxParams p) {
  const IxLayout& l = p.layout;
  const int R = l.num_ranks;
  const int64_t C = l.capacity, K = p.num_topk, per = p.num_experts / R;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const IxCtrl& c = ctrl(p);
  const bool ok = call_ok(p);
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  if (ok) {
    const uint64_t deadline = now_ns() + p.timeout_ns;
    for (int s = threadIdx.x; s < R; s += blockDim.x)
      if (!wait_at_least(count_word(p, s), uint64_t(c.recv[s]), deadline)) {
        ll::report(p.error, kReceiveTimeout, rank_of(p, p.node, s % l.ranks_per_node));
        failed = 1;
      }
  }
  __syncthreads();
  const int64_t M = ok && !failed ? c.prefix[R] : 0;
  if (M > p.out_rows && blockIdx.x == 0 && threadIdx.x == 0) ll::report(p.error, kOverflow, p.rank);
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t i = int64_t(blockIdx.x) * (kThreads / 32) + warp; i < p.out_rows; i += warps) {
    if (i >= M) {
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
    const int s = source_of(c.prefix, R, i);
    const int64_t index = i - c.prefix[s];  // among s's rows to this rank
    // Global ids (and weights) from the row at src, made local; load(ptr) reads a word of it.
    const auto ids_out = [&](const char* src, auto load) {
      for (int64_t k = lane; k < K && !p.cached; k += 32) {
        const int64_t id = load(reinterpret_cast<const int64_t*>(src + p.off_ids) + k);
        const bool owned = id >= 0 && id / per == p.rank;
        p.recv_topk_idx[i * K + k] = owned ? id - p.rank * per : -1;
        if (p.recv_topk_weights)
          p.recv_topk_weights[i * K + k] = owned ? load(reinterpret_cast<const float*>(src + p.off_weights) + k) : 0.f;
      }
    };
    // Where row i lies: a row from another node's source in its forwarder's rail_recv (this
    // node's rank with s's local index; the slot it wrote here), one from this node's source s
    // in s's rail_send (the slot in s's own_slots). Read through the holder's mapped buffer (the
    // node hop), or got where it is not mapped.
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

}  // namespace

cudaError_t launch_dispatch_send(const IxParams& p, cudaStream_t stream) {
  dispatch_send_kernel<<<p.num_blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_dispatch_forward(const IxParams& p, cudaStream_t stream) {
  dispatch_forward_kernel<<<p.num_blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_dispatch_receive(const IxParams& p, cudaStream_t stream) {
  dispatch_receive_kernel<<<grid_for(p.num_blocks, (p.out_rows + kThreads / 32 - 1) / (kThreads / 32)), kThreads, 0,
                            stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ep::kernels::ix
